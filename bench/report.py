"""Numbers out of benchmark runs: one run's summary (`bench serve`), and the side-by-side
tables and plot of `bench compare` (medians over repeats, min-max spread, ratios).

Percentiles are numpy's linear interpolation, as in `vllm bench serve`. Times in reports
are milliseconds; throughputs are per second of the whole run (first send to last reply).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench.serve import RequestResult, RunResult

MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class Distribution:
    """Mean, median and p99 of a latency, in milliseconds (None when nothing was measured)."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Distribution:
        if not seconds:
            return cls(0, None, None, None)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(len(ms), float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class KindSummary:
    """Latencies of one kind of request (e.g. mixed: short vs long)."""

    kind: str
    num_completed: int
    ttft: Distribution
    e2e: Distribution


@dataclass(frozen=True)
class Summary:
    """One run, as `vllm bench serve` reports it."""

    duration_s: float
    num_completed: int
    num_failed: int
    num_unsent: int
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    num_usage_reported: int  # completed requests whose token counts came from a usage chunk
    num_retries: int  # resends after connection errors (see ServeConfig.max_retries)
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    by_kind: tuple[KindSummary, ...]
    errors: tuple[str, ...]  # the first few distinct failure messages


def tpot(result: RequestResult) -> float | None:
    """(E2E - TTFT) / (output tokens - 1); None for one-token or token-less replies."""
    if result.ttft is None or result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize(run: RunResult) -> Summary:
    ok = [r for r in run.results if r.success]
    failed = [r for r in run.results if not r.success]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    duration = max(run.duration, 1e-9)
    kinds = sorted({r.kind for r in ok})
    return Summary(
        duration_s=run.duration, num_completed=len(ok), num_failed=len(failed),
        num_unsent=run.num_unsent, prompt_tokens=prompt, output_tokens=output,
        cached_tokens=sum(r.cached_tokens for r in ok),
        num_usage_reported=sum(r.usage_reported for r in ok),
        num_retries=sum(r.retries for r in run.results),
        request_throughput=len(ok) / duration, output_throughput=output / duration,
        total_token_throughput=(prompt + output) / duration,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Distribution.of([t for r in ok if (t := tpot(r)) is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itl]),
        e2e=Distribution.of([r.latency for r in ok]),
        by_kind=tuple(kind_summary(k, [r for r in ok if r.kind == k]) for k in kinds) if len(kinds) > 1 else (),
        errors=tuple(dict.fromkeys(r.error for r in failed))[:MAX_ERRORS_KEPT])


def kind_summary(kind: str, results: list[RequestResult]) -> KindSummary:
    return KindSummary(kind, len(results), Distribution.of([r.ttft for r in results if r.ttft is not None]),
                       Distribution.of([r.latency for r in results]))


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: Summary, title: str = "Serving Benchmark Result") -> str:
    """A fixed-width block like `vllm bench serve` prints."""
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", summary.num_completed), ("Failed requests:", summary.num_failed),
        ("Unsent requests (timeout):", summary.num_unsent),
        ("Retries (connection errors):", summary.num_retries),
        ("Benchmark duration (s):", fmt(summary.duration_s)),
        ("Total input tokens:", summary.prompt_tokens), ("Cached input tokens:", summary.cached_tokens),
        ("Total generated tokens:", summary.output_tokens),
        ("Request throughput (req/s):", fmt(summary.request_throughput)),
        ("Output token throughput (tok/s):", fmt(summary.output_throughput)),
        ("Total token throughput (tok/s):", fmt(summary.total_token_throughput))]
    for name, short, dist in (("Time to First Token", "TTFT", summary.ttft),
                              ("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot),
                              ("Inter-token Latency", "ITL", summary.itl),
                              ("End-to-end Latency", "E2E", summary.e2e)):
        rows += [(f"-{name}-", None), (f"Mean {short} (ms):", fmt(dist.mean_ms)),
                 (f"Median {short} (ms):", fmt(dist.p50_ms)), (f"P99 {short} (ms):", fmt(dist.p99_ms))]
    for kind in summary.by_kind:
        rows += [(f"-{kind.kind} ({kind.num_completed} requests)-", None),
                 ("Median / P99 TTFT (ms):", f"{fmt(kind.ttft.p50_ms)} / {fmt(kind.ttft.p99_ms)}"),
                 ("Median / P99 E2E (ms):", f"{fmt(kind.e2e.p50_ms)} / {fmt(kind.e2e.p99_ms)}")]
    lines = [f"{' ' + title + ' ':=^60}"]
    for label, value in rows:
        lines.append(f"{label:-^60}" if value is None else f"{label:<44}{value:>16}")
    lines += [f"error: {e}" for e in summary.errors]
    return "\n".join([*lines, "=" * 60])


# --- bench compare: aggregates over repeats -------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One headline number of a run, and which direction is better."""

    key: str
    label: str
    get: Callable[[Summary], float | None]
    higher_is_better: bool


HEADLINE: tuple[MetricSpec, ...] = (
    MetricSpec("output_throughput", "out tok/s", lambda s: s.output_throughput, True),
    MetricSpec("request_throughput", "req/s", lambda s: s.request_throughput, True),
    MetricSpec("ttft_p50", "TTFT p50 ms", lambda s: s.ttft.p50_ms, False),
    MetricSpec("ttft_p99", "TTFT p99 ms", lambda s: s.ttft.p99_ms, False),
    MetricSpec("tpot_p50", "TPOT p50 ms", lambda s: s.tpot.p50_ms, False),
    MetricSpec("itl_p50", "ITL p50 ms", lambda s: s.itl.p50_ms, False),
    MetricSpec("e2e_p50", "E2E p50 ms", lambda s: s.e2e.p50_ms, False),
    MetricSpec("duration", "total s", lambda s: s.duration_s, False),
)


@dataclass(frozen=True)
class Spread:
    """Median and range of one number over repeats."""

    median: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, None)
        return cls(statistics.median(present), min(present), max(present))

    def cell(self, digits: int = 1) -> str:
        if self.median is None:
            return "-"
        if self.low == self.high:
            return fmt(self.median, digits)
        return f"{fmt(self.median, digits)} ({fmt(self.low, digits)}-{fmt(self.high, digits)})"


def paired_ratios(ours: Sequence[Summary], theirs: Sequence[Summary], metric: MetricSpec) -> Spread:
    """Repeat-by-repeat ratios ours / theirs (the servers ran back to back in each repeat)."""
    ratios = []
    for a, b in zip(ours, theirs):
        x, y = metric.get(a), metric.get(b)
        if x is not None and y:
            ratios.append(x / y)
    return Spread.of(ratios)


Grid = dict[str, dict[int, list[Summary]]]  # server -> concurrency -> one summary per repeat


def server_table(grid: Grid, metrics: Sequence[MetricSpec] = HEADLINE) -> str:
    """Markdown: one row per server and concurrency, median (min-max) over repeats."""
    head = ["server", "conc", *(m.label for m in metrics), "failed", "retries"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for server, levels in grid.items():
        for conc, runs in sorted(levels.items()):
            cells = [Spread.of([m.get(s) for s in runs]).cell() for m in metrics]
            failed = sum(s.num_failed + s.num_unsent for s in runs)
            lines.append(md_row([server, str(conc), *cells, str(failed), str(sum(s.num_retries for s in runs))]))
    return "\n".join(lines)


def ratio_table(grid: Grid, ours: str, peer: str, metrics: Sequence[MetricSpec] = HEADLINE) -> str:
    """Markdown: ours / peer per concurrency, median (min-max) of the paired ratios."""
    head = ["conc", *(f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in metrics)]
    lines = [f"**{ours} / {peer}** (↑: above 1 favours {ours}; ↓: below 1 favours {ours})", "",
             md_row(head), md_row(["---"] * len(head))]
    for conc in sorted(set(grid[ours]) & set(grid[peer])):
        cells = [paired_ratios(grid[ours][conc], grid[peer][conc], m).cell(2) for m in metrics]
        lines.append(md_row([str(conc), *cells]))
    return "\n".join(lines)


def server_metrics_table(deltas: dict[str, dict[int, list[dict[str, float]]]]) -> str:
    """Markdown of /metrics deltas per server run (servers that expose vllm:* metrics)."""
    head = ["server", "conc", "prompt tokens", "prefix-cache hits", "prefill computed",
            "prefill (from step tokens)", "generation tokens", "preemptions"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for server, levels in deltas.items():
        for conc, runs in sorted(levels.items()):
            def cell(key: str) -> str:
                return Spread.of([d.get(key) for d in runs]).cell(0)
            lines.append(md_row([server, str(conc), cell("prompt_tokens"), cell("prefix_cache_hits"),
                                 cell("prefill_computed"), cell("prefill_computed_steps"),
                                 cell("generation_tokens"), cell("preemptions")]))
    return "\n".join(lines)


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot(grid: Grid, path: Path, title: str) -> Path | None:
    """Output tok/s and TTFT p50 vs concurrency, one line per server; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, (HEADLINE[0], HEADLINE[2])):
        for server, levels in grid.items():
            concs = sorted(levels)
            spreads = [Spread.of([metric.get(s) for s in levels[c]]) for c in concs]
            med = np.array([s.median if s.median is not None else np.nan for s in spreads], dtype=float)
            low = np.array([s.low if s.low is not None else np.nan for s in spreads], dtype=float)
            high = np.array([s.high if s.high is not None else np.nan for s in spreads], dtype=float)
            ax.errorbar(concs, med, yerr=[med - low, high - med], marker="o", capsize=3, label=server)
        ax.set_xscale("log", base=2)
        concs = sorted({c for levels in grid.values() for c in levels})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrency (clients)")
        ax.set_ylabel(metric.label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(title: str, meta: dict[str, Any], grid: Grid,
                    deltas: dict[str, dict[int, list[dict[str, float]]]], png: Path | None) -> str:
    """compare.md: per-server table, Shoal / peer ratio tables, /metrics deltas, the plot."""
    names = list(grid)
    ours = "shoal" if "shoal" in grid else names[0]
    parts = [f"# bench compare: {title}", "",
             f"Machine: {meta['machine']}; {meta['date']}. Median over repeats, (min-max) spread; "
             "ratios are per-repeat pairs (servers run back to back).", "",
             "## Per server", "", server_table(grid), ""]
    parts += ["## Ratios", ""]
    for peer in (n for n in names if n != ours):
        parts += [ratio_table(grid, ours, peer), ""]
    if deltas:
        parts += ["## Server-side counters (/metrics deltas per run)", "", server_metrics_table(deltas), ""]
    if png is not None:
        parts += [f"![throughput and TTFT vs concurrency]({png.name})", ""]
    return "\n".join(parts)
