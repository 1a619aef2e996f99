"""The per-step LoRA plan: the one contract between engine, store and kernels.

For a step with `T` tokens every token has up to `K` assignments
`(slot, weight, rank_lo, rank_hi)` and every LoRA-aware linear computes

    y[t] += sum_k weight_k * scale[slot_k] * B[slot_k][:, lo:hi] @ (A[slot_k][lo:hi, :] @ x[t])

The plan stores the k-th assignment of every token in its own `LoraPlanLayer`
so that, inside one layer, a token appears at most once: the expand kernels
then scatter into `y` without atomics, and the K layers are applied one after
the other. Inside a layer the assignments are sorted by slot into segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A layer whose segments average at least this many tokens runs the segmented
# (SGMV) formulation; shorter segments (decode) run the gathered (BGMV) one.
# Measured on the CPU with loadtest/bench_lora_ops.py: gathering beats a Python
# loop over segments until segments are about this long.
SEGMENTED_MIN_AVG_TOKENS = 8


@dataclass(frozen=True)
class LoraPlanLayer:
    """One assignment per token at most; rows sorted by slot.

    Tensors (N = number of assignments in this layer, S = segments):
      token_idx:  [N] int64    row of x / y the assignment reads and writes
      slot_idx:   [N] int64    slot of the adapter in the pool
      coeff:      [N] float32  weight * scale[slot]
      rank_lo:    [N] int64    first rank used (inclusive)
      rank_hi:    [N] int64    last rank used (exclusive)
      rank_coeff: [N, r_max]   coeff where lo <= j < hi, else 0 (the torch path's mask)
      seg_starts: [S + 1] int64  segment boundaries into the N rows
      seg_slots:  [S] int64      slot of each segment
    `segments` repeats (slot, start, end) as Python ints for host-side loops.
    """

    token_idx: torch.Tensor
    slot_idx: torch.Tensor
    coeff: torch.Tensor
    rank_lo: torch.Tensor
    rank_hi: torch.Tensor
    rank_coeff: torch.Tensor
    seg_starts: torch.Tensor
    seg_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    use_segments: bool

    @property
    def num_rows(self) -> int:
        return int(self.token_idx.shape[0])


@dataclass(frozen=True)
class LoraPlan:
    """All LoRA assignments of one step; `layers` is empty for a base-only step."""

    layers: tuple[LoraPlanLayer, ...]

    @property
    def is_empty(self) -> bool:
        return not self.layers


EMPTY_PLAN = LoraPlan(layers=())


Assignment = tuple[int, float, int, int]  # (slot, weight, rank_lo, rank_hi)


def build_lora_plan(
    runs: list[tuple[int, int, list[Assignment]]],
    slot_scales: torch.Tensor,
    r_max: int,
    device: torch.device | str = "cpu",
) -> LoraPlan:
    """Build the plan from runs of consecutive tokens that share their assignments.

    runs: (first row, number of rows, [(slot, weight, rank_lo, rank_hi), ...]);
    rows not covered by any run, or with an empty list, use the base model alone.
    slot_scales: [num_slots] alpha/rank (or alpha/sqrt(rank)) of each slot's adapter.
    """
    depth = max((len(a) for _, _, a in runs), default=0)
    layers = []
    for k in range(depth):
        # Stable sort by slot keeps each slot's rows in batch order: one segment per slot.
        chosen = sorted(((a[k], start, count) for start, count, a in runs if len(a) > k), key=lambda c: c[0][0])
        counts = torch.tensor([c for _, _, c in chosen], dtype=torch.int64)
        token_idx = torch.cat([torch.arange(start, start + count) for _, start, count in chosen])

        def per_row(values, dtype):
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), counts)

        slot_idx = per_row([a[0] for a, _, _ in chosen], torch.int64)
        coeff = per_row([a[1] for a, _, _ in chosen], torch.float32) * slot_scales.float().cpu()[slot_idx]
        lo = per_row([a[2] for a, _, _ in chosen], torch.int64)
        hi = per_row([a[3] for a, _, _ in chosen], torch.int64)
        ranks = torch.arange(r_max)
        in_range = (ranks[None, :] >= lo[:, None]) & (ranks[None, :] < hi[:, None])
        segments = []
        row = 0
        for (slot, *_), _, count in chosen:
            if segments and segments[-1][0] == slot:
                segments[-1] = (slot, segments[-1][1], row + count)
            else:
                segments.append((slot, row, row + count))
            row += count
        layers.append(LoraPlanLayer(
            token_idx=token_idx.to(device),
            slot_idx=slot_idx.to(device),
            coeff=coeff.to(device),
            rank_lo=lo.to(device),
            rank_hi=hi.to(device),
            rank_coeff=(in_range * coeff[:, None]).to(device),
            seg_starts=torch.tensor([s[1] for s in segments] + [row], dtype=torch.int64, device=device),
            seg_slots=torch.tensor([s[0] for s in segments], dtype=torch.int64, device=device),
            segments=tuple(segments),
            use_segments=row >= SEGMENTED_MIN_AVG_TOKENS * len(segments),
        ))
    return LoraPlan(layers=tuple(layers))
