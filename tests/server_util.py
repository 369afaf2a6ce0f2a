"""Real servers for the API tests: `python -m shoal serve ...` subprocesses on loopback
ports, started once per session, ready when /health answers, stopped at the end.

Test modules load this file as a plugin (`pytest_plugins = ["server_util"]`) so every
module shares the same session-scoped servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MAX_MODEL_LEN = 1024
TINY_MAX_REQUEST_BYTES = 256 * 1024
TINY_VOCAB = 259  # the random models' byte tokenizer: 256 bytes and 3 specials
API_KEYS = ("key-one", "key-two")


@dataclass(frozen=True)
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """`/metrics` as {'name{label="v",...}': value} (exactly as exposed)."""
        text = httpx.get(self.url("/metrics"), headers=headers, timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels` (0 if absent)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    hits = [v for k, v in samples.items()
            if k.split("{")[0] == name and all(w in k for w in wanted)]
    assert len(hits) <= 1, f"{name} {labels} is ambiguous"
    return hits[0] if hits else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], log_path: Path, timeout: float = 240.0) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SHOAL_API_KEY", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    wait_ready(server, timeout)
    return server


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url("/health"), timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def serve(args: list[str], log_path: Path) -> Iterator[Server]:
    server = start_server(args, log_path)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shoal.bench.random_model import make_random_model

    return make_random_model(tmp_path_factory.mktemp("api-models") / "tiny-llama", "llama",
                             hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128)


def tiny_args(model_dir: Path) -> list[str]:
    # Reference BLAS: a batched float32 row is bit-identical to the same row alone.
    return [str(model_dir), "--blas", "reference", "--max-model-len", str(TINY_MAX_MODEL_LEN),
            "--kv-cache-memory", "64MiB", "--served-model-name", "tiny", "--alias", "tiny-alias",
            "--max-request-bytes", str(TINY_MAX_REQUEST_BYTES)]


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tiny_args(tiny_model_dir), tmp_path_factory.mktemp("logs") / "tiny.log")


@pytest.fixture(scope="session")
def hermes_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model with the hermes tool-call parser (structured output, forced calls)."""
    yield from serve([*tiny_args(tiny_model_dir), "--tool-call-parser", "hermes"],
                     tmp_path_factory.mktemp("logs") / "hermes.log")


@pytest.fixture(scope="session")
def auth_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = [arg for key in API_KEYS for arg in ("--api-key", key)]
    yield from serve([*tiny_args(tiny_model_dir), *keys], tmp_path_factory.mktemp("logs") / "auth.log")


# The scripted "agent" model (bench/scripted_model.py): a prompt ending the generation
# prompt with thinking on gets AGENT_TOOL_SCRIPT, with thinking off AGENT_TEXT_SCRIPT.
AGENT_TOOL_SCRIPT = ["<think>", "The user wants the weather.", "</think>", "\n\nLet me check.",
                     "<tool_call>", '\n{"name": "get_weather", "arguments": ', '{"city": "Paris"}}',
                     "\n</tool_call>"]
AGENT_TEXT_SCRIPT = ["Hello", " from", " Shoal."]
AGENT_MAX_MODEL_LEN = 65536  # the byte tokenizer spends a token per character of Claude Code's prompts


@pytest.fixture(scope="session")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from shoal.bench.scripted_model import make_scripted_model

    model = make_scripted_model(tmp_path_factory.mktemp("api-models") / "agent",
                                {"\n": AGENT_TOOL_SCRIPT, "\n\n": AGENT_TEXT_SCRIPT})
    args = [str(model), "--blas", "reference", "--max-model-len", str(AGENT_MAX_MODEL_LEN),
            "--kv-cache-memory", "64MiB", "--served-model-name", "agent", "--alias", "shoal-capture",
            "--alias", "shoal-tiny"]  # the names in shared/claude-code/captured
    yield from serve(args, tmp_path_factory.mktemp("logs") / "agent.log")


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The built-in default model: no MODEL argument on purpose. Requests that leave
    the temperature out decode greedily (Claude Code sends none)."""
    args = ["--kv-cache-memory", "256MiB", "--max-model-len", "2048",
            "--override-generation-config", '{"temperature": 0}']
    yield from serve(args, tmp_path_factory.mktemp("logs") / "smollm2.log")


def npm_tool(package: str, version: str, binary: str, folder: str) -> Path:
    """`binary` of npm `package`@`version`, installed once under Shoal's cache in `folder`;
    asserts `binary --version` names exactly that version."""
    cache = Path(os.environ.get("SHOAL_CACHE_DIR", Path.home() / ".cache" / "shoal")) / folder
    path = cache / "node_modules" / ".bin" / binary
    if not _npm_version_ok(path, version):
        npm = shutil.which("npm")
        assert npm, f"npm is needed to install {package} (apt-get install nodejs npm)"
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache), f"{package}@{version}"],
                       check=True, timeout=900, stdout=subprocess.DEVNULL)
    assert _npm_version_ok(path, version), f"{path} is not {package} {version}"
    return path


def _npm_version_ok(path: Path, version: str) -> bool:
    if not path.exists():
        return False
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and version in out.stdout.split()
