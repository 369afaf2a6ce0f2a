"""Operational routes: liveness, version, Prometheus metrics, the load a gateway routes on
(api/loads.py), and the root probe."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal import __version__
from shoal.api.auth import require_api_key
from shoal.api.errors import error_response
from shoal.api.metrics import CONTENT_TYPE
from shoal.api.serving import json_response
from shoal.api.state import server_state

# Open even with an API key: probes carry no secret and learn only up/down.
open_router = APIRouter()
protected_router = APIRouter(dependencies=[Depends(require_api_key)])


@open_router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine's step loop runs; 503 once it has died."""
    engine = server_state(request).engine
    if not engine.is_alive:
        return error_response(503, "The engine is not running.")
    if engine.draining:
        return error_response(503, "The server is shutting down.", headers={"connection": "close"})
    return Response(status_code=200)


@open_router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    # Some clients (Claude Code among them) probe `HEAD /` before using the API.
    return json_response({"status": "ok", "model": server_state(request).model.name})


@protected_router.get("/version")
async def version() -> Response:
    return json_response({"version": __version__})


@open_router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Open, as in vLLM, unless `--metrics-require-key`: then it needs the API key too."""
    if server_state(request).config.metrics_require_key:
        await require_api_key(request)
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)


@open_router.get("/v1/loads")
async def v1_loads(request: Request) -> Response:
    """SGLang's load report (api/loads.py); open like /metrics, which has the same numbers,
    and protected with it by `--metrics-require-key`. `include=` sections are not reported."""
    state = server_state(request)
    if state.config.metrics_require_key:
        await require_api_key(request)
    return json_response(state.loads.loads())


@protected_router.get("/server_info")
async def server_info(request: Request) -> Response:
    """The keys of SGLang's `/server_info` that a gateway reads. Needs the key, like /version."""
    state = server_state(request)
    return json_response({"model_path": state.engine.info.path, "served_model_name": state.model.name,
                          "tp_size": state.engine.info.tensor_parallel_size, "dp_size": 1,
                          "pp_size": state.engine.info.pipeline_parallel_size,
                          "disaggregation_mode": "null",
                          "is_embedding": False, "context_length": state.model.max_model_len,
                          "max_total_tokens": state.loads.max_total_num_tokens,
                          "max_running_requests": state.loads.max_running_requests,
                          "version": __version__})


@protected_router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> Response:
    """Drop the prefix cache (blocks held by running requests stay). Needs the API key
    when one is set, like every route that changes server state."""
    dropped = server_state(request).engine.reset_prefix_cache()
    return json_response({"dropped_blocks": dropped})
