"""Recent Responses API responses, kept in memory for `previous_response_id` and
`GET /v1/responses/{id}`: a bounded LRU (the oldest is evicted first), one per server.

Codex sends `store: false` and resends its whole history each turn, so it never fills this;
SDK code written for OpenAI (`store` defaults to true) chains turns through it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    """A finished response: its JSON body, and the conversation it ends as input items
    (every earlier turn's input, then its own output)."""

    body: dict[str, Any]
    items: tuple[dict[str, Any], ...]


class ResponseStore:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._dropped_tools: set[str] = set()  # hosted tool types already logged

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, response_id: str) -> StoredResponse | None:
        found = self._responses.get(response_id)
        if found is not None:
            self._responses.move_to_end(response_id)
        return found

    def put(self, response_id: str, response: StoredResponse) -> None:
        if self.max_size <= 0:
            return
        self._responses[response_id] = response
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.max_size:
            self._responses.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None

    def first_drop(self, tool_type: str) -> bool:
        """True the first time a hosted tool of this type is dropped (to log it once)."""
        if tool_type in self._dropped_tools:
            return False
        self._dropped_tools.add(tool_type)
        return True
