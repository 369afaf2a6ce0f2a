"""Per-request sampling knobs, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shoal.engine.structured_output import StructuredOutput


MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


class SamplingParamsError(ValueError):
    """Invalid sampling parameter; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(param, message)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop. Frozen: safe to share across threads.

    temperature 0 means greedy. top_k 0 (or -1 on the wire) means no top-k cut.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    structured_output: StructuredOutput | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        _check(math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
               "temperature", f"temperature must be in [0, 2], got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0,
               "repetition_penalty",
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2.0 <= value <= 2.0, name,
                   f"{name} must be in [-2, 2], got {value}")
        _check(self.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        _check(self.seed is None or self.seed >= 0, "seed", f"seed must be >= 0, got {self.seed}")
        _check(0 <= self.top_logprobs <= 20, "top_logprobs",
               f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be non-negative token ids")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop strings must be non-empty strings")
        # Every stop string is searched for after every token, on the event loop: bounded.
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_CHARS for s in self.stop),
               "stop", f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        _check(all(math.isfinite(b) and -100 <= b <= 100 for _, b in self.logit_bias),
               "logit_bias", "logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
