"""PNG plots of a run or a sweep (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.client import RequestResult  # noqa: E402


def _cdf(ax, values: list[float], label: str) -> None:
    ordered = sorted(values)
    if ordered:
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)


def latency_cdfs(levels: list[tuple[str, list[RequestResult]]], path: Path) -> None:
    """TTFT, TPOT and end-to-end latency CDFs, one line per load level."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for level, results in levels:
        ok = [r for r in results if r.error is None]
        _cdf(axes[0], [r.ttft for r in ok if r.ttft is not None], level)
        _cdf(axes[1], [r.tpot for r in ok if r.tpot is not None], level)
        _cdf(axes[2], [r.e2e for r in ok if r.e2e is not None], level)
    for ax, title in zip(axes, ("time to first token (s)", "time per output token (s)", "end-to-end latency (s)")):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(title="load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_curves(offered: list[float], summaries: list[dict], offered_label: str, path: Path) -> None:
    """Throughput and p99 TTFT against offered load (a sweep)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(offered, [s["output_tokens_per_s"] for s in summaries], marker="o", label="output tokens/s")
    left.set_ylabel("output tokens/s")
    right.plot(offered, [s["ttft_s"]["p99"] for s in summaries], marker="o", color="tab:red")
    right.set_ylabel("p99 time to first token (s)")
    for ax in (left, right):
        ax.set_xlabel(offered_label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hot_cold_ttft(results: list[RequestResult], path: Path) -> None:
    """TTFT of each adapter's first request in the run (cold: may page in) against the rest (hot)."""
    ok = [r for r in results if r.error is None and r.ttft is not None and r.adapters]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _cdf(ax, [r.ttft for r in ok if r.cold], "cold (adapter's first request)")
    _cdf(ax, [r.ttft for r in ok if not r.cold], "hot")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def path_throughput(runs: dict[str, list[dict]], path: Path, reference: str = "engine", target: float = 0.9) -> None:
    """Tokens/s of each path (every round a dot, the best a bar), with the target share of the reference's best."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    keys = list(runs)
    ax.bar(keys, [max(r["tokens_per_s"] for r in runs[k]) for k in keys], color="tab:blue", alpha=0.6, label="best")
    for x, key in enumerate(keys):
        ax.plot([x] * len(runs[key]), [r["tokens_per_s"] for r in runs[key]], "ko", ms=4)
    ax.axhline(target * max(r["tokens_per_s"] for r in runs[reference]), color="tab:red", ls="--",
               label=f"{target:g} x {reference}")
    ax.set_ylabel("generated tokens/s")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_by_group(panels: list[tuple[str, dict[str, dict[str, float]]]], path: Path) -> None:
    """Grouped bars of exact match: one panel per prompt set, groups are tasks, one bar per method.

    panels: (title, {method: {group: accuracy}}); groups are ordered as in the first method."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    every_method = list(dict.fromkeys(method for _, methods in panels for method in methods))
    colours = {method: plt.cm.tab10(i % 10) for i, method in enumerate(every_method)}  # one per method throughout
    for ax, (title, methods) in zip(axes[:, 0], panels):
        groups = list(next(iter(methods.values())))
        width = 0.85 / len(methods)
        for i, (method, scores) in enumerate(methods.items()):
            ax.bar([g + i * width for g in range(len(groups))], [scores.get(group, 0.0) for group in groups],
                   width, label=method, color=colours[method])
        ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))], groups, rotation=15,
                      fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("exact match")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
