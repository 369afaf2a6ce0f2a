"""OpenAI/vLLM request fields -> engine `SamplingParams`, one per choice.

Range checks live in `SamplingParams` itself; its `SamplingParamsError` names the field,
which becomes the 400's `param`. What only the API knows is checked here: the context
window, logit_bias keys, the top_logprobs/logprobs pairing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shoal.api.errors import bad_request, context_length_exceeded
from shoal.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from shoal.engine.sampling_params import SamplingParams, SamplingParamsError
from shoal.engine.structured_output import StructuredOutput


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a knob out gets: the model's `generation_config.json`
    (vLLM's `--generation-config auto`), overridden by `--override-generation-config`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def load(cls, model_dir: str, override: dict[str, Any]) -> SamplingDefaults:
        path = Path(model_dir) / "generation_config.json"
        try:
            found = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            found = {}
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**found, **override}.items() if k in names and v is not None}
        SamplingParams(**values)  # the same range checks as any request (ValueError)
        return cls(**values)


@dataclass(frozen=True)
class LogprobsRequest:
    """Whether to return logprobs, and how many alternatives per token."""

    enabled: bool = False
    top: int = 0


def chat_logprobs(req: ChatCompletionRequest) -> LogprobsRequest:
    if req.top_logprobs and not req.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true.", "top_logprobs")
    return LogprobsRequest(req.logprobs, req.top_logprobs or 0)


def completion_logprobs(req: CompletionRequest) -> LogprobsRequest:
    if req.logprobs is not None and req.echo:
        raise bad_request("`echo` with `logprobs` (prompt logprobs) is not supported.", "logprobs")
    return LogprobsRequest(req.logprobs is not None, req.logprobs or 0)


def resolve_max_tokens(requested: int | None, num_prompt: int, max_model_len: int) -> int:
    """`requested`, or all the room left in the window; 400 (vLLM's wording) if the prompt
    plus the output cannot fit."""
    max_tokens = max_model_len - num_prompt if requested is None else requested
    if num_prompt >= max_model_len or num_prompt + max_tokens > max_model_len:
        raise context_length_exceeded(max_model_len, num_prompt, requested or 0)
    return max_tokens


def sampling_params(req: SamplingRequest, max_tokens: int, logprobs: LogprobsRequest,
                    vocab_size: int, defaults: SamplingDefaults = SamplingDefaults(),
                    structured: StructuredOutput | None = None) -> list[SamplingParams]:
    """The n SamplingParams for one prompt; a seeded request gives choice i seed + i so the
    choices differ yet stay reproducible. `structured`: the grammar every choice matches."""
    bias = logit_bias(req.logit_bias, vocab_size)
    seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]
    try:
        return [_params(req, max_tokens, logprobs, bias, seed, defaults, structured) for seed in seeds]
    except SamplingParamsError as exc:
        raise bad_request(str(exc), exc.param) from None


def _params(req: SamplingRequest, max_tokens: int, logprobs: LogprobsRequest,
            bias: tuple[tuple[int, float], ...], seed: int | None,
            defaults: SamplingDefaults, structured: StructuredOutput | None) -> SamplingParams:
    return SamplingParams(
        temperature=given(req.temperature, defaults.temperature), top_p=given(req.top_p, defaults.top_p),
        top_k=defaults.top_k if req.top_k is None else max(req.top_k, 0),
        min_p=given(req.min_p, defaults.min_p),
        repetition_penalty=given(req.repetition_penalty, defaults.repetition_penalty),
        presence_penalty=given(req.presence_penalty, 0.0),
        frequency_penalty=given(req.frequency_penalty, 0.0),
        seed=seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        logprobs=logprobs.enabled, top_logprobs=logprobs.top, logit_bias=bias,
        structured_output=structured)


def given(value: Any, default: Any) -> Any:
    return default if value is None else value


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} -> ((id, bias), ...), ids checked against the vocabulary."""
    if not bias:
        return ()
    out = []
    for key, value in bias.items():
        # Not '²' or '٣'; and the length first: int() refuses over 4,300 digits with a ValueError.
        if not (key.isascii() and key.isdigit()) or len(key) > len(str(vocab_size)) or int(key) >= vocab_size:
            raise bad_request(f"logit_bias key {key!r} is not a token id in [0, {vocab_size}).",
                              "logit_bias")
        out.append((int(key), value))
    return tuple(sorted(out))
