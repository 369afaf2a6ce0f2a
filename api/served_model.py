"""The names this server answers to, and the `/v1/models` cards for them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.api.errors import model_not_found


@dataclass(frozen=True)
class ServedModel:
    name: str  # what responses and metrics call the model
    aliases: tuple[str, ...]  # also accepted in a request's `model`
    root: str  # the model directory
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_path(cls, path: str, name: str | None, aliases: tuple[str, ...],
                  max_model_len: int) -> ServedModel:
        """`name` defaults to the directory's name, e.g. "SmolLM2-135M-Instruct"."""
        name = name or Path(path).name or path
        return cls(name, tuple(a for a in aliases if a != name), path, max_model_len)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def resolve(self, requested: str | None, accept_claude: bool = False) -> str:
        """The name to echo back; a missing `model` means this one. Raises 404 otherwise.
        With `accept_claude` (the Anthropic routes), any `claude-*` name means this model:
        Claude Code sends its own model names."""
        if requested is None:
            return self.name
        if requested not in self.names and not (accept_claude and requested.startswith("claude-")):
            raise model_not_found(requested)
        return requested

    def card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "shoal",
                "root": self.root, "parent": None if name == self.name else self.name,
                "max_model_len": self.max_model_len}

    def cards(self) -> dict:
        return {"object": "list", "data": [self.card(n) for n in self.names]}
