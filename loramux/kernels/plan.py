"""The per-step LoRA plan: the one contract between engine, store and kernels.

For a step with `T` tokens every token has up to `K` assignments
`(slot, weight, rank_lo, rank_hi[, scale_row])` and every LoRA-aware linear computes

    y[t] += sum_k weight_k * scale[slot_k] * λ_B[j_k] ⊙ (B[slot_k][:, lo:hi] @ h_k),
    h_k = λ_A[j_k][lo:hi] ⊙ (A[slot_k][lo:hi, :] @ x[t])

where j_k = scale_row_k indexes the linear's pools of scaling vectors (a MoR
expert: λ_A over the ranks, λ_B over the output columns, see
`LoraLinear.rank_scale`); scale_row -1 (every plain, MoLE and MoRE assignment)
means no scaling, λ = 1. The N experts of a MoR composite are N assignments of
its one shared slot that differ in their scale row.

The plan stores the k-th assignment of every token in its own `LoraPlanLevel`
so that, inside one level, a token appears at most once: the expand kernels
then scatter into `y` without atomics, and the K levels are applied one after
the other. A backend whose expand sums repeated rows (torch's `index_add_`)
may take a *flat* plan instead: one level holding every assignment, so a
mixture of N adapters (a composite expert's members) costs one shrink and one
expand per projection, whatever N. Inside a level the rows are sorted by slot;
each segment is a run of consecutive tokens with the same slot (a prefill
chunk, or one decode token).

A row whose slot is negative is inert: the kernels read and write nothing for
it (CUDA-graph padding uses slot -1), whatever its token, coefficient and ranks.

The plan also says which formulation suits the level (`mode`):
- "segments": one dense GEMM per segment (SGMV); long segments (prefill),
  or very few of them (a decode batch of one or two sequences).
- "slots": batched GEMMs over contiguous ranges of pool slots (slot groups),
  reading the slot tensors in place; rows are packed per slot and padded to
  the busiest slot's count in their group. Groups are cut where a gap of
  unused slots or a popular slot would cost more than another GEMM. Decode
  with many adapters, unless gathering is estimated cheaper.
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
# Costs in computed rows that choose between "slots" and "gather" and cut slot groups (bf16 decode at
# SmolLM2's q/k/v shape on the CPU, one thread): every slot in a group's range is read in full, used or not;
# every group is one more batched GEMM per op and its packing; gathering copies each row's A and B first.
SLOT_READ_ROWS = 16
GROUP_ROWS = 64
GATHER_ROWS = 32


def long_segments(num_rows: int, num_segments: int) -> bool:
    """The segments average at least SEGMENTED_MIN_AVG_TOKENS rows (prefill chunks, not decode tokens)."""
    return num_rows >= SEGMENTED_MIN_AVG_TOKENS * num_segments


def rank_range_mask(rank_lo: torch.Tensor, rank_hi: torch.Tensor, r_max: int) -> torch.Tensor:
    """[N, r_max] bool: rank r is in the row's range [rank_lo, rank_hi); rank_lo, rank_hi: [N]."""
    rank = torch.arange(r_max, device=rank_lo.device)
    return (rank >= rank_lo[:, None]) & (rank < rank_hi[:, None])


class Segment(NamedTuple):
    """Rows [start, end) of a plan level: tokens token..token+end-start, all with the same assignment."""

    slot: int
    start: int
    end: int
    token: int
    rank_lo: int
    rank_hi: int
    scale_row: int = -1  # the rows' pool row of scaling vectors (-1: none)


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
      mix_index:  [N] int64    place of the row's assignment in its token's mix (a composite's member,
                               whose gate weight the row takes); None in CUDA-graph levels
      scale_idx:  [N] int64    row of the linears' scaling-vector pools (a MoR expert), -1 = no scaling;
                               None when no row of the level is scaled (the ops then skip the scaling)
    `segments` describes the same rows run by run, as Python numbers, for host-side loops.
    `unique_tokens`: False for a flat level, where a token has one row per assignment.
    `r_max`: the pool's padded rank (0 in levels built elsewhere, which run mode "gather").
    Mode "segments" also reads
      rank_mask:  [N, r_max] float32  1 inside the row's rank range, 0 elsewhere and on inert rows
    Mode "slots": each of `slot_groups` (first slot, end slot, m) is one
    batched GEMM over slots first..end-1 with m packed rows per slot; the
    packed layout lists the places of every group in turn (P = sum of
    (end - first) * m), a live row at one place, padding at the others:
      packed_row:   [P] int64  the row at each place (0 at padding)
      packed_token: [P] int64  its token (0 at padding)
      packed_slot:  [P] int64  the slot whose tensors the group's GEMM reads there
      packed_mask:  [P, r_max] float32  the row's rank_mask (0 at padding)
    These are built once per step, so the ops of every layer only read them.
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
    mix_index: torch.Tensor | None = None
    scale_idx: torch.Tensor | None = None
    unique_tokens: bool = True
    r_max: int = 0
    rank_mask: torch.Tensor | None = None
    slot_groups: tuple[tuple[int, int, int], ...] = ()
    packed_row: torch.Tensor | None = None
    packed_token: torch.Tensor | None = None
    packed_slot: torch.Tensor | None = None
    packed_mask: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.token_idx.shape[0])

    @property
    def long_segments(self) -> bool:
        return long_segments(self.num_rows, len(self.segments))


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


# (slot, weight, rank_lo, rank_hi) or (slot, weight, rank_lo, rank_hi, scale_row)
Assignment = tuple[int, float, int, int] | tuple[int, float, int, int, int]


def _slot_groups(slots: list[int], counts: list[int]) -> tuple[list[tuple[int, int, int]], float]:
    """Cut the used slots (ascending, with their row counts) into groups (first slot, end slot, m) that
    minimise the cost: a group reads every slot of its range and pads each to its busiest slot.
    Returns the groups and their cost in rows."""
    best = [0.0] * (len(slots) + 1)  # best[j]: the cheapest cut of the first j used slots
    cut = [0] * (len(slots) + 1)
    for j in range(1, len(slots) + 1):
        best[j], m = float("inf"), 0
        for i in range(j - 1, -1, -1):  # group = used slots i..j-1
            m = max(m, counts[i])
            cost = best[i] + (slots[j - 1] - slots[i] + 1) * (m + SLOT_READ_ROWS) + GROUP_ROWS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(slots)
    while j:
        i = cut[j]
        groups.append((slots[i], slots[j - 1] + 1, max(counts[i:j])))
        j = i
    return groups[::-1], best[-1]


def _slot_packing(slot_idx: torch.Tensor, force: bool = False
                  ) -> tuple[tuple[tuple[int, int, int], ...], torch.Tensor, torch.Tensor] | None:
    """Pack rows per slot for the "slots" mode, or None (unless `force`) when gathering would cost less.

    Returns the slot groups and, per packed place, its row (-1 at padding) and
    its slot. The live rows (slot >= 0) must be sorted by slot; inert rows
    (slot < 0) may sit anywhere and get no place.
    """
    live = torch.nonzero(slot_idx >= 0).flatten()
    used, counts = torch.unique_consecutive(slot_idx[live], return_counts=True)
    groups, cost = _slot_groups(used.tolist(), counts.tolist())
    if not force and cost > live.numel() * GATHER_ROWS + GROUP_ROWS:
        return None
    group_starts, offset = [], 0  # each group's first place in the packed layout
    for lo, hi, m in groups:
        group_starts.append(offset)
        offset += (hi - lo) * m
    # Place of each used slot's first row: its group's start + (slot - group's first slot) * group's m.
    slot_place = torch.tensor([start + (s - lo) * m for (lo, hi, m), start in zip(groups, group_starts)
                               for s in range(lo, hi)], dtype=torch.int64)
    slot_of_place = torch.cat([torch.arange(lo, hi) for lo, hi, _ in groups]) if groups else used
    first_row = torch.cumsum(counts, 0) - counts
    rank_in_slot = torch.arange(live.numel()) - torch.repeat_interleave(first_row, counts)
    place_index = torch.searchsorted(slot_of_place, slot_idx[live])
    packed_row = torch.full((offset,), -1, dtype=torch.int64)
    packed_row[slot_place[place_index] + rank_in_slot] = live
    packed_slot = torch.cat([torch.arange(lo, hi).repeat_interleave(m) for lo, hi, m in groups]) if groups \
        else used
    return tuple(groups), packed_row, packed_slot


_NO_MODE_TENSORS = dict(rank_mask=None, slot_groups=(), packed_row=None, packed_token=None, packed_slot=None,
                        packed_mask=None)


def _mode_tensors(mode: str, slot_idx: torch.Tensor, token_idx: torch.Tensor, rank_lo: torch.Tensor,
                  rank_hi: torch.Tensor, r_max: int, device: torch.device | str,
                  packing: tuple[tuple[tuple[int, int, int], ...], torch.Tensor, torch.Tensor] | None = None
                  ) -> dict:
    """The fields of `LoraPlanLevel` that `mode` reads beside the per-row tensors (host tensors in, on `device`
    out); `packing` from `_slot_packing` for mode "slots"."""
    if mode == "gather":
        return dict(_NO_MODE_TENSORS)
    rank_mask = (rank_range_mask(rank_lo, rank_hi, r_max) & (slot_idx[:, None] >= 0)).float()
    if mode == "segments":
        return dict(_NO_MODE_TENSORS, rank_mask=rank_mask.to(device))
    groups, packed_row, packed_slot = packing
    padding = packed_row < 0
    row = packed_row.clamp(min=0)
    return dict(_NO_MODE_TENSORS, slot_groups=groups, packed_row=row.to(device),
                packed_token=token_idx[row].masked_fill(padding, 0).to(device), packed_slot=packed_slot.to(device),
                packed_mask=rank_mask[row].masked_fill(padding[:, None], 0.0).to(device))


def _scale_row(assignment: Assignment) -> int:
    return assignment[4] if len(assignment) > 4 else -1


def build_lora_plan(
    runs: list[tuple[int, int, list[Assignment]]],
    slot_scales: torch.Tensor,
    r_max: int,
    device: torch.device | str = "cpu",
    slot_targets: Sequence[frozenset[str]] | None = None,
    flat: bool = False,
    mode_tensors: bool = True,
) -> LoraPlan:
    """Build the plan from runs of consecutive tokens that share their assignments.

    runs: (first token row, number of rows, [(slot, weight, rank_lo, rank_hi[, scale_row]), ...]);
    rows not covered by any run, or with an empty list, use the base model alone.
    slot_scales: [num_slots] alpha/rank (or alpha/sqrt(rank)) of each slot's adapter.
    slot_targets: [num_slots] the sub-projections each slot's adapter targets
    (None: every linear runs).
    flat: one level with every assignment (only for a backend that sums repeated rows, see the module doc).
    mode_tensors: build the masks and packed layout that modes "segments" and "slots" read (False for a
    backend that reads only the per-row tensors: no host work and no copies to the device for them).
    """
    depth = max((len(a) for _, _, a in runs), default=0)
    # (assignment, first token, rows, place in the mix) of each level
    per_level = [[(a[k], start, count, k) for start, count, a in runs if len(a) > k] for k in range(depth)]
    if flat and depth > 1:
        per_level = [[c for level in per_level for c in level]]
    levels = []
    for chosen in per_level:
        # A stable sort by slot keeps each slot's runs in batch order.
        chosen.sort(key=lambda c: c[0][0])
        counts = torch.tensor([c for _, _, c, _ in chosen], dtype=torch.int64)
        token_idx = torch.cat([torch.arange(start, start + count) for _, start, count, _ in chosen])

        def per_row(values, dtype):
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), counts)

        slot_idx = per_row([a[0] for a, _, _, _ in chosen], torch.int64)
        coeff = per_row([a[1] for a, _, _, _ in chosen], torch.float32) * slot_scales.float().cpu()[slot_idx]
        lo = per_row([a[2] for a, _, _, _ in chosen], torch.int64)
        hi = per_row([a[3] for a, _, _, _ in chosen], torch.int64)
        scale_rows = [_scale_row(a) for a, _, _, _ in chosen]
        segments = []
        row = 0
        for (a, start, count, _), scale_row in zip(chosen, scale_rows):
            segments.append(Segment(a[0], row, row + count, start, a[2], a[3], scale_row))
            row += count
        packing = None
        if len(segments) <= SEGMENTED_MAX_FEW or long_segments(row, len(segments)):
            mode = "segments"
        else:
            packing = _slot_packing(slot_idx)
            mode = "gather" if packing is None else "slots"
        extra = _mode_tensors(mode, slot_idx, token_idx, lo, hi, r_max, device, packing) if mode_tensors \
            else _NO_MODE_TENSORS
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
            mix_index=per_row([k for _, _, _, k in chosen], torch.int64).to(device),
            scale_idx=per_row(scale_rows, torch.int64).to(device) if max(scale_rows) >= 0 else None,
            unique_tokens=len(per_level) == depth,
            r_max=r_max,
            **extra,
        ))
    targets = None
    if slot_targets is not None:
        targets = frozenset().union(*(slot_targets[a[0]] for _, _, assignments in runs for a in assignments))
    return LoraPlan(levels=tuple(levels), targets=targets)


def with_mode(level: LoraPlanLevel, mode: str) -> LoraPlanLevel:
    """The same level run with another formulation (for tests and benchmarks); also rebuilds the mode's
    tensors after a level's per-row tensors were replaced."""
    host = {name: getattr(level, name).cpu() for name in ("slot_idx", "token_idx", "rank_lo", "rank_hi")}
    packing = _slot_packing(host["slot_idx"], force=True) if mode == "slots" else None
    return replace(level, mode=mode, **_mode_tensors(mode, **host, r_max=level.r_max,
                                                     device=level.slot_idx.device, packing=packing))
