"""Pure-torch LoRA shrink/expand: the reference backend and the CPU backend.

Three formulations of the same math; the plan level's `mode` picks one
(see `loramux.kernels.plan` for when each wins). A row contributes only when
it is live: its slot is >= 0 (inert rows are CUDA-graph padding) and
`slot_active[slot]` is set (the slot's adapter targets this linear).
Segments skip inert rows on the host; everything else zeroes the
contribution of rows that are not live, reading slot 0 / token 0 in their
place, so no shape depends on how many rows are live (CUDA-graph safe).
Coefficients and rank ranges are read from the plan's tensors, never from
host copies, so they may be rewritten on the device between steps. Every
formulation adds its rows into `y` one after another (`+=`,
`index_add_`), so a flat level, where a token has several rows, sums them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loramux.kernels.plan import LoraPlanLevel


def _live(level: LoraPlanLevel, slot_active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N] float 1/0 per live row, and the slots and tokens to read (0 for inert rows)."""
    inert = level.slot_idx < 0
    slots = torch.where(inert, 0, level.slot_idx)
    live = slot_active.index_select(0, slots).float().masked_fill(inert, 0.0)
    return live, slots, torch.where(inert, 0, level.token_idx)


def _slot_group_products(rows: torch.Tensor, weights: torch.Tensor, level: LoraPlanLevel) -> torch.Tensor:
    """Mode "slots": out[n] = weights[slot[n]] @ rows[n], as one batched GEMM per slot group reading the
    slot tensors in place. rows: [N, k]; weights: [S, out, k] -> [N, out] (inert rows get zeros)."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    packed = padded.index_select(0, level.slot_rows)  # [P, k]
    products, offset = [], 0
    for lo, hi, m in level.slot_groups:
        group = packed[offset:offset + (hi - lo) * m].view(hi - lo, m, rows.shape[1])
        products.append(torch.bmm(group, weights[lo:hi].transpose(1, 2)).view(-1, weights.shape[1]))
        offset += (hi - lo) * m
    products.append(rows.new_zeros(1, weights.shape[1]))  # the place of inert rows
    return torch.cat(products).index_select(0, level.packed_pos)


def _stacked_rank_mask(level: LoraPlanLevel, width: int, num_subs: int, rows: slice = slice(None)) -> torch.Tensor:
    """[n, width] bool: stacked rank j (block j // r_max, rank j % r_max) is in [rank_lo, rank_hi)."""
    local = torch.arange(width, device=level.rank_lo.device) % (width // num_subs)
    return (local >= level.rank_lo[rows, None]) & (local < level.rank_hi[rows, None])


def _row_scale(level: LoraPlanLevel, r_max: int) -> torch.Tensor:
    """[N, r_max] float32: coeff where rank_lo <= r < rank_hi, else 0."""
    return _stacked_rank_mask(level, r_max, 1) * level.coeff[:, None]


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_active: torch.Tensor, level: LoraPlanLevel,
                num_subs: int = 1) -> torch.Tensor:
    """Semantics: h[n] = A[slot[n]] @ x[token[n]] for every live row n of the plan level, within its rank
    range [rank_lo, rank_hi) of each sub-projection's block; 0 elsewhere.

    x: [T, d_in]; lora_a: [S, num_subs * r_max, d_in] (the fused
    sub-projections' A stacked along the rank); slot_active: [S] int32,
    non-zero where the slot's adapter targets this linear; returns h: [N, num_subs * r_max] in lora_a's dtype
    (x is cast to it: the slot tensors may be kept in float32 for a bfloat16 model).
    """
    width = lora_a.shape[1]
    if level.mode == "segments":
        h = lora_a.new_zeros(level.num_rows, width)
        for seg in level.segments:
            if seg.slot >= 0:
                rows = slice(seg.start, seg.end)
                x_seg = x[seg.token:seg.token + seg.end - seg.start].to(lora_a.dtype)
                torch.matmul(x_seg, lora_a[seg.slot].T, out=h[rows])
                h[rows] *= _stacked_rank_mask(level, width, num_subs, rows) * slot_active[seg.slot]
        return h
    live, slots, tokens = _live(level, slot_active)
    x_rows = x.index_select(0, tokens).to(lora_a.dtype)
    if level.mode == "slots":
        h = _slot_group_products(x_rows, lora_a, level)
    else:
        h = torch.bmm(lora_a.index_select(0, slots), x_rows.unsqueeze(2)).squeeze(2)
    return h * (_stacked_rank_mask(level, width, num_subs) * live[:, None]).to(h.dtype)


def _expand_segments(y_cols: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                     level: LoraPlanLevel) -> None:
    """y_cols[token[n]] += coeff[n] * B[slot[n]][:, lo:hi] @ h[n, lo:hi] for one sub-projection, segment by segment."""
    # A segment's rows share their rank range: slice it (the plan's host copy); coefficients stay on the device.
    for seg in level.segments:
        if seg.slot >= 0:
            lo, hi = seg.rank_lo, seg.rank_hi
            scale = level.coeff[seg.start:seg.end, None] * slot_active[seg.slot]
            scaled = (h[seg.start:seg.end, lo:hi].float() * scale).to(lora_b.dtype)
            delta = scaled @ lora_b[seg.slot, :, lo:hi].T
            y_cols[seg.token:seg.token + seg.end - seg.start] += delta.to(y_cols.dtype)


def _scaled_rows(level: LoraPlanLevel, slot_active: torch.Tensor, r_max: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the gathered modes: each row's factor on h [N, r_max] (coeff inside its rank range, 0 for rows
    that are not live), and the slots and tokens to read."""
    live, slots, tokens = _live(level, slot_active)
    return _row_scale(level, r_max) * live[:, None], slots, tokens


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,)) -> None:
    """Semantics: for each fused sub-projection i with columns c_i = sub_starts[i]:sub_starts[i+1],
    y[token[n], c_i] += coeff[n] * B[slot[n]][c_i, lo:hi] @ h[n, i*r_max+lo : i*r_max+hi]
    for every live row n (slot[n] >= 0 and slot_active[slot[n]] != 0).

    y: [T, d_total] (updated in place); lora_b: [S, d_total, r_max] (the
    sub-projections' B stacked along the output); h: [N, n_sub * r_max] from
    `lora_shrink`; slot_active: [S] int32; coeff, lo and hi come from the plan level.
    The deltas are computed in lora_b's dtype and added to y once.
    """
    d_total, r_max = lora_b.shape[1], lora_b.shape[2]
    ends = list(sub_starts[1:]) + [d_total]
    blocks = [(slice(start, end), slice(i * r_max, (i + 1) * r_max))  # (columns of y, ranks of h) per sub-projection
              for i, (start, end) in enumerate(zip(sub_starts, ends))]
    if level.mode == "segments":
        for cols, ranks in blocks:
            _expand_segments(y[:, cols], lora_b[:, cols], h[:, ranks], slot_active, level)
        return
    # The gathered modes add the whole delta row of every sub-projection in one index_add_: small
    # column-slice updates cost more than the GEMMs at decode shapes.
    factor, slots, tokens = _scaled_rows(level, slot_active, r_max)
    h_scaled = (h.float() * factor.repeat(1, len(blocks))).to(lora_b.dtype)
    if level.mode == "slots":
        parts = [_slot_group_products(h_scaled[:, ranks], lora_b[:, cols], level) for cols, ranks in blocks]
    else:
        b_rows = lora_b.index_select(0, slots)
        parts = [torch.bmm(b_rows[:, cols], h_scaled[:, ranks, None]).squeeze(2) for cols, ranks in blocks]
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    y.index_add_(0, tokens, delta.to(y.dtype))


def warm_up(shapes: Iterable[tuple[int, tuple[int, ...]]], r_max: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Nothing to compile: the torch ops are ready as they are (same signature as the Triton warm-up)."""
