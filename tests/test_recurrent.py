"""Recurrent layers in the paged engine, on tiny random models of qwen3_5 (Gated DeltaNet
layers beside full attention), lfm2 (short convolutions) and nemotron_h (Mamba-2, attention
without RoPE, MLP layers that keep no cache): each request's state lives in a slot of a fixed
pool, is carried across prompt chunks and is freed at finish, abort and preemption. Greedy
outputs equal mlx-lm's own generate token for token with 16 staggered requests, chunked
prefill and forced preemption, every block and slot free afterwards. qwen3_moe (experts on
every layer) runs the same test."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from shoal.engine.async_engine import AsyncEngine
from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner, StateSpec, cache_kinds, probe_kv_layout
from shoal.engine.sampling_params import SamplingParams

from conftest import random_prompts, reference_greedy
from test_batch_invariance import assert_staggered_matches

FAMILIES = ("qwen3_5", "lfm2", "nemotron_h", "qwen3_moe")
KINDS = {  # each entry of the model's own make_cache()
    "qwen3_5": ("state", "state", "state", None),  # every 4th layer full attention
    "lfm2": ("state", None, "state", "state"),
    "nemotron_h": ("state", None, "state"),  # Mamba, attention, (MLP: no cache), Mamba
    "qwen3_moe": (None,) * 4,
}
POISON_SEED = 666


@pytest.fixture(scope="module")
def families(hybrid_families) -> dict:
    return hybrid_families


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_kinds_and_state_layout(families, family):
    model, _ = families[family]
    assert cache_kinds(model) == KINDS[family]
    layout = probe_kv_layout(model)
    states = [k for k in layout.kinds if isinstance(k, StateSpec)]
    assert len(states) == KINDS[family].count("state")
    assert layout.num_layers == KINDS[family].count(None)
    if family == "qwen3_5":  # conv state (kernel - 1, q+k+v dims), delta state (v heads, Dv, Dk) in float32
        assert states[0].shapes == ((3, 2 * 2 * 32 + 4 * 32), (4, 32, 32))
        assert states[0].nbytes == (3 * 256 + 4 * 32 * 32) * 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_blocks,budget", [(None, 512), (20, 32)], ids=["roomy", "chunked-preempting"])
def test_staggered_batch_matches_mlx_lm_generate(families, family, num_blocks, budget):
    model, tokenizer = families[family]
    prompts = random_prompts(16, 1, 90, vocab=256, seed=5)
    max_tokens = [1 + (7 * i) % 30 for i in range(16)]
    assert sum(len(p) > budget for p in prompts) >= 8 or budget > 90  # chunked prompts
    assert_staggered_matches(model, tokenizer, prompts, max_tokens, num_blocks, budget, 256)


def test_state_slots_come_out_of_the_kv_memory(families):
    model, tokenizer = families["qwen3_5"]
    per_request = probe_kv_layout(model).state_bytes
    config = EngineConfig(max_num_seqs=8, kv_cache_bytes=2**22, max_model_len=256)
    info = ModelRunner.from_model(model, tokenizer, config).info
    assert (info.num_state_slots, info.state_bytes) == (8, 8 * per_request)
    assert info.kv_cache_bytes <= 2**22 and info.kv_cache_bytes > info.state_bytes
    with pytest.raises(ValueError, match="recurrent state"):
        ModelRunner.from_model(model, tokenizer, EngineConfig(max_num_seqs=8, kv_cache_bytes=8 * per_request,
                                                               max_model_len=256))


def test_prefix_caching_is_off_without_state_snapshots(families, caplog):
    """--num-state-snapshots 0: a recurrent model cannot reuse a prefix, says so, stays exact."""
    model, tokenizer = families["lfm2"]
    shared = random_prompts(1, 64, 64, vocab=256, seed=8)[0]
    prompts = [shared + q for q in random_prompts(4, 2, 8, vocab=256, seed=9)]
    expected = [reference_greedy(model, p, 8, tokenizer.eos_token_ids) for p in prompts]
    config = EngineConfig(block_size=16, max_model_len=256, num_state_snapshots=0)
    with caplog.at_level(logging.INFO, logger="shoal"):
        llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    assert "prefix caching is off" in caplog.text
    assert llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8)) == expected
    assert llm.scheduler.kv.num_cache_hits == 0 and not llm.scheduler.pool.enable_caching


def test_snapshot_memory_comes_out_of_the_kv_memory(families):
    model, tokenizer = families["qwen3_5"]
    per_request = probe_kv_layout(model).state_bytes
    config = EngineConfig(max_num_seqs=4, kv_cache_bytes=2**22, max_model_len=256)
    info = ModelRunner.from_model(model, tokenizer, config).info
    left = 2**22 - 4 * per_request  # a quarter of what the state slots leave, by default
    assert info.num_state_snapshots == left // 4 // per_request and info.snapshot_bytes == info.num_state_snapshots * per_request
    assert info.kv_cache_bytes <= 2**22
    info = ModelRunner.from_model(model, tokenizer, replace(config, num_state_snapshots=10)).info
    assert (info.num_state_snapshots, info.snapshot_bytes) == (10, 10 * per_request)
    with pytest.raises(ValueError, match="state snapshots"):
        ModelRunner.from_model(model, tokenizer, replace(config, num_state_snapshots=2**22 // per_request))


def test_a_failed_step_is_rerun_from_the_state_it_started_with(families):
    """A step whose sampling raises (after the forward computed new states) is rerun request
    by request: the others' tokens are still exact, the poisoned request ends with an error,
    an aborted one frees its slot, and every slot is free at the end."""
    model, tokenizer = families["qwen3_5"]
    prompts = random_prompts(6, 5, 40, vocab=256, seed=11)
    expected = [reference_greedy(model, p, 12, tokenizer.eos_token_ids) for p in prompts]
    config = EngineConfig(max_model_len=256, num_blocks=64, max_num_seqs=8)

    class PoisonedSampler:
        def __init__(self, sampler):
            self.sampler = sampler

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def __call__(self, logits, rows, bias):
            if any(r.params.seed == POISON_SEED for r in rows):
                raise ValueError("simulated bad request")
            return self.sampler(logits, rows, bias)

    def make_runner():
        runner = ModelRunner.from_model(model, tokenizer, config)
        runner.sampler = PoisonedSampler(runner.sampler)
        return runner

    async def main():
        engine = await AsyncEngine(config, make_runner).start()
        params = SamplingParams(temperature=0, max_tokens=12)
        streams = [engine.add_request(p, params) for p in prompts]
        await asyncio.sleep(0)
        poison = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=12, seed=POISON_SEED))
        aborted = engine.add_request(prompts[1], params)

        async def tokens(stream, stop_after=None):
            out, error = [], None
            async for delta in stream:
                out += delta.new_token_ids
                error = error or delta.error
                if stop_after and len(out) >= stop_after:
                    break
            return out, error

        results = await asyncio.gather(*[tokens(s) for s in streams], tokens(poison), tokens(aborted, 2))
        for _ in range(100):
            if not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.01)
        states, snaps = engine.scheduler.kv.states, engine.scheduler.kv.snapshots
        free = states.num_free, states.num_slots, engine.scheduler.pool.num_free_blocks
        settled = snaps.num_free + snaps.num_published == snaps.num_snapshots and not snaps._pins
        await engine.shutdown()
        return results, free, settled

    results, (free_slots, num_slots, free_blocks), settled = asyncio.run(main())
    assert [tokens for tokens, _ in results[:6]] == expected
    assert results[6][0] == [] and "simulated bad request" in results[6][1]
    assert free_slots == num_slots == 8 and free_blocks == 63
    assert settled  # no snapshot left reserved by the failed or aborted requests


def test_served_hybrid_model_answers_concurrent_requests_exactly(families, tmp_path):
    """Over the HTTP API (in process): 8 concurrent greedy completions on the qwen3_5 model
    equal mlx-lm's generate for each prompt alone; the longest prompt sent again restores its
    snapshot, and usage and /metrics count exactly the tokens it skipped."""
    import httpx

    from shoal.api.app import create_app
    from shoal.api.config import ServerConfig

    model, tokenizer = families["qwen3_5"]
    prompts = random_prompts(8, 3, 60, vocab=256, seed=21)
    longest = max(range(8), key=lambda i: len(prompts[i]))
    expected = [reference_greedy(model, p, 10, tokenizer.eos_token_ids) for p in prompts]
    config = EngineConfig(max_model_len=256, num_blocks=64, max_num_seqs=4)  # 8 requests, 4 slots

    async def main():
        factory = lambda: AsyncEngine(config, lambda: ModelRunner.from_model(model, tokenizer, config)).start()  # noqa: E731
        app = create_app(ServerConfig(), config, factory)
        async with app.router.lifespan_context(app):
            engine = app.state.server.engine
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
                responses = await asyncio.gather(*[client.post("/v1/completions", json={
                    "prompt": p, "max_tokens": 10, "temperature": 0})
                    for p in prompts])
                again = await client.post("/v1/completions", json={  # the longest prompt once more
                    "prompt": prompts[longest], "max_tokens": 10, "temperature": 0})
                metrics = (await client.get("/metrics")).text
            states = engine.scheduler.kv.states
            return responses + [again], metrics, (states.num_free, states.num_slots)

    responses, metrics, (free, total) = asyncio.run(main())
    prompts, expected = prompts + [prompts[longest]], expected + [expected[longest]]
    for r, want in zip(responses, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == len(want)
        assert body["choices"][0]["text"] == tokenizer.decode([t for t in want if t not in tokenizer.eos_token_ids])
    assert free == total == 4
    hit = (len(prompts[-1]) - 1) // 16 * 16  # the same prompt again: up to its last full block
    assert hit > 0 and responses[-1].json()["usage"]["prompt_tokens_details"]["cached_tokens"] == hit
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith(("vllm:prefix_cache_hits_total{", "shoal:state_snapshot_hits_total{"))}
    assert values == {"vllm:prefix_cache_hits_total": hit, "shoal:state_snapshot_hits_total": 1}

