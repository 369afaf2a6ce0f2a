"""vLLM-v1-style scheduler: one token budget per step covers decodes, prefill chunks,
prefix hits and recompute after preemption. Pure Python: no MLX, no asyncio.

Each step: running requests first (oldest first), each taking the tokens it has not
computed yet; when blocks run out, the most recently admitted running request is
preempted (blocks freed, recomputed later). Then, if nothing was preempted, waiting
requests are admitted in FCFS order with what is left of the budget. While any request
decodes, prompt tokens (chunks, admissions, recompute) get at most
`prefill_budget_while_decoding` of it, so decodes keep a bounded step time under a burst.
A partial prompt chunk still exhausts what prompt budget there is, so a request that shares
a prefix still being computed is admitted only in a later step, once those blocks exist.

Models with recurrent layers hit the prefix cache where a state snapshot exists: their prompt
chunks end at snapshot boundaries (the state is only known at a chunk's end), and a waiting
request whose prompt another running request is computing up to such a boundary waits for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.engine.block_pool import BlockPool
from shoal.engine.config import SpeculativeConfig
from shoal.engine.kv_cache_manager import KVCacheManager
from shoal.engine.logits_process import ConstraintError, ProcessorFactory, default_processors
from shoal.engine.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, StepOutput
from shoal.engine.request import Request, RequestStatus
from shoal.engine.spec_decode.ngram import NgramProposer


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int  # including the null block
    enable_prefix_caching: bool = True
    # Prompt tokens per step while any request decodes (max_num_batched_tokens when none does).
    prefill_budget_while_decoding: int = 512
    num_state_slots: int = 0  # models with recurrent layers: one state slot per running request
    num_state_snapshots: int = 0  # of those models, states kept at block boundaries for prefix hits
    snapshot_interval: int = 512  # tokens between snapshots in a long prompt (rounded to blocks)
    speculative: SpeculativeConfig | None = None  # n-gram drafts for decoding rows

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.prefill_budget_while_decoding < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and prefill_budget_while_decoding must be >= 1")
        if (self.num_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV pool holds {(self.num_blocks - 1) * self.block_size} tokens, fewer than "
                f"max_model_len={self.max_model_len}: raise the KV memory or lower max_model_len")


@dataclass
class SchedulerCounters:
    """Running totals; the engine's StatsCollector turns them into per-step stats."""

    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    num_cached_prompt_tokens: int = 0  # of those, hits in the prefix cache
    num_generation_tokens: int = 0
    num_computed_tokens: int = 0  # tokens run through the model, recompute included
    num_steps: int = 0  # steps that ran at least one token
    num_spec_drafts: int = 0  # decode rows that carried draft tokens
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # drafts accepted at position i


class Scheduler:
    def __init__(self, config: SchedulerConfig, processors: ProcessorFactory = default_processors):
        self.config = config
        self._make_processors = processors
        self.pool = BlockPool(config.num_blocks, config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, config.block_size, config.num_state_slots,
                                 config.num_state_snapshots, config.snapshot_interval)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerCounters()
        spec = config.speculative
        self.proposer = (NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
                         if spec is not None else None)
        if spec is not None:
            self.stats.spec_accepted_per_pos = [0] * spec.num_speculative_tokens
        self._finished_ids: list[str] = []  # told to the runner at the next step

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_ids)

    def add_request(self, request: Request) -> None:
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt of {request.num_tokens} tokens leaves no room to generate "
                             f"within max_model_len={self.config.max_model_len}")
        request.processors = self._make_processors(request)  # may raise ValueError
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        # While some request decodes, prompt tokens (chunks, admissions, recompute) share a
        # smaller budget, so a burst of arrivals cannot turn every decode step into a long
        # prefill step: decodes keep flowing at a bounded inter-token latency.
        decoding = any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        prefill_budget = min(budget, self.config.prefill_budget_while_decoding) if decoding else budget
        scheduled: list[ScheduledRequest] = []
        preempted = False
        speculating = (self.proposer is not None
                       and len(self.running) < self.config.speculative.disable_by_batch_size)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            drafts = self._propose(request, budget - 1) if speculating and num_new == 1 else ()
            num_new += len(drafts)
            prefilling = num_new > 1 and not drafts  # a prompt chunk or a recompute: the prefill budget applies
            if prefilling:
                num_new = min(num_new, prefill_budget)
                if num_new == 0:
                    i += 1
                    continue
            while not self.kv.allocate_slots(request, num_new):
                if drafts:  # no room for them: decode plainly, and preempt only if that fails too
                    num_new, drafts = 1, ()
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new, drafts))
                budget -= num_new
                if prefilling:
                    prefill_budget -= num_new
                i += 1
        if not preempted:
            self._admit_waiting(min(budget, prefill_budget), scheduled)
        return self._make_output(scheduled)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        held: list[Request] = []  # waiting for a snapshot another request is computing
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request)
            if self.kv.prefix_in_flight(request, len(hits)):
                held.append(self.waiting.popleft())
                continue
            num_cached = len(hits) * self.config.block_size
            num_new = self._num_new_tokens(request, budget, num_cached)
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            self.kv.record_lookup(request.num_tokens, num_cached, request.status == RequestStatus.WAITING)
            self.kv.register_prefill(request, len(hits))
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
                self.stats.num_prompt_tokens += request.num_prompt_tokens
                self.stats.num_cached_prompt_tokens += num_cached
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(held))

    def _num_new_tokens(self, request: Request, budget: int, start: int | None = None) -> int:
        start = request.num_computed_tokens if start is None else start
        num_new = min(request.num_tokens - start, budget)
        boundary = self.kv.next_boundary(request, start)  # recurrent models: end at a snapshot
        return num_new if boundary is None else min(num_new, boundary - start)

    def _propose(self, request: Request, room: int) -> tuple[int, ...]:
        """Draft tokens for a decoding row that samples plainly (no penalties, processors,
        logprobs, logit_bias or stop strings: their per-token state stays exact without
        speculation), bounded by the step budget, max_tokens and max_model_len."""
        params = request.params
        if (request.processors or params.uses_penalties or params.logprobs or params.logit_bias
                or params.stop):
            return ()
        room = min(room, params.max_tokens - request.num_output_tokens - 1,
                   self.config.max_model_len - request.num_tokens - 1)
        return self.proposer.propose(request.all_token_ids, room) if room > 0 else ()

    def _preempt(self, request: Request) -> None:
        self.kv.free(request, preempted=True)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, num_new: int, drafts: tuple[int, ...] = ()) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new - len(drafts)  # drafts come after the known tokens
        params = request.params
        sample = end == request.num_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_slice(start, end) + drafts,
            num_draft_tokens=len(drafts),
            start_pos=start,
            block_ids=tuple(self.kv.block_ids(request.request_id)),
            sample=sample,
            params=params,
            history=tuple(request.all_token_ids) if params.uses_penalties else None,
            num_prompt_tokens=request.num_prompt_tokens,
            processors=tuple(request.processors) if sample else (),
            state_slot=self.kv.states.slot(request.request_id) if self.kv.states else -1,
            restore_snapshot=self.kv.pop_restore(request.request_id),
            take_snapshot=self.kv.plan_snapshot(request, end),
        )

    def _make_output(self, scheduled: list[ScheduledRequest]) -> SchedulerOutput:
        for s in scheduled:
            self.requests[s.request_id].num_computed_tokens += len(s.token_ids)
        num_tokens = sum(len(s.token_ids) for s in scheduled)
        self.stats.num_computed_tokens += num_tokens
        if scheduled:
            self.stats.num_steps += 1
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(scheduled=tuple(scheduled), num_batched_tokens=num_tokens,
                               finished_request_ids=finished)

    def update_from_output(self, sched: SchedulerOutput,
                           result: ModelRunnerOutput) -> list[StepOutput]:
        """Append sampled tokens, apply stop checks, free finished requests' blocks. A row
        whose constraint failed ends with its error (an output with no tokens)."""
        if self.kv.snapshots is not None:
            self.kv.end_step({s.request_id for s in sched.scheduled
                              if (r := self.requests.get(s.request_id)) is not None and r.status == RequestStatus.RUNNING})
        outputs = []
        for request_id, why in result.errors:
            request = self.requests.get(request_id)
            if request is not None and not request.status.finished:
                request.error = why
                self._finish(request, RequestStatus.FINISHED_ERROR)
                outputs.append(StepOutput(request, ()))
        for s, token, logprobs in zip(sched.scheduled, result.sampled_token_ids,
                                      result.logprobs or [None] * len(sched.scheduled)):
            request = self.requests.get(s.request_id)
            # Aborted while the step ran, or a chunk that did not reach the end: nothing to emit.
            if request is None or request.status != RequestStatus.RUNNING or token is None:
                continue
            tokens = token if isinstance(token, tuple) else (token,)
            if s.num_draft_tokens:
                self._accept_drafts(request, s, len(tokens) - 1)
            emitted = self._append(request, tokens)
            outputs.append(StepOutput(request, emitted, (logprobs,) if logprobs else ()))
        return outputs

    def _append(self, request: Request, tokens: tuple[int, ...]) -> tuple[int, ...]:
        """Append sampled tokens one by one, each checked for a stop; returns those kept."""
        for n, token in enumerate(tokens, start=1):
            request.append_output_token(token)
            self.stats.num_generation_tokens += 1
            status = self._advance_processors(request, token) or self._check_stop(request, token)
            if status is not None:
                self._finish(request, status)
                return tokens[:n]
        return tokens

    def _accept_drafts(self, request: Request, s: ScheduledRequest, accepted: int) -> None:
        """Roll back the rejected drafts: their positions are computed again later, and
        blocks that hold only them go back to the pool (they were never cached)."""
        stats = self.stats
        stats.num_spec_drafts += 1
        stats.num_spec_draft_tokens += s.num_draft_tokens
        stats.num_spec_accepted_tokens += accepted
        for i in range(accepted):
            stats.spec_accepted_per_pos[i] += 1
        request.num_computed_tokens -= s.num_draft_tokens - accepted
        self.kv.trim(request, request.num_computed_tokens + 1)

    @staticmethod
    def _advance_processors(request: Request, token: int) -> RequestStatus | None:
        done = False
        try:
            for processor in request.processors:
                done |= processor.accept(token)
        except ConstraintError as exc:
            request.error = str(exc)
            return RequestStatus.FINISHED_ERROR
        return RequestStatus.FINISHED_STOPPED if done else None  # a grammar is complete

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        # EOS and stop ids below min_tokens never get here: MinTokensProcessor bans them.
        params = request.params
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= params.max_tokens
                or request.num_tokens >= self.config.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside the step (abort, stop string, error). Unknown or
        already finished ids are ignored."""
        done = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            self._finish(request, status)
            done.append(request)
        return done

    def fail_scheduled(self, failed: Iterable[tuple[ScheduledRequest, str]]) -> list[tuple[Request, str]]:
        """Finish with an error the requests whose share of a step raised, with their message.
        The blocks that step was writing lose their hashes first (even for a request aborted
        meanwhile), so no later prompt reuses what was never computed."""
        out = []
        for s, message in failed:
            self._uncache_written(s)
            request = self.requests.get(s.request_id)
            if request is None or request.status.finished:
                continue
            request.error = message
            self._finish(request, RequestStatus.FINISHED_ERROR)
            out.append((request, message))
        return out

    def recompute_readers_of_failed(self, kept: list[ScheduledRequest],
                                    failed: list[ScheduledRequest]) -> set[str]:
        """Preempt (for recompute) every kept row whose table holds a block a failed row was
        writing, transitively; returns their ids."""
        bad = {b for s in failed for b in self._written_blocks(s)}
        tainted: set[str] = set()
        changed = bool(bad)
        while changed:
            changed = False
            for s in kept:
                if s.request_id not in tainted and bad.intersection(s.block_ids):
                    tainted.add(s.request_id)
                    bad.update(self._written_blocks(s))
                    changed = True
        for s in kept:
            if s.request_id in tainted:
                self._uncache_written(s)
                request = self.requests.get(s.request_id)
                if request is not None and request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                    self._preempt(request)
        return tainted

    def _written_blocks(self, s: ScheduledRequest) -> tuple[int, ...]:
        return s.block_ids[s.start_pos // self.config.block_size:]

    def _uncache_written(self, s: ScheduledRequest) -> None:
        self.pool.uncache(self.pool.blocks[b] for b in self._written_blocks(s))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.processors = []
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

