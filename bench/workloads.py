"""Workloads for `shoal bench serve`: what each simulated client sends.

A workload is a list of sessions. A session is one client: an optional system prompt and
one or more user turns sent one after another, each turn resending the conversation so far
(the assistant's replies are whatever the server streamed back). Single-turn workloads
(random, swarm, mixed) have one turn per session.

    random     distinct prompts of --input-len tokens (text, or token ids for /v1/completions)
    swarm      N clients, one long shared system prompt, distinct short user turns
    multiturn  conversations of --num-turns turns, each resending the growing history
    mixed      short chats with a --long-fraction of long prompts among them

Prompt text is drawn from the model's own tokenizer so that a prompt of n tokens is n
tokens on the server too; without a tokenizer, lengths are approximate (one word ~ one token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS: tuple[str, ...] = ("random", "swarm", "multiturn", "mixed")
MAX_LENGTH_FIXES = 8  # re-encode rounds that bring a random text to its exact token count
MAX_POOL_SCAN = 50_000  # vocabulary ids inspected for the random-text pool
FALLBACK_WORDS: tuple[str, ...] = tuple(
    "the of and to in is was for on are with as by at be this from or have an they which one "
    "you had not but what all were when we there can more if no out so said time up other "
    "about into than them some could only over new like its also after first two way even "
    "because any these most day water long call find people number made world part sound "
    "place year back give name very through just form great think help line turn cause much "
    "mean before move right boy old too same tell does set three want air well play small end "
    "put home read hand port large spell add land here must big high such follow act why ask "
    "men change went light kind off need house picture try again animal point mother near "
    "build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let "
    "thought city tree cross farm hard start might story saw far sea draw left late run".split())

Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class Turn:
    """One user turn: its text (or token ids, /v1/completions only) and its output budget."""

    user: Prompt
    max_tokens: int


@dataclass(frozen=True)
class Session:
    """One client's requests, sent in order. `kind` labels the session in the report."""

    kind: str
    turns: tuple[Turn, ...]
    system: str = ""

    @property
    def num_requests(self) -> int:
        return len(self.turns)


@dataclass(frozen=True)
class WorkloadConfig:
    """Every knob of every workload; each workload reads the ones it needs."""

    name: str = "random"
    num_prompts: int = 64  # requests in all (multiturn: conversations x turns)
    input_len: int = 256  # random: prompt; swarm/multiturn/mixed: each user turn
    output_len: int = 64
    range_ratio: float = 0.0  # random: lengths drawn uniformly in len * [1 - r, 1 + r]
    prompt_ids: bool = False  # random: send token-id lists instead of text (completions only)
    system_len: int = 1500  # swarm/multiturn: shared system prompt (0: none)
    num_turns: int = 4  # multiturn
    long_input_len: int = 2048  # mixed
    long_output_len: int = 16  # mixed
    long_fraction: float = 0.2  # mixed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; expected one of {WORKLOADS}")
        if min(self.num_prompts, self.input_len, self.output_len, self.num_turns) < 1:
            raise ValueError("num_prompts, input_len, output_len and num_turns must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0 or not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError("range_ratio must be in [0, 1) and long_fraction in [0, 1]")
        if self.prompt_ids and self.name != "random":
            raise ValueError("token-id prompts are only supported by the random workload")


class TextSource:
    """Random prompt text of a given token count, and random token ids.

    With a tokenizer: text is decoded from random 'clean' vocabulary ids (ASCII, no special
    tokens) and re-encoded until it is exactly n tokens. Without one: random common words.
    """

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer
        self.pool = clean_token_ids(tokenizer) if tokenizer is not None else np.arange(256)

    def ids(self, n: int, rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(int(i) for i in rng.choice(self.pool, n))

    def text(self, n: int, rng: np.random.Generator) -> str:
        if self.tokenizer is None:
            return " ".join(rng.choice(FALLBACK_WORDS, n))
        ids = list(self.ids(n, rng))
        text = self.decode(ids)
        for _ in range(MAX_LENGTH_FIXES):
            encoded = self.encode(text)
            if len(encoded) == n:
                break
            ids = encoded[:n] + list(self.ids(max(n - len(encoded), 0), rng))
            text = self.decode(ids)
        return text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def clean_token_ids(tokenizer: Any) -> np.ndarray:
    """Vocabulary ids that decode to printable ASCII words (no special or byte tokens)."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    ids = [i for i in range(min(len(tokenizer), MAX_POOL_SCAN)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    clean = [i for i, t in zip(ids, texts) if t.isascii() and t.strip().isalnum()]
    if not clean:
        raise ValueError("the tokenizer has no plain ASCII tokens to build prompts from")
    return np.array(clean)


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer at `path` (a model directory or a cached hub id), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_sessions(config: WorkloadConfig, source: TextSource) -> list[Session]:
    """The sessions of `config.name`, deterministic for a given seed and tokenizer."""
    rng = np.random.default_rng(config.seed)
    builders: dict[str, Callable[[WorkloadConfig, TextSource, np.random.Generator], list[Session]]]
    builders = {"random": random_sessions, "swarm": swarm_sessions,
                "multiturn": multiturn_sessions, "mixed": mixed_sessions}
    return builders[config.name](config, source, rng)


def spread(length: int, ratio: float, rng: np.random.Generator) -> int:
    """A length drawn uniformly from [length * (1 - ratio), length * (1 + ratio)], at least 1."""
    low, high = math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))
    return max(1, int(rng.integers(low, high + 1))) if ratio > 0 else length


def random_sessions(config: WorkloadConfig, source: TextSource,
                    rng: np.random.Generator) -> list[Session]:
    sessions = []
    for _ in range(config.num_prompts):
        n = spread(config.input_len, config.range_ratio, rng)
        user = source.ids(n, rng) if config.prompt_ids else source.text(n, rng)
        turn = Turn(user, spread(config.output_len, config.range_ratio, rng))
        sessions.append(Session("random", (turn,)))
    return sessions


def swarm_sessions(config: WorkloadConfig, source: TextSource,
                   rng: np.random.Generator) -> list[Session]:
    system = source.text(config.system_len, rng) if config.system_len else ""
    return [Session("swarm", (Turn(source.text(config.input_len, rng), config.output_len),), system)
            for _ in range(config.num_prompts)]


def multiturn_sessions(config: WorkloadConfig, source: TextSource,
                       rng: np.random.Generator) -> list[Session]:
    """num_prompts // num_turns conversations (at least one), each with its own system prompt."""
    num_conversations = max(1, config.num_prompts // config.num_turns)
    sessions = []
    for _ in range(num_conversations):
        system = source.text(config.system_len, rng) if config.system_len else ""
        turns = tuple(Turn(source.text(config.input_len, rng), config.output_len)
                      for _ in range(config.num_turns))
        sessions.append(Session("multiturn", turns, system))
    return sessions


def mixed_sessions(config: WorkloadConfig, source: TextSource,
                   rng: np.random.Generator) -> list[Session]:
    """Short chats, with round(long_fraction * n) long prompts at random positions."""
    num_long = round(config.long_fraction * config.num_prompts)
    is_long = np.zeros(config.num_prompts, dtype=bool)
    is_long[rng.choice(config.num_prompts, num_long, replace=False)] = True
    sessions = []
    for long in is_long:
        if long:
            turn = Turn(source.text(config.long_input_len, rng), config.long_output_len)
        else:
            turn = Turn(source.text(config.input_len, rng), config.output_len)
        sessions.append(Session("long" if long else "short", (turn,)))
    return sessions
