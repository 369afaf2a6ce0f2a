"""A shared server against slow, ambiguous, greedy and impatient clients, over real HTTP:
slow-loris heads and bodies are cut off, ambiguous framing is refused and the connection
closed, a full queue answers 429 / 529, a huge /tokenize does not stall streams, CORS
preflights pass, and SIGTERM drains: every stream in flight gets its terminal event."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric, serve, start_server, tiny_args  # noqa: E402

pytest_plugins = ["server_util"]
ORIGIN = "https://app.example"
HARD_FLAGS = ["--header-timeout", "1", "--body-timeout", "1", "--max-request-bytes", "8MiB",
              "--max-num-seqs", "1", "--max-waiting-requests", "2", "--allowed-origins", f'["{ORIGIN}"]']


@pytest.fixture(scope="module")
def hard_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve([*tiny_args(tiny_model_dir), *HARD_FLAGS], tmp_path_factory.mktemp("logs") / "hard.log")


def connect(server: Server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (raises on a timeout)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def is_closed(sock: socket.socket) -> bool:
    try:
        sock.settimeout(0.05)
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_trickling_request_heads_are_closed_after_the_header_timeout(hard_server: Server):
    socks = [connect(hard_server) for _ in range(40)]
    for sock in socks[:20]:  # a head sent a byte at a time, never finished
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    open_ones = list(socks)
    while open_ones and time.monotonic() - start < 4:
        for sock in socks[:20]:
            try:
                sock.sendall(b"X")
            except OSError:
                pass
        open_ones = [s for s in open_ones if not is_closed(s)]
        time.sleep(0.2)
    assert not open_ones, f"{len(open_ones)} of {len(socks)} still open after {time.monotonic() - start:.1f} s"
    assert httpx.get(hard_server.url("/health"), timeout=5).status_code == 200
    for sock in socks:
        sock.close()


def test_a_body_that_never_arrives_gets_408_and_the_connection_closes(hard_server: Server):
    sock = connect(hard_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    start = time.monotonic()
    reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 1 s" in reply and b"RequestTimeoutError" in reply
    assert 0.8 < time.monotonic() - start < 4


def test_content_length_with_transfer_encoding_is_refused_and_closed(hard_server: Server):
    sock = connect(hard_server)
    body = b'{"prompt": "a", "max_tokens": 1}'
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"both Content-Length and Transfer-Encoding" in reply
    assert reply.count(b"HTTP/1.1") == 1  # answered once, then closed: nothing smuggled through


def test_a_full_queue_answers_429_and_anthropic_529(hard_server: Server):
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=hard_server.base_url, timeout=60) as client:
            long = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=long) as running, \
                    client.stream("POST", "/v1/completions", json=long) as waiting_1, \
                    client.stream("POST", "/v1/completions", json=long) as waiting_2:
                assert {running.status_code, waiting_1.status_code, waiting_2.status_code} == {200}
                refused = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
                assert refused.status_code == 429, refused.text
                error = refused.json()["error"]
                assert error["type"] == "RateLimitError" and "--max-waiting-requests 2" in error["message"]
                assert refused.headers["retry-after"] == "1"
                anthropic = await client.post("/v1/messages", json={
                    "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
                assert anthropic.status_code == 529
                assert anthropic.json() == {"type": "error", "error": {
                    "type": "overloaded_error", "message": error["message"]}}
            # Leaving the streams aborted them: the queue is free again.
            for _ in range(100):
                ok = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
                if ok.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert ok.status_code == 200

    asyncio.run(scenario())


def test_a_huge_tokenize_does_not_stall_streams(hard_server: Server):
    """6 MB through /tokenize while a stream runs: the stream's longest gap stays small (the
    tokenizer runs off the event loop; it once froze every stream for seconds)."""
    async def scenario() -> tuple[float, float, int]:
        async with httpx.AsyncClient(base_url=hard_server.base_url, timeout=120) as client:
            body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            arrivals: list[float] = []
            started = asyncio.Event()

            async def stream() -> None:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            arrivals.append(time.monotonic())
                            started.set()

            streaming = asyncio.create_task(stream())
            await started.wait()
            t0 = time.monotonic()
            big = await client.post("/tokenize", json={"prompt": "word " * (6 * 2**20 // 5)})
            t1 = time.monotonic()
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            during = [b - a for a, b in zip(arrivals, arrivals[1:]) if t0 <= b <= t1]
            return max(during, default=0.0), t1 - t0, big.json()["count"]

    longest_gap, tokenize_s, count = asyncio.run(scenario())
    assert count >= 6 * 2**20 // 2  # the byte tokenizer: about a token a byte
    assert longest_gap < max(0.5, tokenize_s / 4), (longest_gap, tokenize_s)


def test_cors_preflight_and_simple_request(hard_server: Server):
    preflight = httpx.options(hard_server.url("/v1/chat/completions"), headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=10)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    response = httpx.get(hard_server.url("/v1/models"), headers={"Origin": ORIGIN}, timeout=10)
    assert response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(hard_server.url("/v1/chat/completions"), headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


async def open_streams(server: Server, n: int, max_tokens: int) -> tuple[list[asyncio.Task], list[list[str]]]:
    """n streams, each started (first chunk received) before this returns."""
    frames: list[list[str]] = [[] for _ in range(n)]
    started = [asyncio.Event() for _ in range(n)]

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            body = {"prompt": f"stream {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        frames[i].append(line[6:])
                        started[i].set()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
    return tasks, frames


def drain_run(tiny_model_dir: Path, log_path: Path, drain_timeout: str, max_tokens: int,
              sig: signal.Signals) -> tuple[list[list[str]], int, list[BaseException | None]]:
    server = start_server([*tiny_args(tiny_model_dir), "--drain-timeout", drain_timeout], log_path)

    async def scenario() -> tuple[list[list[str]], list[BaseException | None]]:
        tasks, frames = await open_streams(server, 10, max_tokens)
        server.process.send_signal(sig)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        return frames, list(results)

    try:
        frames, results = asyncio.run(scenario())
        code = server.process.wait(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    return frames, code, results


def test_a_draining_replica_takes_no_new_work(tiny_model_dir: Path, tmp_path: Path):
    """SIGTERM with streams in flight: an idle keep-alive connection is closed at once and new
    connections are refused (a gateway routes elsewhere), while the streams still finish."""
    server = start_server([*tiny_args(tiny_model_dir), "--drain-timeout", "60", "--keep-alive-timeout", "60"],
                          tmp_path / "d.log")

    async def scenario() -> list[list[str]]:
        idle = connect(server)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")  # now an idle keep-alive connection
        tasks, frames = await open_streams(server, 4, 900)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert read_until_closed(idle, timeout=1) == b""  # closed by the drain (keep-alive is 60 s)
        assert not all(t.done() for t in tasks)  # ... while the streams are still running
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url("/health"), timeout=2)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        return frames

    try:
        frames = asyncio.run(scenario())
        assert server.process.wait(timeout=30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    for stream in frames:
        assert stream[-1] == "[DONE]" and orjson.loads(stream[-2])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_lets_streams_in_flight_finish(tiny_model_dir: Path, tmp_path: Path, sig):
    frames, code, results = drain_run(tiny_model_dir, tmp_path / "drain.log", "60", 150, sig)
    assert code == 0 and results == [None] * 10, (code, results)
    for stream in frames:
        assert stream[-1] == "[DONE]"
        assert orjson.loads(stream[-2])["choices"][0]["finish_reason"] == "length"
        text = "".join(orjson.loads(f)["choices"][0]["text"] for f in stream[:-1])
        assert text  # every token came


def test_drain_past_its_grace_ends_every_stream_with_an_error_event(tiny_model_dir: Path, tmp_path: Path):
    frames, code, results = drain_run(tiny_model_dir, tmp_path / "cut.log", "0.5", 1000, signal.SIGTERM)
    assert code == 0 and results == [None] * 10, (code, results)
    for stream in frames:
        assert stream[-1] == "[DONE]"
        error = orjson.loads(stream[-2])["error"]
        assert "shutting down" in error["message"], stream[-2]
    log = (tmp_path / "cut.log").read_text()
    assert "ending 10 requests" in log


def test_a_disconnect_storm_leaves_counters_exact_and_every_block_free(tiny_server: Server):
    """100 streams at once: 50 are dropped by their clients after the first token (they
    cannot have finished: 1,000 tokens each), 50 run to their length limit."""
    before = tiny_server.metrics()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            async def one(i: int) -> None:
                quit_early = i % 2 == 0
                body = {"prompt": f"storm {i}", "max_tokens": 900 if quit_early else 5,
                        "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and quit_early:
                            return  # leaving the block closes the connection mid-stream

            await asyncio.gather(*(one(i) for i in range(100)))

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = tiny_server.metrics()
        if metric(after, "vllm:num_requests_running") == 0 and metric(after, "vllm:num_requests_waiting") == 0:
            break
        time.sleep(0.1)
    delta = {reason: metric(after, "vllm:request_success_total", finished_reason=reason)
             - metric(before, "vllm:request_success_total", finished_reason=reason)
             for reason in ("abort", "length", "stop", "error")}
    assert delta == {"abort": 50, "length": 50, "stop": 0, "error": 0}
    assert metric(after, "vllm:kv_cache_usage_perc") == 0.0  # every block back in the pool


def test_every_labelled_series_exists_from_startup(hard_server: Server):
    samples = hard_server.metrics()
    for reason in ("stop", "length", "abort", "error"):
        assert f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="tiny"}}' in samples
    for name in ("vllm:request_max_num_generation_tokens_count", "vllm:request_params_n_count",
                 "vllm:request_params_max_tokens_count", "vllm:request_inference_time_seconds_count",
                 "vllm:request_time_per_output_token_seconds_count", "vllm:prompt_tokens_cached_total",
                 "vllm:num_requests_waiting"):
        assert f'{name}{{engine="0",model_name="tiny"}}' in samples, name
    assert samples["process_resident_memory_bytes"] > 0
    info = [k for k in samples if k.startswith("vllm:cache_config_info{")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and samples[info[0]] == 1.0
