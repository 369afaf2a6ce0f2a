"""The FastAPI app: its lifespan owns the engine (start, metrics hook, shutdown) and keeps
everything the routes need on `app.state.server`; nothing lives at module level."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from shoal import __version__
from shoal.api import anthropic, openai, responses, system, tokenize
from shoal.api.chat import ChatService
from shoal.api.config import ServerConfig
from shoal.api.errors import install_error_handlers
from shoal.api.framing import FramingMiddleware
from shoal.api.loads import LoadTracker
from shoal.api.metrics import HttpMetricsMiddleware, PrometheusStatLogger
from shoal.api.sampling import SamplingDefaults
from shoal.api.request_id import RequestIdMiddleware
from shoal.api.response_store import ResponseStore
from shoal.api.served_model import ServedModel
from shoal.api.state import ServerState
from shoal.api.tool_formats import detect_reasoning_format, detect_tool_format
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.config import EngineConfig
from shoal.engine.stats import LoggingStatLogger

log = logging.getLogger("shoal")
EngineFactory = Callable[[], Awaitable[AsyncEngine]]


def create_app(config: ServerConfig, engine_config: EngineConfig,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """The server app. The engine starts in the lifespan (so /health answers only once the
    model is loaded); `engine_factory` replaces `AsyncEngine(engine_config).start()`."""
    factory = engine_factory or (lambda: AsyncEngine(engine_config).start())
    app = FastAPI(title="Shoal", version=__version__, lifespan=_lifespan(config, engine_config, factory),
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(FramingMiddleware, body_timeout=config.body_timeout)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])
    for router in (system.open_router, system.protected_router, openai.router, anthropic.router,
                   responses.router, tokenize.router):
        app.include_router(router)
    return app


def _lifespan(config: ServerConfig, engine_config: EngineConfig, factory: EngineFactory):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await factory()
        info = engine.info
        model = ServedModel.from_path(info.path, config.served_model_name, config.aliases,
                                      info.max_model_len)
        spec = engine.scheduler.proposer.num_tokens if engine.scheduler.proposer else 0
        metrics = PrometheusStatLogger(model.name, info.max_model_len, cache_config_labels(engine_config, info),
                                       num_speculative_tokens=spec)
        loads = LoadTracker((info.num_blocks - 1) * info.block_size, engine_config.max_num_seqs)
        engine.stat_loggers.extend((metrics, loads))
        if config.log_stats:
            engine.stat_loggers.append(LoggingStatLogger())
        chat = chat_service(engine, config)
        defaults = SamplingDefaults.load(info.path, dict(config.generation_config))
        app.state.server = ServerState(engine, config, model, metrics, chat, defaults, loads,
                                       ResponseStore(config.responses_store_size))
        log_limits(model, engine_config, config)
        log.info("sampling defaults: %s; tool calls: %s; reasoning: %s", defaults,
                 chat.tool_format.name if chat.tool_format else "not parsed (no parser for this model)",
                 f"{chat.reasoning.start}...{chat.reasoning.end}" if chat.reasoning else "not parsed")
        try:
            yield
        finally:
            await engine.shutdown()

    return lifespan


def cache_config_labels(engine_config: EngineConfig, info) -> dict[str, str]:
    """vllm:cache_config_info's labels (vLLM's names where Shoal has the same knob)."""
    return {"block_size": str(info.block_size), "cache_dtype": str(info.dtype),
            "enable_prefix_caching": str(engine_config.enable_prefix_caching),
            "num_gpu_blocks": str(info.num_blocks - 1), "num_cpu_blocks": "0",
            "kv_cache_memory_bytes": str(info.kv_cache_bytes)}


def chat_service(engine: AsyncEngine, config: ServerConfig) -> ChatService:
    tokenizer = engine.tokenizer
    return ChatService(engine, detect_tool_format(tokenizer, config.tool_call_parser),
                       detect_reasoning_format(tokenizer, config.reasoning_parser),
                       config.chat_template)


def log_limits(model: ServedModel, engine_config: EngineConfig, config: ServerConfig) -> None:
    log.info("serving %s as %s; max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, "
             "prefix caching %s, API key %s", model.root, " / ".join(model.names),
             model.max_model_len, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
             "on" if engine_config.enable_prefix_caching else "off",
             "required" if config.api_keys else "not required")
