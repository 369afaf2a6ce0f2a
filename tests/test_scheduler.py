"""Scheduler semantics fed with fake model outputs: no MLX, milliseconds."""

import numpy as np
import pytest

from shoal.engine.logits_process import step_bias
from shoal.engine.outputs import ModelRunnerOutput
from shoal.engine.request import FinishReason, Request, RequestStatus
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, block_size=4, max_len=200) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_len, block_size=block_size,
                                     num_blocks=num_blocks, enable_prefix_caching=False))


def add(s: Scheduler, rid: str, n: int, max_tokens: int = 8, **kw) -> Request:
    req = Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw), frozenset({EOS}))
    s.add_request(req)
    return req


def step(s: Scheduler, token: int = 7):
    """Schedule, then answer every sampling row with `token`."""
    out = s.schedule()
    result = ModelRunnerOutput(tuple(token if r.sample else None for r in out.scheduled))
    s.update_from_output(out, result)
    return out


def test_budget_chunking_and_running_first():
    s = make_scheduler(budget=10)
    a = add(s, "a", 25)
    out = step(s)
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.scheduled] == [("a", 10, False)]
    b = add(s, "b", 3)
    out = step(s)  # a's next chunk first, then b with what is left
    assert [(r.request_id, len(r.token_ids)) for r in out.scheduled] == [("a", 10)]
    out = step(s)
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.scheduled] == [("a", 5, True), ("b", 3, True)]
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    out = step(s)  # both decode: one token each
    assert [(r.request_id, r.token_ids, r.start_pos) for r in out.scheduled] == [("a", (7,), 25), ("b", (7,), 3)]
    assert all(o.num_batched_tokens <= 10 for o in [out])


def test_max_num_seqs_and_fcfs():
    s = make_scheduler(max_seqs=2)
    reqs = [add(s, f"r{i}", 4) for i in range(4)]
    out = step(s)
    assert [r.request_id for r in out.scheduled] == ["r0", "r1"]
    assert [r.status for r in reqs] == [RequestStatus.RUNNING] * 2 + [RequestStatus.WAITING] * 2


def test_preempts_latest_admitted_requeues_at_head_and_recomputes():
    # 6 usable blocks of 4 tokens; three requests of 8 tokens take 2 blocks each.
    s = make_scheduler(num_blocks=7, budget=64, max_len=24)
    a, b, c = add(s, "a", 8, max_tokens=20), add(s, "b", 8, max_tokens=20), add(s, "c", 8, max_tokens=20)
    step(s)
    assert s.pool.num_free_blocks == 0
    out = step(s)  # a needs a third block: c (last admitted) is preempted; nothing new admitted
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert s.waiting[0] is c and s.stats.num_preemptions == 1
    assert [r.request_id for r in out.scheduled] == ["a", "b"]
    assert c.output_token_ids == [7]  # kept: recompute covers prompt + outputs
    while True:  # c comes back and recomputes all 9 known tokens from position 0
        out = step(s)
        resumed = [r for r in out.scheduled if r.request_id == "c"]
        if resumed:
            assert (len(resumed[0].token_ids), resumed[0].start_pos) == (9, 0)
            break
    while s.has_work():
        step(s)
    assert c.num_tokens == 24 and c.finish_reason == FinishReason.LENGTH  # max_model_len
    assert s.pool.num_free_blocks == 6


def test_stop_conditions_and_blocks_freed():
    s = make_scheduler()
    r_len = add(s, "len", 4, max_tokens=1)
    r_eos = add(s, "eos", 4, max_tokens=5)
    r_stop = add(s, "stop", 4, max_tokens=5, stop_token_ids=(9,), ignore_eos=True)
    r_ign = add(s, "ign", 4, max_tokens=2, ignore_eos=True)
    step(s, token=7)
    step(s, token=EOS)
    assert r_len.finish_reason == FinishReason.LENGTH and r_len.num_output_tokens == 1
    assert r_eos.finish_reason == FinishReason.STOP and r_eos.output_token_ids == [7, EOS]
    assert r_ign.finish_reason == FinishReason.LENGTH  # EOS ignored, then max_tokens
    step(s, token=9)
    assert r_stop.finish_reason == FinishReason.STOP and r_stop.stop_reason == 9
    assert not s.has_work() or s.schedule().scheduled == ()
    assert s.pool.num_free_blocks == 63


def test_min_tokens_bans_eos_and_stop_ids():
    s = make_scheduler()
    add(s, "a", 4, max_tokens=5, min_tokens=2, stop_token_ids=(9,))
    out = s.schedule()
    assert banned(out) == {EOS, 9}
    s.update_from_output(out, ModelRunnerOutput((7,)))
    out = s.schedule()  # masks are filled between schedule() and update_from_output()
    assert banned(out) == {EOS, 9}
    s.update_from_output(out, ModelRunnerOutput((7,)))
    assert banned(s.schedule()) == set()


def banned(out) -> set[int]:
    """The ids the step's logits processors mask for the first row."""
    bias, _ = step_bias(out.scheduled, 32)
    return set() if bias is None else set(np.flatnonzero(np.isinf(bias[0])).tolist())


def test_max_model_len_stops_and_rejects():
    s = make_scheduler(max_len=10)
    with pytest.raises(ValueError):
        add(s, "long", 10)
    assert s.pool.num_free_blocks == 63 and not s.has_work()
    r = add(s, "a", 8, max_tokens=100)
    while s.has_work():
        step(s)
    assert r.num_tokens == 10 and r.finish_reason == FinishReason.LENGTH


def test_abort_waiting_and_running_frees_and_ignores_late_output():
    s = make_scheduler()
    a, b = add(s, "a", 4), add(s, "b", 4)
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # aborted while its step runs
    outputs = s.update_from_output(out, ModelRunnerOutput((7, 7)))
    assert [o.request.request_id for o in outputs] == ["b"] and a.output_token_ids == []
    assert a.finish_reason == FinishReason.ABORT
    c = add(s, "c", 4)
    s.finish_requests(["c", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert c.finish_reason == FinishReason.ABORT and list(s.waiting) == []
    assert s.schedule().finished_request_ids == ("a", "c")
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert s.pool.num_free_blocks == 63


def test_step_never_exceeds_limits_and_nothing_starves():
    s = make_scheduler(num_blocks=20, budget=16, max_seqs=3, max_len=40)
    reqs = [add(s, f"r{i}", 3 + 5 * (i % 4), max_tokens=6) for i in range(12)]
    steps = 0
    while s.has_work():
        out = step(s)
        assert out.num_batched_tokens <= 16 and len(out.scheduled) <= 3 and len(s.running) <= 3
        steps += 1
        assert steps < 500
    assert all(r.num_output_tokens == 6 for r in reqs)
    assert s.pool.num_free_blocks == 19


def prompt_tokens(out) -> int:
    return sum(max(0, min(r.start_pos + len(r.token_ids), r.num_prompt_tokens) - r.start_pos)
               for r in out.scheduled)


@pytest.mark.parametrize("prefill_budget", [256, 2048])
def test_a_burst_of_arrivals_never_stalls_decoding_requests(prefill_budget):
    """64 prompts of 256 tokens arrive while 8 requests decode: every step still gives each of
    the 8 its token, and (the policy) carries at most `prefill_budget` prompt tokens, so a
    decode step stays short. With the budget at the full step size the same burst fills the
    first steps with ~2,000 prompt tokens each: the stall the policy removes."""
    s = Scheduler(SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=4096,
                                  block_size=16, num_blocks=2000, enable_prefix_caching=False,
                                  prefill_budget_while_decoding=prefill_budget))
    decoders = [add(s, f"d{i}", 8, max_tokens=40) for i in range(8)]
    step(s)  # their prompts: from now on they decode
    burst = [add(s, f"b{i}", 256, max_tokens=4) for i in range(64)]
    most = 0
    while not all(d.status.finished for d in decoders):
        live = {d.request_id for d in decoders if not d.status.finished}
        out = step(s)
        assert live <= {r.request_id for r in out.scheduled}  # no decoder skips a step
        most = max(most, prompt_tokens(out))
    if prefill_budget == 256:
        assert most <= 256
    else:
        assert most > 1000
    while s.has_work():
        step(s)
    assert all(r.num_output_tokens == 4 for r in burst) and all(d.num_output_tokens == 40 for d in decoders)
