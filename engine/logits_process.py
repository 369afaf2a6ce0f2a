"""Per-request logits processors: the seam for constraints on the next token.

A processor lives as long as its request: the scheduler builds them at admission
(`ProcessorFactory`), advances them with every accepted token in `update_from_output`, and
drops them when the request finishes or is aborted. Preemption keeps the output tokens (the
request recomputes its KV, not its text), so processors keep their state across it.

Each step, the runner asks the processors of the rows that sample for one additive mask
(`step_bias`): 0 where a token is allowed, -inf where it is not. It does so while MLX runs
the forward, so rows without processors pay nothing and constrained rows pay only the fill.

numpy only: no MLX, no asyncio. Processors are touched by one thread at a time (the MLX
thread fills, the event loop accepts, in turn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from shoal.engine.outputs import ScheduledRequest
    from shoal.engine.request import Request


class ConstraintError(RuntimeError):
    """The constraint cannot continue (a grammar reached a dead end): the request ends."""


class LogitsProcessor(Protocol):
    def fill(self, bias: np.ndarray) -> None:
        """Add this processor's mask for the next token into `bias` (V,) float32, in place."""

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token. True when the constraint is complete (the request
        should stop now); raises ConstraintError when it cannot continue."""


class MinTokensProcessor:
    """Bans EOS and the stop token ids until `min_tokens` tokens have been generated."""

    def __init__(self, banned: Sequence[int], min_tokens: int, num_generated: int = 0):
        self.banned = np.array(sorted(set(banned)), dtype=np.int64)
        self.remaining = min_tokens - num_generated

    def fill(self, bias: np.ndarray) -> None:
        if self.remaining > 0:
            bias[self.banned[self.banned < bias.shape[0]]] = -np.inf

    def accept(self, token_id: int) -> bool:
        self.remaining -= 1
        return False


ProcessorFactory = Callable[["Request"], list[LogitsProcessor]]


def default_processors(request: Request) -> list[LogitsProcessor]:
    """The processors every engine builds: the min_tokens ban."""
    params = request.params
    if params.min_tokens <= request.num_output_tokens:
        return []
    eos = () if params.ignore_eos else tuple(request.eos_token_ids)
    return [MinTokensProcessor((*eos, *params.stop_token_ids), params.min_tokens, request.num_output_tokens)]


def step_bias(rows: Sequence[ScheduledRequest], vocab_size: int) -> tuple[np.ndarray | None, dict[int, str]]:
    """The (R, V) additive mask of the rows' processors (None when no row has any), and the
    rows whose constraint failed ({row index: why}); those rows' masks are left open, and
    their requests end with the error."""
    errors: dict[int, str] = {}
    if not any(r.processors for r in rows):
        return None, errors
    bias = np.zeros((len(rows), vocab_size), dtype=np.float32)
    for i, row in enumerate(rows):
        try:
            for processor in row.processors:
                processor.fill(bias[i])
        except ConstraintError as exc:
            errors[i] = str(exc)
            bias[i] = 0.0
    return bias, errors
