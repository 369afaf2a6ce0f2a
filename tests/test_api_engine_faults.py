"""Engine faults, injected into the model runner (in-process, over the ASGI transport):
- the step loop dies: a stream in flight ends with `data: {"error": ...}`, a whole
  request in flight gets 503, /health turns 503, and new requests get 503;
- slow empty steps (what a busy CPU produces): back-to-back requests still complete,
  although the engine loses the wakeup of a request added during such a step."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from shoal.api.app import create_app
from shoal.api.config import ServerConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.config import EngineConfig
from shoal.engine.model_runner import ModelRunner

pytest_plugins = ["server_util"]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "ignore_eos": True}


def failing_runner(config: EngineConfig, fail_at_step: int) -> ModelRunner:
    runner = ModelRunner.load(config)
    execute = runner.execute
    steps = iter(range(10**9))

    def flaky(sched):
        if next(steps) == fail_at_step:
            raise RuntimeError("simulated device failure")
        return execute(sched)

    runner.execute = flaky
    return runner


def slow_empty_steps_runner(config: EngineConfig) -> ModelRunner:
    runner = ModelRunner.load(config)
    execute = runner.execute

    def slow(sched):
        if not sched.scheduled:  # a step that only tells the runner which requests finished
            time.sleep(0.2)
        return execute(sched)

    runner.execute = slow
    return runner


async def with_engine(model_dir: Path, make_runner, scenario) -> None:
    config = EngineConfig(model=str(model_dir), num_blocks=64, max_model_len=256)
    engine_factory = lambda: AsyncEngine(config, lambda: make_runner(config)).start()  # noqa: E731
    app = create_app(ServerConfig(), config, engine_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
            await scenario(client)


def test_stream_ends_with_error_event_then_everything_is_503(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        error = orjson.loads(frames[-2])["error"]
        assert "simulated device failure" in error["message"] and error["code"] == 503
        assert any("choices" in orjson.loads(f) for f in frames[:-2])  # tokens came first
        await assert_dead(client)

    asyncio.run(with_engine(tiny_model_dir, lambda c: failing_runner(c, 4), scenario))


def test_anthropic_stream_ends_with_error_event(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient) -> None:
        body = {"model": "claude-x", "max_tokens": 50, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        response = await client.post("/v1/messages", json=body)
        frames = response.text.strip().split("\n\n")
        names = [f.split("\n")[0] for f in frames]
        assert names[0] == "event: message_start" and names[-1] == "event: error"
        assert "event: message_stop" not in names
        error = orjson.loads(frames[-1].split("\n")[1][6:])
        assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
        assert "simulated device failure" in error["error"]["message"]
        again = await client.post("/v1/messages", json={**body, "stream": False})
        assert again.status_code == 503 and again.json()["type"] == "error"

    asyncio.run(with_engine(tiny_model_dir, lambda c: failing_runner(c, 4), scenario))


def test_whole_request_in_flight_gets_503(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 50})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
        await assert_dead(client)

    asyncio.run(with_engine(tiny_model_dir, lambda c: failing_runner(c, 4), scenario))


async def assert_dead(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 503
    again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 503 and again.json()["error"]["code"] == 503
    assert (await client.get("/v1/models")).status_code == 200  # the rest of the API still answers


def test_back_to_back_requests_complete_despite_slow_empty_steps(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient) -> None:
        for i in range(4):
            body = {"prompt": f"request {i}", "max_tokens": 3, "ignore_eos": True}
            response = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=10)
            assert response.json()["usage"]["completion_tokens"] == 3
            await asyncio.sleep(0.05)  # the engine is now inside the slow empty step

    asyncio.run(with_engine(tiny_model_dir, slow_empty_steps_runner, scenario))
