"""Messages between the layers. Frozen, plain Python and numpy only: they cross from the
asyncio thread to the MLX thread and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shoal.engine.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute `token_ids` at positions
    [start_pos, start_pos + len(token_ids)) and, if `sample`, sample the next token."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]
    sample: bool
    params: SamplingParams
    history: tuple[int, ...] | None  # prompt + output ids, only when penalties need them
    num_prompt_tokens: int
    processors: tuple = ()  # LogitsProcessors of a row that samples (engine/logits_process.py)
    state_slot: int = -1  # models with recurrent layers: the request's state slot
    restore_snapshot: int | None = None  # copy this state snapshot into the slot first (a prefix hit)
    take_snapshot: int | None = None  # copy the slot's state after the step into this snapshot
    num_draft_tokens: int = 0  # the last of `token_ids` are drafts: sample at each, verify


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    finished_request_ids: tuple[str, ...] = ()  # the runner drops their per-request state


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token and the top alternatives, from the raw logits."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ModelRunnerOutput:
    # Aligned with SchedulerOutput.scheduled; a row with drafts gets the accepted drafts and one
    # more token, a tuple.
    sampled_token_ids: tuple[int | tuple[int, ...] | None, ...]
    logprobs: tuple[TokenLogprobs | None, ...] | None = None
    errors: tuple[tuple[str, str], ...] = ()  # (request id, why): a row's constraint failed


@dataclass(frozen=True)
class StepOutput:
    """New tokens for one request after a step (scheduler -> engine, same thread)."""

    request: Request
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One delta of a request's stream, as `AsyncEngine.generate` yields it. Exactly one
    delta per request has `finished` set; it carries the finish reason (or the error)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # cumulative
    logprobs: tuple[TokenLogprobs, ...] = ()
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    error: str | None = None
