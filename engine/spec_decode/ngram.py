"""N-gram (prompt lookup) drafts: find the most recent earlier occurrence of the sequence's
last n tokens (n from `max_n` down to `min_n`) and propose the tokens that followed it.

    tokens   ... a b c d e ... x y a b c | ?        last 3 tokens "a b c" occurred before,
    draft                                  d e ...  followed by "d e ...": propose those

Agents re-emit what is in their context (a file with one line changed, a path, a JSON echo),
so the continuation of an earlier occurrence is often right; the target model verifies it.
One vectorized compare over the context per n: well under a millisecond for 10k tokens.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_tokens: int, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max and num_speculative_tokens >= 1")
        self.num_tokens = num_tokens
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> tuple[int, ...]:
        """Up to min(num_tokens, max_tokens) draft tokens; () when no n-gram recurs."""
        k = self.num_tokens if max_tokens is None else min(self.num_tokens, max_tokens)
        if k < 1 or len(token_ids) <= self.min_n:
            return ()
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that end before the last token, so at least one token follows each.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tuple(tokens[start:start + k].tolist())
        return ()
