"""Claude Code itself (npm `@anthropic-ai/claude-code@2.1.332`, headless `claude -p`)
against `shoal serve` on the default SmolLM2 model: each run exits 0 with a non-error
result, and a second run's request is served mostly from the prefix cache.

The package (about 400 MB, its native binary included) is installed from the npm
registry once into ~/.cache/shoal/claude-code; Node 20 needs the version pin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric, npm_tool  # noqa: E402

pytest_plugins = ["server_util"]
VERSION = "2.1.332"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def claude() -> Path:
    return npm_tool("@anthropic-ai/claude-code", VERSION, "claude", "claude-code")


def run_claude(claude: Path, server: Server, tmp_path: Path, prompt: str) -> dict:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": server.base_url,
           "ANTHROPIC_API_KEY": "not-checked", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "8192",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256"}
    out = subprocess.run(
        [str(claude), "-p", prompt, "--output-format", "json", "--bare", "--model", MODEL,
         "--permission-mode", "acceptEdits", "--allowedTools", "Write,Edit,Read,Bash"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"claude exited {out.returncode}: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["type"] == "result" and result["subtype"] == "success", result
    assert result["is_error"] is False and result["result"].strip(), result
    return result


def test_claude_code_runs_and_its_second_turn_hits_the_prefix_cache(claude, smollm2_server: Server,
                                                                    tmp_path: Path):
    first = run_claude(claude, smollm2_server, tmp_path, "What is the capital of France?")
    assert "Paris" in first["result"]
    hits_before = metric(smollm2_server.metrics(), "vllm:prefix_cache_hits_total")
    second = run_claude(claude, smollm2_server, tmp_path, "What is the capital of France?")
    usage = second["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] >= 0.6 * prompt, usage
    hits = metric(smollm2_server.metrics(), "vllm:prefix_cache_hits_total") - hits_before
    assert hits >= usage["cache_read_input_tokens"]
