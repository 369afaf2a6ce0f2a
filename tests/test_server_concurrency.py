"""Concurrency over real HTTP: 32 streaming clients at once, each getting exactly the text
its request gets when sent alone (the server runs reference BLAS, so batching changes no
bit); then 10 of 50 in-flight clients leave and every KV block comes back."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric  # noqa: E402

pytest_plugins = ["server_util"]
NUM_CLIENTS = 32


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Client {i}: " + "wave " * (i % 7)}]


async def greedy_stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
    stream = await client.chat.completions.create(
        model="tiny", messages=prompt(i), temperature=0, max_tokens=8 + i % 24, stream=True,
        stream_options={"include_usage": True})
    text, finish, tokens = "", "", 0
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens


def test_32_concurrent_streams_equal_their_solo_runs(tiny_server: Server):
    async def run() -> tuple[list, list]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=60)
        client = openai.AsyncOpenAI(base_url=tiny_server.url("/v1"), api_key="x", max_retries=0,
                                    http_client=http)
        solo = [await greedy_stream(client, i) for i in range(NUM_CLIENTS)]
        together = await asyncio.gather(*(greedy_stream(client, i) for i in range(NUM_CLIENTS)))
        await client.close()
        return solo, together

    solo, together = asyncio.run(run())
    assert all(tokens > 0 and finish in ("stop", "length") for _, finish, tokens in solo)
    assert sum(finish == "length" for _, finish, _ in solo) > NUM_CLIENTS // 2  # mostly full length
    for i, (alone, batched) in enumerate(zip(solo, together)):
        assert batched == alone, f"client {i} diverged when batched"


async def leave_stream_early(http: httpx.AsyncClient, url: str, body: dict) -> int:
    """Read two SSE events, then drop the connection."""
    events = 0
    async with http.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
    return events


async def leave_on_timeout(http: httpx.AsyncClient, url: str, body: dict) -> str:
    try:
        await http.post(url, json=body, timeout=0.4)
    except httpx.TimeoutException:
        return "timed out"
    return "completed"


async def finish_stream(http: httpx.AsyncClient, url: str, body: dict) -> int:
    """Completion tokens from the usage chunk, once the stream is read to [DONE]."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    async with http.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return orjson.loads(chunks[-2])["usage"]["completion_tokens"]


async def finish_whole(http: httpx.AsyncClient, url: str, body: dict) -> int:
    return (await http.post(url, json=body, timeout=60)).json()["usage"]["completion_tokens"]


def wait_for_idle(server: Server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        idle = (metric(samples, "vllm:num_requests_running") == 0
                and metric(samples, "vllm:num_requests_waiting") == 0
                and metric(samples, "vllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_disconnected_clients_are_aborted_and_free_their_blocks(tiny_server: Server):
    url = tiny_server.url("/v1/completions")
    short = {"model": "tiny", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    # Long enough to be mid-generation when their clients leave (~1.5 ms per token alone).
    long = {"model": "tiny", "max_tokens": 900, "ignore_eos": True}
    before = tiny_server.metrics()

    async def run() -> list:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            jobs = []
            for i in range(50):
                body = {**(long if i % 5 == 0 else short), "prompt": f"client {i} says"}
                kind = (leave_stream_early, leave_on_timeout)[i % 2] if i % 5 == 0 else \
                    (finish_stream, finish_whole)[i % 2]
                jobs.append(kind(http, url, body))
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    leavers = [r for i, r in enumerate(results) if i % 5 == 0]
    stayers = [r for i, r in enumerate(results) if i % 5 != 0]
    assert leavers == [2, "timed out"] * 5
    assert stayers == [12] * 40
    after = wait_for_idle(tiny_server)
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "vllm:num_requests_waiting") == 0
    assert metric(after, "vllm:kv_cache_usage_perc") == 0
    aborted = metric(after, "vllm:request_success_total", finished_reason="abort") - \
        metric(before, "vllm:request_success_total", finished_reason="abort")
    assert aborted == 10
    generated = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    assert 40 * 12 <= generated < 40 * 12 + 10 * 900 // 2  # the leavers stopped early
