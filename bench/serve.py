"""`shoal bench serve`: an async load generator for any OpenAI-compatible server.

In the spirit of `vllm bench serve`: sessions from `workloads` start all at once
(request rate inf), or as a Poisson process (a finite rate), at most --max-concurrency of
them in flight. Every request streams (with `stream_options.include_usage`); the client
records, per request:

    send ──── TTFT ────> first text chunk ── gap ── chunk ── gap ── ... ── last chunk ─> done
    |<──────────────────────────── E2E latency ──────────────────────────────────────>|

A chunk only counts when it carries text: role-only openings, SSE comments (mlx_lm.server's
keep-alives) and empty finish chunks are not tokens. Output, prompt and cached tokens come
from the final usage chunk; without one, output tokens are the text chunks counted.
The report: TPOT = (E2E - TTFT) / (output tokens - 1) per request, ITL pools every gap.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson

from shoal.bench.workloads import Prompt, Session, Turn

ENDPOINTS: tuple[str, ...] = ("completions", "chat")
MAX_ERROR_CHARS = 300
PROGRESS_INTERVAL_S = 0.5
RETRY_BACKOFF_S = 0.5


@dataclass(frozen=True)
class ServeConfig:
    """Where to send, how to pace it, and the sampling every request uses."""

    base_url: str  # e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    endpoint: str = "completions"
    request_rate: float = math.inf  # sessions started per second (Poisson); inf: all at once
    max_concurrency: int | None = None  # sessions in flight at most
    timeout: float = 600.0  # seconds for the whole run; what is left is cancelled
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0
    progress: bool = True
    max_retries: int = 0  # resends of a request that got no response (connection errors)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if not self.request_rate > 0 or not self.timeout > 0:
            raise ValueError("request_rate and timeout must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def url(self) -> str:
        root = self.base_url.rstrip("/").removesuffix("/v1")
        return f"{root}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"


@dataclass(frozen=True)
class RequestResult:
    """What the client saw of one request; times in seconds from the run's start."""

    kind: str
    success: bool
    start: float
    latency: float
    ttft: float | None = None
    itl: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    usage_reported: bool = False
    retries: int = 0  # resends after connection errors
    error: str = ""
    text: str = field(default="", repr=False)  # the reply, for the next turn; not reported


@dataclass(frozen=True)
class RunResult:
    """Every request's result, how long the run took and how many requests were never sent."""

    results: tuple[RequestResult, ...]
    duration: float
    num_planned: int

    @property
    def num_unsent(self) -> int:
        return self.num_planned - len(self.results)


class StreamRecorder:
    """Folds SSE lines into a RequestResult; `feed` returns True at `data: [DONE]`."""

    def __init__(self, kind: str, run_start: float, start: float):
        self.kind, self.run_start, self.start = kind, run_start, start
        self.times: list[float] = []
        self.texts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.error = ""
        self.retries = 0

    def feed(self, line: str, now: float) -> bool:
        if not line.startswith("data:"):
            return False  # blank separators, SSE comments (keep-alives), event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            return True
        chunk = orjson.loads(payload)
        if "error" in chunk:
            self.error = str(chunk["error"])[:MAX_ERROR_CHARS]
        self.usage = chunk.get("usage") or self.usage
        text = chunk_text(chunk)
        if text:
            self.times.append(now)
            self.texts.append(text)
        return False

    def result(self, now: float) -> RequestResult:
        if self.error:
            return self.failure(self.error, now)
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        ttft = self.times[0] - self.start if self.times else None
        return RequestResult(
            kind=self.kind, success=True, start=self.start - self.run_start,
            latency=now - self.start, ttft=ttft, itl=tuple(np.diff(self.times).tolist()),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", len(self.times))),
            cached_tokens=int(details.get("cached_tokens") or 0),
            usage_reported="completion_tokens" in usage, retries=self.retries, text="".join(self.texts))

    def failure(self, error: str, now: float) -> RequestResult:
        return RequestResult(kind=self.kind, success=False, start=self.start - self.run_start,
                             latency=now - self.start, retries=self.retries, error=error[:MAX_ERROR_CHARS])


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text one stream chunk adds (completions `text`, chat `content` or reasoning)."""
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        text += (choice.get("text") or delta.get("content") or delta.get("reasoning_content")
                 or delta.get("reasoning") or "")
    return text


def request_body(config: ServeConfig, session: Session, history: list[tuple[Prompt, str]],
                 turn: Turn) -> dict[str, Any]:
    """The JSON body for `turn`, resending the system prompt and every earlier exchange."""
    body: dict[str, Any] = {
        "model": config.model, "max_tokens": turn.max_tokens, "temperature": config.temperature,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": config.ignore_eos}
    # No `seed`: mlx_lm.server drains its whole batch before a seeded request.
    if config.endpoint == "chat":
        body["messages"] = chat_messages(session, history, turn)
    else:
        body["prompt"] = completion_prompt(session, history, turn)
    return body


def chat_messages(session: Session, history: list[tuple[Prompt, str]],
                  turn: Turn) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": session.system}] if session.system else []
    for user, reply in history:
        messages += [{"role": "user", "content": str(user)}, {"role": "assistant", "content": reply}]
    if not isinstance(turn.user, str):
        raise ValueError("token-id prompts need the completions endpoint")
    return [*messages, {"role": "user", "content": turn.user}]


def completion_prompt(session: Session, history: list[tuple[Prompt, str]],
                      turn: Turn) -> str | list[int]:
    if not isinstance(turn.user, str):
        return list(turn.user)  # random workload with token ids: single turn, no system
    parts = [session.system] if session.system else []
    for user, reply in history:
        parts += [str(user), reply]
    return "\n".join([*parts, turn.user])


async def send_request(client: httpx.AsyncClient, config: ServeConfig, body: dict[str, Any],
                       kind: str, run_start: float) -> RequestResult:
    """Stream one request to the end; errors become failed results, never exceptions.

    A request that got no response at all (connection refused or reset before the status
    line) is sent again up to config.max_retries times after 0.5 s, 1 s, ... as the OpenAI
    SDK does; its TTFT and latency still count from the first attempt."""
    recorder = StreamRecorder(kind, run_start, time.perf_counter())
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    request = client.build_request("POST", config.url, json=body, headers=headers)
    for attempt in range(config.max_retries + 1):
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            if attempt == config.max_retries or isinstance(exc, httpx.TimeoutException):
                return recorder.failure(f"{type(exc).__name__}: {exc}", time.perf_counter())
            recorder.retries += 1
            await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
            continue
        try:
            return await read_stream(response, recorder)
        finally:
            await response.aclose()
    raise AssertionError("unreachable")


async def read_stream(response: httpx.Response, recorder: StreamRecorder) -> RequestResult:
    try:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            return recorder.failure(f"HTTP {response.status_code}: {detail}", time.perf_counter())
        async for line in response.aiter_lines():
            if recorder.feed(line, time.perf_counter()):
                break
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        return recorder.failure(f"{type(exc).__name__}: {exc}", time.perf_counter())
    return recorder.result(time.perf_counter())


class Run:
    """One benchmark run's shared state: the client, the concurrency slots, the results."""

    def __init__(self, config: ServeConfig, client: httpx.AsyncClient):
        self.config, self.client = config, client
        self.slots = asyncio.Semaphore(config.max_concurrency or sys.maxsize)
        self.results: list[RequestResult] = []
        self.start = time.perf_counter()

    async def session(self, session: Session) -> None:
        """Send a session's turns in order; a failed turn ends the session."""
        history: list[tuple[Prompt, str]] = []
        async with self.slots:
            for turn in session.turns:
                body = request_body(self.config, session, history, turn)
                try:
                    result = await send_request(self.client, self.config, body, session.kind,
                                                self.start)
                except asyncio.CancelledError:
                    now = time.perf_counter()
                    self.results.append(RequestResult(session.kind, False, now - self.start, 0.0,
                                                      error="cancelled: run timeout"))
                    raise
                self.results.append(result)
                if not result.success:
                    return
                history.append((turn.user, result.text))

    async def launch(self, sessions: list[Session], tasks: list[asyncio.Task]) -> None:
        """Start sessions all at once, or with exponential gaps at the configured rate."""
        rng = np.random.default_rng(self.config.seed)
        for i, session in enumerate(sessions):
            tasks.append(asyncio.create_task(self.session(session)))
            if math.isfinite(self.config.request_rate) and i + 1 < len(sessions):
                await asyncio.sleep(rng.exponential(1.0 / self.config.request_rate))

    async def progress(self, total: int) -> None:
        while True:
            write_progress(self.results, total, time.perf_counter() - self.start)
            await asyncio.sleep(PROGRESS_INTERVAL_S)


def write_progress(results: list[RequestResult], total: int, elapsed: float) -> None:
    done = sum(r.success for r in results)
    failed = len(results) - done
    tokens = sum(r.output_tokens for r in results)
    sys.stderr.write(f"\r  {done}/{total} done, {failed} failed, {elapsed:6.1f}s, "
                     f"{done / max(elapsed, 1e-9):5.2f} req/s, {tokens / max(elapsed, 1e-9):7.1f} tok/s ")
    sys.stderr.flush()


async def run_sessions(config: ServeConfig, sessions: list[Session]) -> RunResult:
    """Run every session against the server; stops at config.timeout, never hangs."""
    total = sum(s.num_requests for s in sessions)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        run = Run(config, client)
        tasks: list[asyncio.Task] = []
        progress = asyncio.create_task(run.progress(total)) if config.progress else None
        try:
            await asyncio.wait_for(drain(run, sessions, tasks), timeout=config.timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            for task in [*tasks, *([progress] if progress else [])]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - run.start
        if progress is not None:
            write_progress(run.results, total, duration)
            sys.stderr.write("\n")
    return RunResult(tuple(run.results), duration, total)


async def drain(run: Run, sessions: list[Session], tasks: list[asyncio.Task]) -> None:
    await run.launch(sessions, tasks)
    await asyncio.gather(*tasks)


def run_benchmark(config: ServeConfig, sessions: list[Session]) -> RunResult:
    """Synchronous entry point: `run_sessions` on a fresh event loop."""
    return asyncio.run(run_sessions(config, sessions))


def result_dicts(run: RunResult) -> list[dict[str, Any]]:
    """Per-request records for JSON (the reply text left out)."""
    return [{k: v for k, v in asdict(r).items() if k != "text"} for r in run.results]
