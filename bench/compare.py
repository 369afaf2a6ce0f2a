"""`shoal bench compare`: Shoal and its peers, side by side, over real HTTP.

Each repeat starts every server on its own free loopback port (same model directory, same
BLAS), waits for /health and warms each up; then at every concurrency level each server
runs the same sessions, one server at a time, the order flipping from level to level and
repeat to repeat. An idle server costs nothing measurable (well under 1% of a core), and
back-to-back pairs mean that load from other jobs on a shared machine hits both alike.
Ratios are taken pair by pair, then summarised as a median with a min-max spread.

    repeat 0:  c=1: shoal, mlx_lm   c=4: mlx_lm, shoal   c=8: shoal, mlx_lm ...
    repeat 1:  c=1: mlx_lm, shoal   c=4: shoal, mlx_lm   ...

Servers are restarted for every repeat (cold caches) and always stopped (SIGINT, then
SIGKILL of their process group), also on Ctrl-C, SIGTERM or an error. Results (JSON after
every measurement, markdown, PNG, server logs) go to one directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx

from shoal.bench.report import Grid, Summary, plot, render_markdown, summarize
from shoal.bench.serve import ServeConfig, run_benchmark
from shoal.bench.workloads import Session, TextSource, WorkloadConfig, build_sessions

SERVER_KINDS: tuple[str, ...] = ("shoal", "shoal-no-prefix-caching", "shoal-no-cascade",
                                 "shoal-full-prefill", "mlx_lm", "vllm_mlx")
SHOAL_VARIANTS = {"shoal": (), "shoal-no-prefix-caching": ("--no-prefix-caching",),
                  "shoal-no-cascade": ("--attention-backend", "gather"),
                  # the scheduling before the prefill budget: prompts take the whole step budget
                  "shoal-full-prefill": ("--prefill-budget-while-decoding", "2048")}
SHOAL_MODEL_NAME = "bench"
STOP_GRACE_S = 15.0
# Counters read from /metrics before and after each measurement (vLLM names).
COUNTERS: dict[str, str] = {
    "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits", "vllm:num_preemptions_total": "preemptions",
    "vllm:iteration_tokens_total_sum": "iteration_tokens"}


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: argv with a `{port}` placeholder, and the model name to send."""

    name: str
    argv: tuple[str, ...]
    model_name: str
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CompareConfig:
    """A whole comparison: servers, levels, repeats and the workload each level runs."""

    model_dir: str
    servers: tuple[ServerSpec, ...]
    concurrencies: tuple[int, ...] = (1, 4, 8, 16, 32)
    repeats: int = 3
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    prompts_per_client: int = 4  # each level sends concurrency * this many prompts ...
    min_prompts: int = 8  # ... but at least this many
    endpoint: str = "completions"
    timeout: float = 600.0  # per measurement
    max_retries: int = 2  # as the OpenAI SDK: mlx_lm.server's listen backlog is 5
    startup_timeout: float = 300.0
    results_dir: Path = Path("bench/results/compare")
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.servers or not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("need at least one server and concurrency levels >= 1")
        if min(self.repeats, self.prompts_per_client, self.min_prompts) < 1 or self.max_retries < 0:
            raise ValueError("repeats, prompts_per_client and min_prompts must be >= 1, max_retries >= 0")
        if len({s.name for s in self.servers}) != len(self.servers):
            raise ValueError("each server may appear once")
        if self.workload.prompt_ids and any(not s.name.startswith("shoal") for s in self.servers):
            raise ValueError("token-id prompts: mlx_lm.server and vllm-mlx take text prompts only")

    def num_prompts(self, concurrency: int) -> int:
        return max(self.min_prompts, concurrency * self.prompts_per_client)


@dataclass(frozen=True)
class Record:
    """One measurement: a server at one concurrency in one repeat."""

    server: str
    concurrency: int
    repeat: int
    summary: Summary
    server_metrics: dict[str, float] | None  # /metrics deltas; None for servers without it


def default_servers() -> tuple[str, ...]:
    """shoal and mlx_lm, plus vllm_mlx when it is installed."""
    return ("shoal", "mlx_lm") + (("vllm_mlx",) if importlib.util.find_spec("vllm_mlx") else ())


def blas_library(blas: str) -> str | None:
    """The shared library Shoal would preload for --blas, so peers can LD_PRELOAD the same."""
    from shoal.engine.platform import find_openblas

    if sys.platform != "linux" or blas == "reference":
        return None
    return find_openblas() if blas == "auto" else blas


def server_spec(name: str, model_dir: str, blas: str, shoal_args: tuple[str, ...] = ()) -> ServerSpec:
    """The command line for one of SERVER_KINDS, listening on 127.0.0.1:{port}."""
    loopback = ("--host", "127.0.0.1", "--port", "{port}")
    if name in SHOAL_VARIANTS:
        extra = SHOAL_VARIANTS[name]
        argv = (sys.executable, "-m", "shoal", "serve", model_dir, *loopback, "--served-model-name",
                SHOAL_MODEL_NAME, "--blas", blas, *extra, *shoal_args)
        return ServerSpec(name, argv, SHOAL_MODEL_NAME)
    library = blas_library(blas)
    env = (("LD_PRELOAD", library),) if library else ()
    if name == "mlx_lm":
        argv = (sys.executable, "-m", "mlx_lm.server", "--model", model_dir, *loopback)
        return ServerSpec(name, argv, "default_model", env)
    if name == "vllm_mlx":  # its console script is vllm_mlx.cli:main; batching is opt-in
        argv = (sys.executable, "-c", "import sys; from vllm_mlx.cli import main; sys.exit(main())",
                "serve", model_dir, *loopback, "--continuous-batching")
        return ServerSpec(name, argv, model_dir, env)
    raise ValueError(f"unknown server {name!r}; expected one of {SERVER_KINDS}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess in its own process group; a context manager that always stops it."""

    def __init__(self, spec: ServerSpec, log_path: Path, startup_timeout: float):
        self.spec, self.log_path, self.startup_timeout = spec, log_path, startup_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        argv = [a.replace("{port}", str(self.port)) for a in self.spec.argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(self.spec.env)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.spec.name} not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT to the process group, SIGKILL if it lingers; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""


def scrape_counters(base_url: str) -> dict[str, float] | None:
    """The COUNTERS from /metrics (summed over labels), or None if the server has no metrics."""
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=10, trust_env=False)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or "vllm:" not in response.text:
        return None
    values = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in response.text.splitlines():
        key, _, value = line.rpartition(" ")
        name = key.partition("{")[0]
        if not line.startswith("#") and name in COUNTERS:
            values[COUNTERS[name]] += float(value)
    return values


def counter_deltas(before: dict[str, float] | None, after: dict[str, float] | None,
                   num_completed: int) -> dict[str, float] | None:
    """after - before, plus prefill computed two ways: prompt - prefix hits, and step tokens
    minus decode inputs (each request feeds back all its output tokens but the last)."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before[k] for k in after}
    delta["prefill_computed"] = delta["prompt_tokens"] - delta["prefix_cache_hits"]
    delta["prefill_computed_steps"] = delta["iteration_tokens"] - (delta["generation_tokens"] - num_completed)
    return delta


def warm_up(server: ServerProcess, source: TextSource, config: CompareConfig) -> None:
    """Two short requests, unrecorded; raises if they fail (a broken server measures nothing)."""
    workload = WorkloadConfig("random", num_prompts=2, input_len=16, output_len=4, seed=10_000)
    serve = ServeConfig(server.base_url, server.spec.model_name, config.endpoint, max_concurrency=2,
                        timeout=min(config.timeout, 300.0), progress=False, max_retries=config.max_retries)
    run = run_benchmark(serve, build_sessions(workload, source))
    failures = [r.error for r in run.results if not r.success]
    if failures or run.num_unsent:
        raise RuntimeError(f"{server.spec.name} failed its warm-up: {failures}\n{server.log_tail()}")


def measure(server: ServerProcess, sessions: list[Session], concurrency: int, repeat: int,
            config: CompareConfig) -> Record:
    serve = ServeConfig(server.base_url, server.spec.model_name, config.endpoint,
                        max_concurrency=concurrency, timeout=config.timeout, progress=config.progress,
                        max_retries=config.max_retries)
    before = scrape_counters(server.base_url)
    summary = summarize(run_benchmark(serve, sessions))
    deltas = counter_deltas(before, scrape_counters(server.base_url), summary.num_completed)
    return Record(server.spec.name, concurrency, repeat, summary, deltas)


class Comparison:
    """The measurement loop and its bookkeeping: sessions per level, records, files."""

    def __init__(self, config: CompareConfig, source: TextSource, meta: dict[str, Any]):
        self.config, self.source, self.meta = config, source, meta
        self.records: list[Record] = []
        self.sessions: dict[int, list[Session]] = {}

    def level_sessions(self, concurrency: int) -> list[Session]:
        """The same sessions for every server and repeat at a level; new prompts per level."""
        if concurrency not in self.sessions:
            workload = replace(self.config.workload, num_prompts=self.config.num_prompts(concurrency),
                               seed=self.config.workload.seed + concurrency)
            self.sessions[concurrency] = build_sessions(workload, self.source)
        return self.sessions[concurrency]

    def run(self) -> None:
        for repeat in range(self.config.repeats):
            with ExitStack() as stack:
                servers = [stack.enter_context(ServerProcess(spec, self.log_path(spec, repeat),
                                                             self.config.startup_timeout))
                           for spec in self.config.servers]
                for server in servers:
                    warm_up(server, self.source, self.config)
                for i, concurrency in enumerate(self.config.concurrencies):
                    order = servers if (repeat + i) % 2 == 0 else servers[::-1]
                    for server in order:
                        self.measure(server, concurrency, repeat)

    def log_path(self, spec: ServerSpec, repeat: int) -> Path:
        return self.config.results_dir / "logs" / f"{spec.name}-r{repeat}.log"

    def measure(self, server: ServerProcess, concurrency: int, repeat: int) -> None:
        record = measure(server, self.level_sessions(concurrency), concurrency, repeat, self.config)
        self.records.append(record)
        print(progress_line(record), flush=True)
        self.save_json()

    def save_json(self) -> Path:
        path = self.config.results_dir / "compare.json"
        body = {"meta": self.meta, "config": config_dict(self.config),
                "records": [asdict(r) for r in self.records]}
        path.write_text(json.dumps(body, indent=1, default=str))
        return path

    def grid(self) -> Grid:
        grid: Grid = {s.name: {} for s in self.config.servers}
        for r in sorted(self.records, key=lambda r: r.repeat):
            grid[r.server].setdefault(r.concurrency, []).append(r.summary)
        return {name: levels for name, levels in grid.items() if levels}

    def write_report(self) -> str:
        """compare.md and compare.png from the records so far; returns the markdown."""
        grid = self.grid()
        png = plot(grid, self.config.results_dir / "compare.png", title_line(self.config))
        markdown = render_markdown(title_line(self.config), self.meta, grid, self.metric_deltas(), png)
        (self.config.results_dir / "compare.md").write_text(markdown)
        return markdown

    def metric_deltas(self) -> dict[str, dict[int, list[dict[str, float]]]]:
        deltas: dict[str, dict[int, list[dict[str, float]]]] = {}
        for r in self.records:
            if r.server_metrics is not None:
                deltas.setdefault(r.server, {}).setdefault(r.concurrency, []).append(r.server_metrics)
        return deltas


def progress_line(r: Record) -> str:
    s = r.summary
    ttft = "-" if s.ttft.p50_ms is None else f"{s.ttft.p50_ms:.0f}"
    return (f"[repeat {r.repeat}] {r.server:>24} c={r.concurrency:<3} {s.num_completed} ok "
            f"{s.num_failed + s.num_unsent} failed  {s.output_throughput:7.1f} out tok/s  "
            f"TTFT p50 {ttft} ms  {s.duration_s:.1f}s")


def title_line(config: CompareConfig) -> str:
    w = config.workload
    shape = {"random": f"random {w.input_len} in / {w.output_len} out",
             "swarm": f"swarm: {w.system_len}-token system prompt, {w.input_len}-token turns, {w.output_len} out",
             "multiturn": f"multiturn: {w.num_turns} turns of {w.input_len} tokens, {w.output_len} out",
             "mixed": f"mixed: {w.input_len}/{w.output_len} chats, {w.long_fraction:.0%} "
                      f"{w.long_input_len}/{w.long_output_len} long prompts"}[w.name]
    return f"{shape}; {config.endpoint}; {Path(config.model_dir).name}; repeats {config.repeats}"


def config_dict(config: CompareConfig) -> dict[str, Any]:
    body = asdict(config)
    body["results_dir"] = str(config.results_dir)
    return body


def machine_meta(blas: str) -> dict[str, Any]:
    from importlib.metadata import version

    def ver(name: str) -> str:
        try:
            return version(name)
        except Exception:  # not installed, or metadata unreadable
            return "-"
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "mlx": ver("mlx"), "mlx_lm": ver("mlx-lm"), "shoal": ver("shoal"), "blas": blas,
            "blas_library": blas_library(blas)}


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit so `finally` blocks (server shutdown) run."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_comparison(config: CompareConfig, source: TextSource, blas: str) -> str:
    """Run everything, write JSON/markdown/PNG to config.results_dir; returns the markdown.
    On an interruption the partial results are still written, then the exception re-raised."""
    config.results_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(config, source, machine_meta(blas))
    try:
        with sigterm_raises():
            comparison.run()
    finally:
        comparison.save_json()
        markdown = comparison.write_report() if comparison.records else ""
    return markdown
