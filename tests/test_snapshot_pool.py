"""State snapshots for prefix caching on hybrid models, at the pool and scheduler level: fake
model outputs, no MLX. Where snapshots are taken (chunk ends at interval multiples and at the
prompt's last block boundary, then the latest block of the answer), who may read them, and that
every id comes back after aborts, failed steps, preemption and a thousand mixed requests."""

import numpy as np

from shoal.engine.block_pool import BlockPool
from shoal.engine.outputs import ModelRunnerOutput
from shoal.engine.request import Request, RequestStatus
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.snapshot_pool import SnapshotPool

EOS = 0
BS = 4  # tokens per block
INTERVAL = 8  # snapshot interval (two blocks)


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, snapshots=16, max_len=None) -> Scheduler:
    max_len = max_len or (num_blocks - 1) * BS
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                                     block_size=BS, num_blocks=num_blocks, num_state_slots=max_seqs,
                                     num_state_snapshots=snapshots, snapshot_interval=INTERVAL))


def add(s: Scheduler, rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=max_tokens), frozenset({EOS}))
    s.add_request(req)
    return req


def step(s: Scheduler, token: int = 7, abort: tuple[str, ...] = (), fail: tuple[str, ...] = ()):
    """Schedule; abort `abort` while the step runs; answer every row but `fail` (whose share of
    the step raised) with `token`. Returns the SchedulerOutput."""
    out = s.schedule()
    s.finish_requests(abort, RequestStatus.FINISHED_ABORTED)
    ran = tuple(r for r in out.scheduled if r.request_id not in fail)
    s.fail_scheduled([(r, "boom") for r in out.scheduled if r.request_id in fail])
    s.update_from_output(type(out)(ran, sum(len(r.token_ids) for r in ran)),
                         ModelRunnerOutput(tuple(token if r.sample else None for r in ran)))
    return out


def rows(out):
    return [(r.request_id, r.start_pos, r.start_pos + len(r.token_ids), r.restore_snapshot is not None,
             r.take_snapshot is not None) for r in out.scheduled]


def assert_all_free(s: Scheduler) -> None:
    snaps = s.kv.snapshots
    assert s.pool.num_free_blocks == s.pool.num_blocks - 1
    assert s.kv.states.num_free == s.kv.states.num_slots
    assert snaps.num_free + snaps.num_published == snaps.num_snapshots  # nothing reserved or pinned
    assert not snaps._pins and not snaps._dead and not s.kv._takes and not s.kv._inflight


def test_pool_reserve_publish_pin_lru_and_first_writer():
    pool = SnapshotPool(2)
    a, b = pool.reserve(), pool.reserve()
    assert pool.publish(a, "ka") and pool.publish(b, "kb") and pool.num_free == 0
    assert pool.pin("ka") == a  # ka becomes the most recently used, and is held
    c = pool.reserve()  # evicts kb, the least recently used unpinned one
    assert c == b and pool.lookup("kb") is None and pool.num_evictions == 1
    assert pool.reserve() is None  # ka is pinned, c reserved: nothing to give
    assert not pool.publish(c, "ka") and pool.num_free == 1  # first writer of a key wins
    pool.drop("ka")  # its block left the cache while a step reads it: freed at the unpin
    assert pool.lookup("ka") is None and pool.num_free == 1
    pool.unpin(a)
    assert pool.num_free == 2 and pool.usage == 0.0


def test_a_snapshot_dies_with_its_block():
    s = make_scheduler(num_blocks=9)  # 8 usable blocks
    add(s, "a", list(range(1, 18)), max_tokens=1)  # last prompt boundary 16
    while s.has_work():
        step(s)
    snaps = s.kv.snapshots
    keys_a = snaps.published_keys()
    assert len(keys_a) == 2  # at 8 and 16
    add(s, "b", list(range(100, 129)), max_tokens=1)  # needs all 8 blocks: evicts a's cached ones
    while s.has_work():
        step(s)
    assert all(snaps.lookup(k) is None for k in keys_a) and snaps.num_evictions == 2
    assert_all_free(s)


def test_prompt_chunks_end_at_snapshot_boundaries_and_decode_keeps_the_latest():
    s = make_scheduler()
    add(s, "a", list(range(1, 23)), max_tokens=8)  # 22 tokens: last boundary (21 // 4) * 4 = 20
    seen = [rows(step(s)) for _ in range(4)]
    assert seen == [[("a", 0, 8, False, True)], [("a", 8, 16, False, True)], [("a", 16, 20, False, True)],
                    [("a", 20, 22, False, False)]]
    ends = [rows(step(s))[0][2:] for _ in range(7)]  # decodes: 23, 24 (a block), ..., 29
    assert ends == [(23, False, False), (24, False, True), (25, False, False), (26, False, False),
                    (27, False, False), (28, False, True), (29, False, False)]
    assert not s.has_work() or s.schedule().scheduled == ()
    # Kept: 8, 16, 20 (the prompt's) and 28, the answer's latest; 24 was replaced by 28.
    assert s.kv.snapshots.num_published == 4
    assert_all_free(s)


def test_the_next_turn_restores_the_answers_last_snapshot():
    s = make_scheduler()
    a = add(s, "a", list(range(1, 23)), max_tokens=8)
    while s.has_work():
        step(s)
    turn2 = a.all_token_ids + [50, 51, 52]  # the conversation so far, plus a user message
    add(s, "b", turn2, max_tokens=2)
    out = step(s)
    assert rows(out)[0][:4] == ("b", 28, 32, True)  # a's answer ended its last full block at 28
    assert s.requests["b"].num_cached_tokens == 28
    assert s.kv.num_snapshot_hits == 1 and s.kv.num_snapshot_misses == 1


def test_followers_wait_for_the_leaders_snapshot_then_restore_it():
    s = make_scheduler(budget=64)
    shared = list(range(1, 17))
    add(s, "lead", shared + [90, 91, 92, 93])
    add(s, "f1", shared + [70, 71, 72])
    add(s, "f2", shared + [80, 81, 82, 83, 84])
    assert rows(step(s)) == [("lead", 0, 8, False, True)]  # followers held: 8 is being computed
    assert rows(step(s)) == [("lead", 8, 16, False, True)]
    assert rows(step(s)) == [("lead", 16, 20, False, True), ("f1", 16, 19, True, False),
                             ("f2", 16, 20, True, True)]
    while s.has_work():
        step(s)
    assert s.stats.num_cached_prompt_tokens == 32 and s.kv.num_snapshot_hits == 2
    assert_all_free(s)


def test_a_request_that_shares_only_what_is_cached_does_not_wait():
    s = make_scheduler(budget=64)
    add(s, "lead", list(range(1, 41)))  # computes 8, 16, ... while the other is admitted
    add(s, "other", list(range(1, 5)) + [99] * 12)  # shares one block, no snapshot boundary
    assert [r[0] for r in rows(step(s))] == ["lead", "other"]


def test_abort_and_failure_mid_prefill_publish_nothing():
    s = make_scheduler()
    add(s, "a", list(range(1, 30)))
    add(s, "b", list(range(100, 130)))
    out = step(s, abort=("a",), fail=("b",))
    assert [r[4] for r in rows(out)] == [True, True]  # both were to take a snapshot at 8
    assert s.kv.snapshots.num_published == 0
    assert_all_free(s)


def test_a_preempted_request_resumes_from_its_own_snapshot():
    s = make_scheduler(num_blocks=11, budget=64)  # 10 usable blocks
    a = add(s, "a", list(range(1, 23)), max_tokens=5)  # 22 + 5 tokens: 7 blocks at the end
    b = add(s, "b", list(range(200, 216)), max_tokens=12)  # 16 + 12: 4 blocks, then b is preempted
    while b.num_preemptions == 0:
        step(s)
    # a's 7th block evicts b's last (and the snapshot at 16 with it); those at 8 and 12 remain.
    while b.status != RequestStatus.RUNNING:
        out = step(s)
    resumed = [r for r in out.scheduled if r.request_id == "b"][0]
    assert resumed.restore_snapshot is not None and resumed.start_pos == 12
    while s.has_work():
        step(s)
    assert a.num_output_tokens == 5 and b.num_output_tokens == 12
    assert_all_free(s)


def test_a_thousand_mixed_requests_leak_nothing():
    """Shared system prompts, multi-turn follow-ups, aborts mid-prefill and mid-decode, failed
    rows, a pool small enough to preempt and a snapshot pool small enough to evict."""
    rng = np.random.default_rng(0)
    s = make_scheduler(num_blocks=48, budget=40, max_seqs=6, snapshots=6)
    systems = [rng.integers(1, 500, 30).tolist() for _ in range(3)]
    added: list[Request] = []
    for i in range(1000):
        done = [r for r in added[-60:] if r.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)]
        if done and rng.random() < 0.3:  # the next turn of a finished conversation
            tokens = (done[int(rng.integers(len(done)))].all_token_ids + rng.integers(1, 500, 5).tolist())[-120:]
        else:
            tokens = systems[int(rng.integers(3))] + rng.integers(1, 500, int(rng.integers(1, 40))).tolist()
        added.append(add(s, f"r{i}", tokens, max_tokens=int(rng.integers(1, 12))))
        if rng.random() < 0.5:
            running = [r.request_id for r in s.running]
            aborted = tuple(x for x in running if rng.random() < 0.1)
            failed = tuple(x for x in running if rng.random() < 0.05 and x not in aborted)
            step(s, token=int(rng.integers(1, 500)), abort=aborted, fail=failed)
    while s.has_work():
        step(s, token=int(rng.integers(1, 500)))
    assert s.kv.num_snapshot_hits > 50 and s.kv.snapshots.num_evictions > 0 and s.stats.num_preemptions > 0
    assert_all_free(s)
