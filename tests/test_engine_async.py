"""AsyncEngine: streams, abort, stop strings, exactly one terminal event, no leaks."""

import asyncio

import pytest

from shoal.engine.async_engine import MAX_FAILED_STEPS, AsyncEngine
from shoal.engine.config import EngineConfig
from shoal.engine.model_runner import ModelRunner
from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams

from conftest import random_prompts, reference_greedy


async def start_engine(model, tokenizer, **kw) -> AsyncEngine:
    config = EngineConfig(max_model_len=256, **kw)
    return await AsyncEngine(config, lambda: ModelRunner.from_model(model, tokenizer, config)).start()


async def collect(stream, stop_after: int | None = None):
    """All deltas of a stream; with stop_after, leave after that many (a disconnect)."""
    deltas = []
    async for out in stream:
        deltas.append(out)
        if stop_after is not None and len(deltas) >= stop_after:
            break
    return deltas


def test_abort_10_of_100_others_exact_and_no_leaks(loaded):
    model, tokenizer = loaded["llama"]
    prompts = random_prompts(100, 1, 60, vocab=256, seed=3)
    expected = [reference_greedy(model, p, 24, tokenizer.eos_token_ids) for p in prompts]
    aborted = set(range(5, 100, 10))

    async def main():
        engine = await start_engine(model, tokenizer, num_blocks=200, max_num_seqs=32)
        streams = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=False)) for p in prompts]
        results = await asyncio.gather(*[collect(s, 2 if i in aborted else None) for i, s in enumerate(streams)])
        for _ in range(50):  # aborted streams finish on the next loop turn
            if not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.01)
        stats = engine.scheduler.pool.num_free_blocks, engine.scheduler.pool.num_blocks, engine._streams
        await engine.shutdown()
        return streams, results, stats

    streams, results, (free, total, live) = asyncio.run(main())
    assert free == total - 1 and live == {}
    for i, (stream, deltas) in enumerate(zip(streams, results)):
        if i in aborted:
            queued = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
            terminal = [d for d in deltas + queued if d.finished]
            assert len(terminal) == 1, f"request {i}: {len(terminal)} terminal events"
            continue
        assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
        tokens = [t for d in deltas for t in d.new_token_ids]
        assert tokens == expected[i], f"request {i} diverged"
        assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert deltas[-1].num_output_tokens == len(tokens)
    assert sum(s.request.finish_reason == FinishReason.ABORT for s in streams) >= 8


def test_stop_string_truncates_and_stops(loaded):
    model, tokenizer = loaded["llama"]
    prompt = random_prompts(1, 20, 20, vocab=256, seed=4)[0]

    async def run(params):
        engine = await start_engine(model, tokenizer, num_blocks=64)
        deltas = await collect(engine.add_request(prompt, params))
        free = engine.scheduler.pool.num_free_blocks
        await engine.shutdown()
        return deltas, free

    full, _ = asyncio.run(run(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    text = "".join(d.new_text for d in full)
    stop = text[10:13]
    cut, free = asyncio.run(run(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,))))
    got = "".join(d.new_text for d in cut)
    assert got == text[:text.find(stop)]
    assert cut[-1].finish_reason == FinishReason.STOP and cut[-1].stop_reason == stop
    assert cut[-1].num_output_tokens < 30 and free == 63


def test_rejects_bad_prompts_before_touching_the_pool(loaded):
    model, tokenizer = loaded["llama"]

    async def main():
        engine = await start_engine(model, tokenizer, num_blocks=64)
        errors = []
        for prompt in ([], [1] * 256, [1, 10_000]):
            with pytest.raises(ValueError) as info:
                engine.add_request(prompt, SamplingParams())
            errors.append(str(info.value))
        state = engine.scheduler.pool.num_free_blocks, engine.scheduler.num_unfinished
        await engine.shutdown()
        return errors, state

    errors, (free, unfinished) = asyncio.run(main())
    assert "empty" in errors[0] and "max_model_len" in errors[1] and "vocab" not in errors[1]
    assert free == 63 and unfinished == 0


def test_engine_error_fails_every_stream_once(loaded):
    model, tokenizer = loaded["llama"]

    async def main():
        engine = await start_engine(model, tokenizer, num_blocks=64)

        def broken(sched):
            raise RuntimeError("device lost")
        engine.runner.execute = broken
        streams = [engine.add_request([1, 2, 3], SamplingParams(max_tokens=5)) for _ in range(3)]
        results = await asyncio.gather(*[collect(s) for s in streams])
        # Each request failed alone; the loop dies after MAX_FAILED_STEPS failing steps in a row.
        tries = 0
        while engine.is_alive and tries < MAX_FAILED_STEPS:
            results.append(await collect(engine.add_request([4, 5], SamplingParams(max_tokens=5))))
            tries += 1
        alive = engine.is_alive
        await engine.shutdown()
        return results, alive

    results, alive = asyncio.run(main())
    assert not alive and len(results) < 3 + MAX_FAILED_STEPS
    for deltas in results:
        assert len(deltas) == 1 and deltas[0].finished and deltas[0].finish_reason == FinishReason.ERROR
        assert "device lost" in deltas[0].error
