"""Tensor parallel 2 on CPU over mx.distributed's ring backend (loopback): `shoal serve
--tensor-parallel-size 2` starts its second rank itself; each rank holds half the attention
heads (one of the tiny llama's two KV heads) and half of each MLP. 16 concurrent greedy
requests through a pool small enough to preempt, chunked prefill and a prefix hit give the
unsharded model's own tokens; a rank killed mid-service takes the server to exit code 1 with
an error for the request in flight, not a hang. Pipeline parallel 2 (`--pipeline-parallel-size`)
on a hybrid qwen3_5 model (each rank four layers, three Gated DeltaNet and one attention, with
their state slots) gives the unsharded model's tokens too, with prefix hits restored from state
snapshots on both ranks."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import random_prompts, reference_greedy

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric, start_server, stop_server, tiny_args  # noqa: E402

pytest_plugins = ["server_util"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tp_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    args = [*tiny_args(tiny_model_dir), "--tensor-parallel-size", "2", "--max-model-len", "256",
            "--num-blocks", "24", "--max-num-batched-tokens", "64", "--max-num-seqs", "16"]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "tp.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    from mlx_lm import load

    return load(str(tiny_model_dir))


def complete(server: Server, prompt: list[int]) -> dict:
    response = httpx.post(server.url("/v1/completions"), timeout=120,
                          json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def workers_of(server: Server) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.process.pid)], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def assert_concurrent_match(server: Server, model, tokenizer, prompts: list[list[int]]) -> None:
    """All prompts at once through the server: mlx-lm's greedy tokens of the unsharded model."""
    expected = [reference_greedy(model, p, MAX_TOKENS, tokenizer.eos_token_ids) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: complete(server, p), prompts))
    for i, (body, want) in enumerate(zip(results, expected)):
        assert body["usage"]["completion_tokens"] == len(want), f"request {i}"
        text = tokenizer.decode([t for t in want if t not in tokenizer.eos_token_ids])
        assert body["choices"][0]["text"] == text, f"request {i} diverged from the unsharded model"


def test_16_concurrent_requests_match_the_unsharded_model(tp_server: Server, reference):
    prompts = random_prompts(16, 1, 90, vocab=256, seed=31)
    assert_concurrent_match(tp_server, *reference, prompts)
    samples = tp_server.metrics()
    assert metric(samples, "vllm:num_preemptions_total") > 0, "the 24-block pool should force preemption"
    again = complete(tp_server, prompts[0] + prompts[1])  # shares prompts[0]'s full blocks when cached
    hit = complete(tp_server, prompts[0] + prompts[1])
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * ((len(prompts[0]) + len(prompts[1]) - 1) // 16)
    assert hit["choices"][0]["text"] == again["choices"][0]["text"]
    info = httpx.get(tp_server.url("/server_info"), timeout=10).json()
    assert info["tp_size"] == 2


def test_a_lost_rank_ends_the_server_with_an_error(tiny_model_dir: Path, tmp_path: Path):
    """Rank 1 killed while a request streams: the stream ends with an error event (the step
    that hung on the dead peer is abandoned), and rank 0 exits 1 instead of hanging."""
    args = [*tiny_args(tiny_model_dir), "--tensor-parallel-size", "2", "--max-model-len", "1024"]
    server = start_server(args, tmp_path / "tp-dies.log")
    try:
        assert complete(server, [1, 2, 3])["usage"]["completion_tokens"] == MAX_TOKENS
        (worker,) = workers_of(server)
        body = {"prompt": [1, 2, 3], "max_tokens": 1000, "ignore_eos": True, "stream": True}
        frames = []
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as response:
            for line in response.iter_lines():
                frames.append(line)
                if len(frames) == 10:
                    subprocess.run(["kill", "-KILL", str(worker)], check=True)
        data = [f[6:] for f in frames if f.startswith("data: ")]
        assert data[-1] == "[DONE]" and '"error"' in data[-2] and "tensor-parallel rank is gone" in data[-2]
        assert len(data) < 500  # cut short, not run to max_tokens
        assert server.process.wait(timeout=30) == 1
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()


def test_pipeline_parallel_hybrid_model_matches_the_unsharded_model(tmp_path: Path):
    from mlx_lm import load

    from shoal.bench.random_model import make_random_model

    model_dir = make_random_model(tmp_path / "qwen3_5", "qwen3_5", hidden_size=64, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64)
    args = [str(model_dir), "--blas", "reference", "--pipeline-parallel-size", "2", "--max-model-len", "256",
            "--max-num-batched-tokens", "64", "--max-num-seqs", "4"]
    server = start_server(args, tmp_path / "pp.log")
    try:
        model, tokenizer = load(str(model_dir))
        prompts = random_prompts(8, 1, 60, vocab=256, seed=41)
        assert_concurrent_match(server, model, tokenizer, prompts)
        # Each rank restores the same snapshot ids into its own layers' states.
        longest = max(prompts, key=len)
        assert_concurrent_match(server, model, tokenizer, [longest, longest + [5, 6, 7]])
        assert len(longest) > 16 and metric(server.metrics(), "shoal:state_snapshot_hits_total") >= 2
        assert httpx.get(server.url("/server_info"), timeout=10).json()["pp_size"] == 2
    finally:
        stop_server(server)
    assert server.process.returncode == 0 and not workers_of(server)
