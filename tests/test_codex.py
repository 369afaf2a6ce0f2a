"""Codex itself (npm `@openai/codex@0.171.0`, headless `codex exec`) against `shoal serve` on
the default SmolLM2 model over the Responses API: two runs in one folder both exit 0 with a
final message, the second served mostly from the prefix cache (its time to first token a
small fraction of the first's); `--output-schema` gives JSON that validates.

The package (its native binary included) is installed from the npm registry once into
~/.cache/shoal/codex. Codex's prompt (a 17 KB system prompt, tools, environment) is about
4,300 SmolLM2 tokens, so the server runs with SmolLM2's whole 8k window and Codex is told
that window (`model_context_window`), since it assumes a large one for unknown models."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric, npm_tool, serve  # noqa: E402

pytest_plugins = ["server_util"]
VERSION = "0.171.0"
MODEL = "SmolLM2-135M-Instruct"
CONTEXT_WINDOW = 8192
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["capital", "country"],
          "properties": {"capital": {"type": "string"}, "country": {"type": "string"}}}
CONFIG = """\
model = "{model}"
model_provider = "shoal"
model_context_window = {window}

[model_providers.shoal]
name = "Shoal"
base_url = "{base_url}/v1"
env_key = "SHOAL_KEY"
wire_api = "responses"
stream_max_retries = 0
request_max_retries = 0
"""


@pytest.fixture(scope="module")
def codex() -> Path:
    return npm_tool("@openai/codex", VERSION, "codex", "codex")


@pytest.fixture(scope="module")
def codex_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The built-in default model with its whole window; greedy, as Codex sends no temperature."""
    args = ["--kv-cache-memory", "512MiB", "--max-model-len", str(CONTEXT_WINDOW),
            "--override-generation-config", '{"temperature": 0}']
    yield from serve(args, tmp_path_factory.mktemp("logs") / "codex.log")


def run_codex(codex: Path, server: Server, tmp_path: Path, prompt: str, *extra: str) -> tuple[dict, str]:
    """One headless turn: (its turn.completed usage, the final message)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    (home / "config.toml").write_text(CONFIG.format(model=MODEL, window=CONTEXT_WINDOW,
                                                    base_url=server.base_url))
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home), "SHOAL_KEY": "not-checked"}
    last = tmp_path / "last.txt"
    out = subprocess.run([str(codex), "exec", "--json", "--skip-git-repo-check", "--ephemeral",
                          "-s", "read-only", "-o", str(last), *extra, prompt],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"codex exited {out.returncode}: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    completed = [e for e in events if e["type"] == "turn.completed"]
    assert len(completed) == 1, events
    message = last.read_text().strip()
    assert message, events
    return completed[0]["usage"], message


def time_to_first_token(server: Server) -> tuple[float, float]:
    samples = server.metrics()
    return (metric(samples, "vllm:time_to_first_token_seconds_sum"),
            metric(samples, "vllm:time_to_first_token_seconds_count"))


def test_codex_runs_twice_and_its_second_turn_hits_the_prefix_cache(codex, codex_server: Server,
                                                                    tmp_path: Path):
    start = time_to_first_token(codex_server)
    _, first = run_codex(codex, codex_server, tmp_path, "What is the capital of France?")
    assert "Paris" in first
    middle = time_to_first_token(codex_server)
    hits_before = metric(codex_server.metrics(), "vllm:prefix_cache_hits_total")
    usage, second = run_codex(codex, codex_server, tmp_path, "What is the capital of France?")
    assert second
    assert usage["input_tokens"] > 3000 and usage["cached_input_tokens"] >= 0.9 * usage["input_tokens"], usage
    hits = metric(codex_server.metrics(), "vllm:prefix_cache_hits_total") - hits_before
    assert hits >= usage["cached_input_tokens"]
    end = time_to_first_token(codex_server)
    assert middle[1] - start[1] == 1 and end[1] - middle[1] == 1  # one request per turn
    first_ttft, second_ttft = middle[0] - start[0], end[0] - middle[0]
    print(f"Codex TTFT: first turn {first_ttft:.2f} s, second {second_ttft:.2f} s "
          f"({second_ttft / first_ttft:.1%}); prompt {usage['input_tokens']} tokens, "
          f"{usage['cached_input_tokens']} cached")
    assert second_ttft <= 0.25 * first_ttft


def test_codex_output_schema_gives_valid_json(codex, codex_server: Server, tmp_path: Path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    _, message = run_codex(codex, codex_server, tmp_path, "What is the capital of France? Answer as JSON.",
                           "--output-schema", str(schema))
    jsonschema.validate(json.loads(message), SCHEMA)
