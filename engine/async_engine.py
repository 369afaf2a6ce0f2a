"""The asyncio face of the engine: a step-loop task, per-request streams, abort.

    HTTP handlers --generate()--> Scheduler (asyncio thread) --SchedulerOutput--> MLX thread
         ^                                                                        |
         '---- per-request asyncio.Queue <-- detokenize, stop strings <-- ModelRunnerOutput

The scheduler, block pool and streams are touched only on the event loop; the runner only on
its one MLX thread. Every request's stream ends with exactly one finished delta (stop,
length, abort or error).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shoal.engine.config import EngineConfig
from shoal.engine.llm import make_scheduler
from shoal.engine.model_runner import ModelInfo, ModelRunner
from shoal.engine.output_processor import RequestDetokenizer
from shoal.engine.outputs import ModelRunnerOutput, RequestOutput, SchedulerOutput, StepOutput
from shoal.engine.request import Request, RequestStatus
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler
from shoal.engine.structured_output import StructuredOutput
from shoal.engine.stats import StatLogger, StatsCollector, finished_request_stats

log = logging.getLogger("shoal")
MAX_FAILED_STEPS = 3  # steps in a row where every request failed alone: the engine is broken


class EngineDeadError(RuntimeError):
    """The step loop died (or the server is draining); the engine takes no more requests."""


class EngineDrainingError(EngineDeadError):
    """The server is shutting down: requests in flight finish, new ones go elsewhere."""


class DeviceLostError(RuntimeError):
    """Raised by a runner that can never run a step again (a tensor-parallel rank is gone):
    the engine dies at once instead of failing requests one by one."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting; try again later."""


@dataclass
class RequestTimes:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class RequestStream:
    """A request's deltas. Iterate it once; leaving early (disconnect, cancel) aborts it."""

    __slots__ = ("request", "queue", "detok", "finished", "times", "_abort")

    def __init__(self, request: Request, detok: RequestDetokenizer, abort: Callable[[str], None]):
        self.request = request
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.detok = detok
        self.finished = False
        self.times = RequestTimes(request.arrival_time)
        self._abort = abort

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                output = await self.queue.get()
                yield output
                if output.finished:
                    return
        finally:
            if not self.finished:
                self._abort(self.request.request_id)


def load_runner(config: EngineConfig) -> ModelRunner:
    if config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1:
        from shoal.engine.distributed import rank0_runner

        return rank0_runner(config)
    return ModelRunner.load(config)


class AsyncEngine:
    def __init__(self, config: EngineConfig, runner_factory: Callable[[], ModelRunner] | None = None):
        self.config = config
        self._runner_factory = runner_factory or (lambda: load_runner(config))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shoal-mlx")
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = asyncio.Event()
        self._ids = itertools.count()
        self._loop_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.dead_error: BaseException | None = None
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self.stat_loggers: list[StatLogger] = []  # told what each step did (engine/stats.py)
        self._stats = StatsCollector()
        self._failed_steps = 0  # steps in a row in which every request failed
        self.draining = False

    async def start(self) -> AsyncEngine:
        self.runner = await self._on_mlx(self._runner_factory)
        self.scheduler, self.structured = make_scheduler(self.config, self.runner)
        await asyncio.to_thread(self.structured.warm)  # so requests never build it on the loop
        self._stats.start(self.scheduler)
        self._loop_task = asyncio.create_task(self._step_loop(), name="shoal-step-loop")
        lost = getattr(self.runner, "lost", None)  # a tensor-parallel runner's lost-rank flag
        if lost is not None:
            self._watch_task = asyncio.create_task(self._watch_lost(lost), name="shoal-rank-watch")
        info = self.info
        state = (f", recurrent state {info.num_state_slots} slots ({info.state_bytes / 2**30:.2f} GiB of it)"
                 if info.has_state else "")
        if info.num_state_snapshots:
            state += (f" and {info.num_state_snapshots} snapshots x {info.snapshot_bytes / info.num_state_snapshots / 2**20:.1f}"
                      f" MiB for prefix caching ({info.snapshot_bytes / 2**30:.2f} GiB)")
        ranks = info.tensor_parallel_size * info.pipeline_parallel_size
        per_rank = f" on each of {ranks} ranks" if ranks > 1 else ""
        log.info("engine ready: %s, %d attention layers, %s, KV pool %d blocks x %d tokens (%.2f GiB%s%s), "
                 "max_model_len %d", info.path, info.num_layers, info.dtype, info.num_blocks - 1,
                 info.block_size, info.kv_cache_bytes / 2**30, state, per_rank, info.max_model_len)
        return self

    @property
    def info(self) -> ModelInfo:
        return self.runner.info

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def is_alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and self.dead_error is None

    async def _on_mlx(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream deltas for one request (add_request, then iterate its stream)."""
        async for output in self.add_request(prompt_token_ids, params, request_id, cache_salt):
            yield output

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, cache_salt: str | None = None,
                    n: int = 1, parent_id: str | None = None) -> RequestStream:
        """Validate and queue a request. Raises ValueError (empty prompt, ids out of the
        vocabulary, too long for max_model_len, duplicate id) or EngineDeadError at once."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running") from self.dead_error
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        limit = self.config.max_waiting_requests
        if limit and len(self.scheduler.waiting) >= limit:
            raise EngineOverloadedError(f"{len(self.scheduler.waiting)} requests are already waiting "
                                        f"(--max-waiting-requests {limit}); retry later")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.info.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.info.vocab_size})")
        if params.min_tokens and self._bans_every_token(params):
            raise ValueError("min_tokens with stop_token_ids that, with EOS, ban every token")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        request = Request(request_id, prompt_token_ids, params, self.info.eos_token_ids,
                          cache_salt=cache_salt, n=n, parent_id=parent_id)
        self.scheduler.add_request(request)
        stream = RequestStream(request, RequestDetokenizer(self.tokenizer, request), self.abort)
        self._streams[request_id] = stream
        self._wakeup.set()
        return stream

    async def compile_structured_output(self, spec: StructuredOutput) -> None:
        """Compile (and cache) a grammar off the event loop; ValueError if it is invalid."""
        await asyncio.to_thread(self.structured.compile, spec)

    def _bans_every_token(self, params: SamplingParams) -> bool:
        vocab = self.info.vocab_size
        banned = {t for t in params.stop_token_ids if t < vocab}
        if not params.ignore_eos:
            banned.update(t for t in self.info.eos_token_ids if t < vocab)
        return len(banned) >= vocab

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed and its stream gets a final abort delta."""
        for request in self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED):
            self._finish_stream(request)
        self._wakeup.set()

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no request holds; returns how many were dropped."""
        return self.scheduler.pool.reset_cache()

    async def _step_loop(self) -> None:
        try:
            while True:
                # Clear before reading the scheduler's state: a request added at any later
                # point sets the event again, so no wakeup is lost.
                self._wakeup.clear()
                if not self.scheduler.has_work():
                    await self._wakeup.wait()
                    continue
                sched = self.scheduler.schedule()
                self._mark_scheduled(sched)
                ran, result = await self._execute(sched)  # `ran`: what succeeded of `sched`
                self._publish(self.scheduler.update_from_output(ran, result))
                self._push_stats(ran.num_batched_tokens)
                if not sched.scheduled and self.scheduler.num_unfinished:
                    await self._wakeup.wait()  # nothing fits now: wait for an abort or a new request
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every stream must hear about it
            log.exception("engine step failed; failing all requests")
            self.dead_error = exc
            self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            self._push_stats(0)

    async def _watch_lost(self, lost) -> None:
        """The runner lost part of its device (a rank), perhaps while a step hangs on it: die
        now, ending every stream with an error, so the server exits instead of waiting."""
        while not lost.is_set():
            await asyncio.sleep(0.2)
        if self.dead_error is None:
            reason = self.runner.lost_reason
            log.error("engine lost its device: %s; failing all requests", reason)
            self.dead_error = DeviceLostError(reason)
            self._loop_task.cancel()
            self._fail_all(f"engine error: {reason}")

    async def _execute(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        """Run a step. If it raises, run each request's share alone so that only the
        requests that fail on their own end (with an error); the step loop dies only after
        MAX_FAILED_STEPS steps in a row in which nothing succeeded (a broken device)."""
        try:
            result = await self._on_mlx(self.runner.execute, sched)
        except DeviceLostError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below; re-raised if nothing runs
            if not sched.scheduled:  # a step that only told the runner which requests finished
                self._count_failed_step(str(exc))
                return sched, ModelRunnerOutput(())
            log.warning("a step of %d requests failed (%s: %s); running each alone",
                        len(sched.scheduled), type(exc).__name__, exc)
            return await self._execute_alone(sched)
        if sched.scheduled:  # only a step that ran the model proves the device works
            self._failed_steps = 0
        return sched, result

    async def _execute_alone(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        kept, results, failed = [], [], []
        for row in sched.scheduled:
            alone = SchedulerOutput((row,), len(row.token_ids), sched.finished_request_ids)
            try:
                result = await self._on_mlx(self.runner.execute, alone)
            except DeviceLostError:
                raise
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                log.error("request %s failed in its step: %s: %s", row.request_id, type(exc).__name__, exc)
                failed.append((row, f"engine error in this request: {type(exc).__name__}: {exc}"))
                continue
            kept.append(row)
            results.append(result)
        for request, message in self.scheduler.fail_scheduled(failed):
            self._finish_stream(request, error=message)
        # Rows that read blocks a failed row was writing (a same-step prefix hit) computed on
        # garbage: drop their results and recompute them later.
        tainted = self.scheduler.recompute_readers_of_failed(kept, [r for r, _ in failed])
        if tainted:
            results = [res for row, res in zip(kept, results) if row.request_id not in tainted]
            kept = [row for row in kept if row.request_id not in tainted]
        if kept:
            self._failed_steps = 0
        else:
            self._count_failed_step(failed[-1][1])
        merged = ModelRunnerOutput(
            tuple(r.sampled_token_ids[0] for r in results),
            tuple(r.logprobs[0] if r.logprobs else None for r in results)
            if any(r.logprobs for r in results) else None,
            tuple(e for r in results for e in r.errors))
        return SchedulerOutput(tuple(kept), sum(len(r.token_ids) for r in kept)), merged

    def _count_failed_step(self, message: str) -> None:
        self._failed_steps += 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self._failed_steps} steps in a row failed for every request; "
                               f"last: {message}")

    def _mark_scheduled(self, sched) -> None:
        now = time.monotonic()
        for s in sched.scheduled:
            stream = self._streams.get(s.request_id)
            if stream is not None and stream.times.scheduled is None:
                stream.times.scheduled = now

    def _push_stats(self, num_batched_tokens: int) -> None:
        scheduler_stats, iteration = self._stats.step(self.scheduler, num_batched_tokens)
        for logger in self.stat_loggers:
            try:
                logger.record(scheduler_stats, iteration)
            except Exception:  # noqa: BLE001 - a logger bug must not take the engine down
                log.exception("stat logger %s failed", type(logger).__name__)

    def _publish(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request.request_id)
            if stream is None:
                continue
            if not out.new_token_ids:  # ended without a token (its constraint failed)
                self._finish_stream(out.request, error=out.request.error)
                continue
            times = stream.times
            if times.first_token is None:
                times.first_token = now
                self._stats.ttfts.append(now - times.arrival)
            else:
                self._stats.itls.append(now - times.last_token)
            times.last_token = now
            try:
                delta = stream.detok.add(out.request, out.new_token_ids)
            except Exception as exc:  # noqa: BLE001 - one request's text must not stop the loop
                log.exception("detokenizing request %s failed", out.request.request_id)
                self.scheduler.finish_requests([out.request.request_id], RequestStatus.FINISHED_ERROR)
                self._finish_stream(out.request, error=f"detokenizing failed: {type(exc).__name__}: {exc}")
                continue
            if delta.stop_string is not None:
                out.request.stop_reason = delta.stop_string
                self.scheduler.finish_requests([out.request.request_id], RequestStatus.FINISHED_STOPPED)
            self._emit(stream, out.new_token_ids, delta.text, out.logprobs, error=out.request.error)

    def _emit(self, stream: RequestStream, token_ids: tuple[int, ...], text: str, logprobs=(), error: str | None = None) -> None:
        request = stream.request
        finished = request.status.finished
        stream.queue.put_nowait(RequestOutput(
            request_id=request.request_id, new_token_ids=token_ids, new_text=text, finished=finished,
            finish_reason=request.finish_reason, num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens, num_output_tokens=request.num_output_tokens,
            logprobs=logprobs, stop_reason=request.stop_reason, error=error))
        if finished:
            stream.finished = True
            del self._streams[request.request_id]
            self._stats.finished.append(finished_request_stats(request, stream.times, time.monotonic()))

    def _finish_stream(self, request: Request, error: str | None = None) -> None:
        stream = self._streams.get(request.request_id)
        if stream is not None and not stream.finished:
            self._emit(stream, (), "", error=error)

    def _fail_all(self, message: str) -> None:
        for stream in list(self._streams.values()):
            request = stream.request
            if not request.status.finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_ERROR)
            self._finish_stream(request, error=message)

    async def drain(self, grace: float) -> int:
        """Refuse new requests, give those in flight `grace` seconds to finish, then end the
        rest with an error delta. Returns how many were cut."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._streams:
            log.info("draining: %d requests in flight, up to %.0f s", len(self._streams), grace)
        while self._streams and loop.time() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        cut = len(self._streams)
        if cut:
            log.warning("drain grace period over: ending %d requests", cut)
            self._fail_all("the server is shutting down")
        await asyncio.sleep(0)  # let the handlers write their terminal events
        return cut

    async def shutdown(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.scheduler is not None:
            self._fail_all("the server is shutting down")
        if isinstance(self.dead_error, DeviceLostError):  # the MLX thread may be stuck in a step
            self._executor.shutdown(wait=False)
            return
        if self.runner is not None:
            await self._on_mlx(self.runner.close)
        self._executor.shutdown(wait=True)
