"""Engine faults, injected into the model runner (in-process, over the ASGI transport):
- one request whose share of a step raises ends alone, with an error; the rest of the batch
  continues token for token, its blocks are freed and their hashes dropped;
- a broken device (every step raises) kills the step loop after MAX_FAILED_STEPS steps:
  streams in flight end with an error event, /health and new requests get 503, and the
  server's watchdog stops uvicorn with exit code 1 so a supervisor restarts it;
- slow empty steps (what a busy CPU produces): back-to-back requests still complete,
  although the engine loses the wakeup of a request added during such a step."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import httpx
import orjson
import pytest

from shoal.api.app import create_app
from shoal.api.config import ServerConfig
from shoal.api.server import ShoalServer, bind_socket
from shoal.engine.async_engine import MAX_FAILED_STEPS, AsyncEngine
from shoal.engine.config import EngineConfig
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling_params import SamplingParams

pytest_plugins = ["server_util"]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "ignore_eos": True}
POISON_SEED = 666  # a request with this seed makes any step it samples in raise


def broken_runner(config: EngineConfig, fail_from_step: int) -> ModelRunner:
    """A device that breaks for good at step `fail_from_step`."""
    runner = ModelRunner.load(config)
    execute = runner.execute
    steps = iter(range(10**9))

    def flaky(sched):
        if next(steps) >= fail_from_step:
            raise RuntimeError("simulated device failure")
        return execute(sched)

    runner.execute = flaky
    return runner


def poison_runner(config: EngineConfig) -> ModelRunner:
    """Fails every step that samples for a request seeded POISON_SEED (with a partial forward
    first, as a real failure would leave)."""
    runner = ModelRunner.load(config)
    execute = runner.execute

    def poisoned(sched):
        if any(r.sample and r.params.seed == POISON_SEED for r in sched.scheduled):
            raise ValueError("simulated bad request")
        return execute(sched)

    runner.execute = poisoned
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


async def with_engine(model_dir: Path, make_runner, scenario, prefail: int = 0) -> None:
    config = EngineConfig(model=str(model_dir), num_blocks=64, max_model_len=256)
    engine_factory = lambda: AsyncEngine(config, lambda: make_runner(config)).start()  # noqa: E731
    app = create_app(ServerConfig(), config, engine_factory)
    async with app.router.lifespan_context(app):
        engine = app.state.server.engine
        engine._failed_steps = prefail
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
            await scenario(client, engine)


def frames_of(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_failing_request_ends_alone_and_the_batch_continues(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
        body = {**CHAT, "max_tokens": 24, "temperature": 0, "stream": True}
        alone = frames_of(await client.post("/v1/chat/completions", json=body))
        responses = await asyncio.gather(*[
            client.post("/v1/chat/completions", json={**body, "seed": POISON_SEED if i == 1 else i})
            for i in range(3)])
        poisoned = frames_of(responses[1])
        error = orjson.loads(poisoned[-2])["error"]
        assert poisoned[-1] == "[DONE]" and error["code"] == 500
        assert "simulated bad request" in error["message"]
        for i in (0, 2):  # the same greedy tokens as the request served alone
            assert text_of(frames_of(responses[i])) == text_of(alone)
            assert orjson.loads(frames_of(responses[i])[-2])["choices"][0]["finish_reason"] == "length"
        assert (await client.get("/health")).status_code == 200
        whole = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5,
                                                           "seed": POISON_SEED})
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "InternalServerError"
        again = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
        pool = engine.scheduler.pool
        assert pool.num_free_blocks == pool.num_blocks - 1 and not engine.scheduler.requests
        assert engine.is_alive

    asyncio.run(with_engine(tiny_model_dir, poison_runner, scenario))


def text_of(frames: list[str]) -> str:
    chunks = [orjson.loads(f) for f in frames if f != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_a_failed_prefill_leaves_no_cached_blocks_behind(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
        prompt = list(range(3, 3 + 100))  # six full blocks
        bad = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2,
                                                         "seed": POISON_SEED})
        assert bad.status_code == 500
        assert not engine.scheduler.pool.cached  # the failed step's blocks were never trusted
        good = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert good.status_code == 200 and good.json()["usage"]["prompt_tokens"] == 100
        assert engine.scheduler.kv.num_cache_hits == 0  # computed afresh, not read from garbage

    asyncio.run(with_engine(tiny_model_dir, poison_runner, scenario))


def test_a_follower_reading_a_failed_leaders_blocks_is_recomputed(tiny_model_dir: Path):
    """Leader and follower arrive together with one 96-token prefix: the follower hits the
    leader's blocks in the same step. The leader's step fails (its KV is never written), so
    the follower must not keep what it read: it is recomputed and matches a solo run."""
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
        prefix = list(range(3, 3 + 96))
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        solo = await tokens_of(engine.add_request(prefix + [200, 201], params))
        engine.reset_prefix_cache()
        # Added in one go: the same step admits both, the follower hitting the leader's blocks.
        leader = engine.add_request(prefix + [150], replace(params, seed=POISON_SEED))
        follower = engine.add_request(prefix + [200, 201], params)
        bad, good = await asyncio.gather(collect(leader), tokens_of(follower))
        assert bad[-1].error and "simulated bad request" in bad[-1].error
        assert good == solo
        assert engine.scheduler.stats.num_preemptions >= 1  # the follower was sent back to recompute
        assert engine.scheduler.stats.num_cached_prompt_tokens >= 96  # it did hit the leader's blocks

    asyncio.run(with_engine(tiny_model_dir, poison_runner, scenario))


async def collect(stream) -> list:
    return [output async for output in stream]


async def tokens_of(stream) -> list[int]:
    outputs = await collect(stream)
    assert outputs[-1].error is None, outputs[-1].error
    return [t for output in outputs for t in output.new_token_ids]


def test_anthropic_stream_of_a_failing_request_ends_with_an_error_event(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
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

    # Dies at its first failing step: MAX_FAILED_STEPS - 1 earlier steps already failed.
    asyncio.run(with_engine(tiny_model_dir, lambda c: broken_runner(c, 0), scenario,
                            prefail=MAX_FAILED_STEPS - 1))


def test_a_broken_device_kills_the_engine_after_failed_steps(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
        codes = []
        while engine.is_alive and len(codes) < MAX_FAILED_STEPS + 1:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            frames = frames_of(response)
            assert frames[-1] == "[DONE]" and "simulated device failure" in frames[-2]
            codes.append(orjson.loads(frames[-2])["error"]["code"])
        # Each request fails alone (500) until the MAX_FAILED_STEPS-th failing step in a row
        # (the steps that only report finished requests fail too): then 503.
        assert_dies_after_failures(codes)
        await assert_dead(client)

    asyncio.run(with_engine(tiny_model_dir, lambda c: broken_runner(c, 4), scenario))


async def assert_dead(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 503
    again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 503 and again.json()["error"]["code"] == 503
    assert (await client.get("/v1/models")).status_code == 200  # the rest of the API still answers


def test_a_dead_engine_stops_the_server_with_exit_code_1(tiny_model_dir: Path):
    config = EngineConfig(model=str(tiny_model_dir), num_blocks=64, max_model_len=256)
    app = create_app(ServerConfig(), config,
                     lambda: AsyncEngine(config, lambda: broken_runner(config, 0)).start())
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    import uvicorn

    server = ShoalServer(uvicorn.Config(app, log_level="warning"), drain_timeout=1)

    async def run() -> list[int]:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        codes = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not server.started:
                await asyncio.sleep(0.05)
            while not codes or codes[-1] != 503 and len(codes) < MAX_FAILED_STEPS:
                codes.append((await client.post("/v1/completions", json={"prompt": "a"})).status_code)
        await asyncio.wait_for(serving, timeout=10)  # it stops by itself
        return codes

    assert_dies_after_failures(asyncio.run(run()))
    assert server.exit_code == 1


def assert_dies_after_failures(codes: list[int]) -> None:
    assert 2 <= len(codes) <= MAX_FAILED_STEPS and codes[-1] == 503 and set(codes[:-1]) == {500}, codes


def test_back_to_back_requests_complete_despite_slow_empty_steps(tiny_model_dir: Path):
    async def scenario(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
        for i in range(4):
            body = {"prompt": f"request {i}", "max_tokens": 3, "ignore_eos": True}
            response = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=10)
            assert response.json()["usage"]["completion_tokens"] == 3
            await asyncio.sleep(0.05)  # the engine is now inside the slow empty step

    asyncio.run(with_engine(tiny_model_dir, slow_empty_steps_runner, scenario))
