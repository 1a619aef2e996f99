"""The per-step LoRA plan: the one contract between engine, store and kernels.

For a step with `T` tokens every token has up to `K` assignments
`(slot, weight, rank_lo, rank_hi)` and every LoRA-aware linear computes

    y[t] += sum_k weight_k * scale[slot_k] * B[slot_k][:, lo:hi] @ (A[slot_k][lo:hi, :] @ x[t])

The plan stores the k-th assignment of every token in its own `LoraPlanLevel`
so that, inside one level, a token appears at most once: the expand kernels
then scatter into `y` without atomics, and the K levels are applied one after
the other. Inside a level the rows are sorted by slot; each segment is a run
of consecutive tokens with the same slot (a prefill chunk, or one decode token).

A row whose slot is negative is inert: the kernels read and write nothing for
it (CUDA-graph padding uses slot -1), whatever its token, coefficient and ranks.

The plan also says which formulation suits the level (`mode`):
- "segments": one dense GEMM per segment (SGMV); long segments (prefill),
  or very few of them (a decode batch of one or two sequences).
- "slots": one batched GEMM over a contiguous range of pool slots, reading the
  slot tensors in place; rows are packed per slot and padded to the busiest
  slot's count. Decode where most slots in the range are in use.
- "gather": gather each row's A/B and run one batched GEMV (BGMV); decode
  with scattered slots or very uneven popularity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

# Thresholds measured on the CPU with loadtest/bench_lora_ops.py (see docs/benchmarks.md).
SEGMENTED_MIN_AVG_TOKENS = 8  # below this a Python loop over segments costs more than gathering
SEGMENTED_MAX_FEW = 4  # ... unless there are this few segments: then the loop issues fewer ops than packing
SLOTS_MAX_PADDING = 16  # "slots" may compute at most this many padded rows per real row


class Segment(NamedTuple):
    """Rows [start, end) of a plan level: tokens token..token+end-start, all with the same assignment."""

    slot: int
    start: int
    end: int
    token: int
    rank_lo: int
    rank_hi: int


@dataclass(frozen=True)
class LoraPlanLevel:
    """One assignment per token at most; rows sorted by slot.

    Tensors (N = rows in this level, S = segments):
      token_idx:  [N] int64    row of x / y the assignment reads and writes
      slot_idx:   [N] int64    slot of the adapter in the pool
      coeff:      [N] float32  weight * scale[slot]; the kernels read it from this
                               device tensor, so it may be rewritten in place
      rank_lo:    [N] int64    first rank used (inclusive)
      rank_hi:    [N] int64    last rank used (exclusive)
      seg_starts: [S + 1] int64  segment boundaries into the N rows
      seg_slots:  [S] int64      slot of each segment
    `segments` describes the same rows run by run, as Python numbers, for host-side loops.
    For mode "slots": slots slot_range[0]..slot_range[1]-1 are computed as a
    batch of `slot_rows` [num_slots_in_range, m] row indices (N = padding),
    and `packed_pos` [N] gives each row's place in that packed layout.
    """

    token_idx: torch.Tensor
    slot_idx: torch.Tensor
    coeff: torch.Tensor
    rank_lo: torch.Tensor
    rank_hi: torch.Tensor
    seg_starts: torch.Tensor
    seg_slots: torch.Tensor
    segments: tuple[Segment, ...]
    mode: str
    slot_range: tuple[int, int] = (0, 0)
    slot_rows: torch.Tensor | None = None
    packed_pos: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.token_idx.shape[0])


@dataclass(frozen=True)
class LoraPlan:
    """All LoRA assignments of one step; `levels` is empty for a base-only step.

    `targets`: the sub-projection names (q_proj, ..., down_proj) that some
    adapter of the step targets; a LoRA linear none of whose sub-projections is
    among them launches nothing. None (CUDA-graph plans, whose launches are
    fixed) runs every linear, and the kernels skip rows per slot instead.
    """

    levels: tuple[LoraPlanLevel, ...]
    targets: frozenset[str] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.levels


Assignment = tuple[int, float, int, int]  # (slot, weight, rank_lo, rank_hi)


def _slot_packing(slot_idx: torch.Tensor, max_padding: float = SLOTS_MAX_PADDING
                  ) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None:
    """Pack rows per slot for the "slots" mode, or None when padding would cost too much.

    The live rows (slot >= 0) must be sorted by slot; inert rows (slot < 0) may
    sit anywhere and get `packed_pos` = one past the packed rows (a zero row).
    """
    n = slot_idx.shape[0]
    live = torch.nonzero(slot_idx >= 0).flatten()
    live_slots = slot_idx[live]
    lo, hi = (int(live_slots[0]), int(live_slots[-1]) + 1) if live.numel() else (0, 0)
    counts = torch.bincount(live_slots - lo, minlength=hi - lo)
    m = int(counts.max()) if live.numel() else 0
    if (hi - lo) * m > max_padding * n:
        return None
    first_row = torch.cumsum(counts, 0) - counts
    within = torch.arange(live.numel()) - first_row[live_slots - lo]
    packed_pos = torch.full((n,), (hi - lo) * m, dtype=torch.int64)
    packed_pos[live] = (live_slots - lo) * m + within
    slot_rows = torch.full(((hi - lo) * m,), n, dtype=torch.int64)
    slot_rows[packed_pos[live]] = live
    return (lo, hi), slot_rows.view(hi - lo, m), packed_pos


def build_lora_plan(
    runs: list[tuple[int, int, list[Assignment]]],
    slot_scales: torch.Tensor,
    r_max: int,
    device: torch.device | str = "cpu",
    slot_targets: Sequence[frozenset[str]] | None = None,
) -> LoraPlan:
    """Build the plan from runs of consecutive tokens that share their assignments.

    runs: (first token row, number of rows, [(slot, weight, rank_lo, rank_hi), ...]);
    rows not covered by any run, or with an empty list, use the base model alone.
    slot_scales: [num_slots] alpha/rank (or alpha/sqrt(rank)) of each slot's adapter.
    slot_targets: [num_slots] the sub-projections each slot's adapter targets
    (None: every linear runs).
    """
    depth = max((len(a) for _, _, a in runs), default=0)
    levels = []
    for k in range(depth):
        # A stable sort by slot keeps each slot's runs in batch order.
        chosen = sorted(((a[k], start, count) for start, count, a in runs if len(a) > k), key=lambda c: c[0][0])
        counts = torch.tensor([c for _, _, c in chosen], dtype=torch.int64)
        token_idx = torch.cat([torch.arange(start, start + count) for _, start, count in chosen])

        def per_row(values, dtype):
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), counts)

        slot_idx = per_row([a[0] for a, _, _ in chosen], torch.int64)
        coeff = per_row([a[1] for a, _, _ in chosen], torch.float32) * slot_scales.float().cpu()[slot_idx]
        lo = per_row([a[2] for a, _, _ in chosen], torch.int64)
        hi = per_row([a[3] for a, _, _ in chosen], torch.int64)
        segments = []
        row = 0
        for (slot, _, rank_lo, rank_hi), start, count in chosen:
            segments.append(Segment(slot, row, row + count, start, rank_lo, rank_hi))
            row += count
        packing = None
        if len(segments) <= SEGMENTED_MAX_FEW or row >= SEGMENTED_MIN_AVG_TOKENS * len(segments):
            mode = "segments"
        else:
            packing = _slot_packing(slot_idx)
            mode = "gather" if packing is None else "slots"
        levels.append(LoraPlanLevel(
            token_idx=token_idx.to(device),
            slot_idx=slot_idx.to(device),
            coeff=coeff.to(device),
            rank_lo=lo.to(device),
            rank_hi=hi.to(device),
            seg_starts=torch.tensor([s.start for s in segments] + [row], dtype=torch.int64, device=device),
            seg_slots=torch.tensor([s.slot for s in segments], dtype=torch.int64, device=device),
            segments=tuple(segments),
            mode=mode,
            slot_range=packing[0] if packing else (0, 0),
            slot_rows=packing[1].to(device) if packing else None,
            packed_pos=packing[2].to(device) if packing else None,
        ))
    targets = None
    if slot_targets is not None:
        targets = frozenset().union(*(slot_targets[a[0]] for _, _, assignments in runs for a in assignments))
    return LoraPlan(levels=tuple(levels), targets=targets)


def with_mode(level: LoraPlanLevel, mode: str) -> LoraPlanLevel:
    """The same level run with another formulation (for tests and benchmarks)."""
    if mode != "slots":
        return replace(level, mode=mode)
    (lo, hi), slot_rows, packed_pos = _slot_packing(level.slot_idx.cpu(), max_padding=float("inf"))
    device = level.slot_idx.device
    return replace(level, mode=mode, slot_range=(lo, hi), slot_rows=slot_rows.to(device),
                   packed_pos=packed_pos.to(device))
