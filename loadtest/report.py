"""Summaries of a run: percentiles, throughput, goodput; as a terminal table and JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.client import RequestResult


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else math.nan, "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "count": len(values)}


@dataclass
class SLO:
    ttft: float  # seconds
    tpot: float  # seconds per output token

    def met_by(self, r: RequestResult) -> bool:
        return (r.error is None and r.ttft is not None and r.ttft <= self.ttft
                and (r.tpot is None or r.tpot <= self.tpot))


def summarize(results: list[RequestResult], elapsed: float, slo: SLO) -> dict:
    ok = [r for r in results if r.error is None]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else math.nan,
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / elapsed if elapsed else math.nan,
        "goodput_requests_per_s": sum(slo.met_by(r) for r in results) / elapsed if elapsed else math.nan,
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": distribution([r.e2e for r in ok if r.e2e is not None]),
        "ttft_cold_s": distribution([r.ttft for r in ok if r.cold and r.ttft is not None]),
        "ttft_hot_s": distribution([r.ttft for r in ok if not r.cold and r.ttft is not None]),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
    }


def format_table(rows: list[tuple[str, dict]]) -> str:
    """One row per load level: throughput, goodput and latency percentiles in milliseconds."""
    header = (f"{'level':>10} {'req/s':>7} {'tok/s':>8} {'good/s':>7} {'err':>4} "
              f"{'ttft p50':>9} {'p90':>7} {'p99':>7} {'tpot p50':>9} {'p99':>7} {'e2e p50':>8} {'p99':>7}")
    lines = [header]
    for level, s in rows:
        ms = {k: {q: v * 1e3 for q, v in s[k].items() if q != "count"} for k in ("ttft_s", "tpot_s", "e2e_s")}
        lines.append(f"{level:>10} {s['requests_per_s']:7.2f} {s['output_tokens_per_s']:8.1f} "
                     f"{s['goodput_requests_per_s']:7.2f} {s['errors']:4d} {ms['ttft_s']['p50']:9.0f} "
                     f"{ms['ttft_s']['p90']:7.0f} {ms['ttft_s']['p99']:7.0f} {ms['tpot_s']['p50']:9.1f} "
                     f"{ms['tpot_s']['p99']:7.1f} {ms['e2e_s']['p50']:8.0f} {ms['e2e_s']['p99']:7.0f}")
    return "\n".join(lines)
