"""Offline generation on the calling thread: schedule -> execute -> update until done.

For scripts, tests and the offline benchmark. The server uses AsyncEngine, which runs the
same three verbs with execute on its MLX thread.
"""

from __future__ import annotations

import itertools
import logging

from shoal.engine.config import EngineConfig
from shoal.engine.logits_process import LogitsProcessor, default_processors
from shoal.engine.model_runner import ModelRunner
from shoal.engine.request import Request
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.structured_output import StructuredOutputManager

log = logging.getLogger("shoal")


def scheduler_config(config: EngineConfig, runner: ModelRunner) -> SchedulerConfig:
    info = runner.info
    prefix_caching = config.enable_prefix_caching
    if prefix_caching and info.has_state and not info.num_state_snapshots:
        # A prefix hit would skip tokens whose effect on the recurrent state was never kept.
        log.info("prefix caching is off: the model has recurrent layers and no memory is left for "
                 "state snapshots (raise --kv-cache-memory or set --num-state-snapshots)")
        prefix_caching = False
    speculative = config.speculative
    if speculative is not None and info.has_state:
        # A rejected draft would have advanced the recurrent state past what was accepted.
        log.info("speculative decoding is off: the model has recurrent layers")
        speculative = None
    return SchedulerConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=info.max_model_len, block_size=info.block_size, num_blocks=info.num_blocks,
        enable_prefix_caching=prefix_caching,
        prefill_budget_while_decoding=config.prefill_budget_while_decoding,
        num_state_slots=info.num_state_slots, num_state_snapshots=info.num_state_snapshots,
        snapshot_interval=config.snapshot_interval, speculative=speculative)


def make_scheduler(config: EngineConfig, runner: ModelRunner) -> tuple[Scheduler, StructuredOutputManager]:
    """The scheduler with every engine's logits processors: the min_tokens ban and, for
    requests with a `structured_output`, a grammar matcher from the returned manager."""
    info = runner.info
    structured = StructuredOutputManager(getattr(runner.tokenizer, "_tokenizer", runner.tokenizer),
                                         info.vocab_size, info.eos_token_ids)

    def processors(request: Request) -> list[LogitsProcessor]:
        out = default_processors(request)
        spec = request.params.structured_output
        if spec is not None:
            out.append(structured.processor(spec, request.output_token_ids))
        return out

    return Scheduler(scheduler_config(config, runner), processors), structured


class LLM:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        self.config = config
        self.runner = runner or ModelRunner.load(config)
        self.scheduler, self.structured = make_scheduler(config, self.runner)
        self._ids = itertools.count()

    def add(self, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        request = Request(f"offline-{next(self._ids)}", prompt_token_ids, params,
                          self.runner.info.eos_token_ids)
        self.scheduler.add_request(request)
        return request

    def step(self) -> None:
        sched = self.scheduler.schedule()
        self.scheduler.update_from_output(sched, self.runner.execute(sched))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Output token ids per prompt, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        requests = [self.add(p, sp) for p, sp in zip(prompts, params)]
        while self.scheduler.has_work():
            self.step()
        return [r.output_token_ids for r in requests]
