"""What a gateway reads to route: SGLang's `/v1/loads` and `/server_info`, in the shapes the
SGLang Model Gateway (`smg`) parses (its `WorkerLoadResponse` / `SchedulerLoadSnapshot` and
`ServerInfo` structs; every field optional there).

`smg` tells engines apart by `/version` (vLLM) before `/server_info` (SGLang), so it registers
Shoal as vLLM, then polls `/v1/loads?include=...` every `--load-monitor-interval` and, only if
that 404s, scrapes `/metrics`. `/loads` (no `v1`) is its question "are you a gateway?": Shoal
is not, so that stays a 404.

The numbers come from the engine's stats objects, like Prometheus's: `LoadTracker` is a stat
logger keeping the last step's scheduler state and a short window of token counts. The routes
are in api/system.py.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime, timezone

from shoal import __version__
from shoal.engine.stats import IterationStats, SchedulerStats

WINDOW_SECONDS = 10.0  # generation throughput and cache hit rate are over this much recent time


class LoadTracker:
    """The engine's load as SGLang reports one DP rank's (`record` is the stat-logger hook)."""

    def __init__(self, max_total_num_tokens: int, max_running_requests: int, clock=time.monotonic):
        self.max_total_num_tokens = max_total_num_tokens
        self.max_running_requests = max_running_requests
        self._clock = clock
        self._state = SchedulerStats()
        self._recent: deque[tuple[float, int, int, int]] = deque()  # (time, generated, queried, hit)

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self._state = scheduler
        self._recent.append((self._clock(), iteration.num_generation_tokens,
                             iteration.prefix_cache_queries, iteration.prefix_cache_hits))
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = self._clock() - WINDOW_SECONDS
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def snapshot(self) -> dict:
        """One rank's `SchedulerLoadSnapshot`."""
        self._forget_old()
        generated = sum(r[1] for r in self._recent)
        queried = sum(r[2] for r in self._recent)
        hits = sum(r[3] for r in self._recent)
        state = self._state
        return {"dp_rank": 0, "num_running_reqs": state.num_running, "num_waiting_reqs": state.num_waiting,
                "num_total_reqs": state.num_running + state.num_waiting,
                "num_used_tokens": round(state.kv_cache_usage * self.max_total_num_tokens),
                "max_total_num_tokens": self.max_total_num_tokens,
                "token_usage": round(state.kv_cache_usage, 4),
                "gen_throughput": round(generated / WINDOW_SECONDS, 2),
                "cache_hit_rate": round(hits / queried, 4) if queried else 0.0,
                "max_running_requests": self.max_running_requests}

    def loads(self) -> dict:
        """The `/v1/loads` body: one rank (a Shoal process is one engine)."""
        return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": __version__,
                "dp_rank_count": 1, "loads": [self.snapshot()]}

