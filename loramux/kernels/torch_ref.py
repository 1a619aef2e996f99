"""Pure-torch LoRA shrink/expand: the reference backend and the CPU backend.

Three formulations of the same math; the plan layer's `mode` picks one
(see `loramux.kernels.plan` for when each wins). Inert rows (slot < 0) read
and write nothing: segments skip them on the host; the tensor formulations
read slot 0 / token 0 in their place and zero their contribution, so no
shape depends on how many rows are inert (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from loramux.kernels.plan import LoraPlanLayer


def _live(layer: LoraPlanLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N] bool live rows, and the slots and tokens to read (0 for inert rows)."""
    live = layer.slot_idx >= 0
    return live, torch.where(live, layer.slot_idx, 0), torch.where(live, layer.token_idx, 0)


def _packed_rows(rows: torch.Tensor, layer: LoraPlanLayer) -> torch.Tensor:
    """[N, d] rows -> [num_slots_in_range, m, d], zero where a slot has fewer rows."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return padded.index_select(0, layer.slot_rows.reshape(-1)).view(*layer.slot_rows.shape, rows.shape[1])


def _unpacked_rows(packed: torch.Tensor, layer: LoraPlanLayer) -> torch.Tensor:
    """[num_slots_in_range, m, d] -> [N, d] in row order; inert rows read the zero row appended."""
    flat = packed.reshape(-1, packed.shape[-1])
    return torch.cat([flat, flat.new_zeros(1, flat.shape[1])]).index_select(0, layer.packed_pos)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, layer: LoraPlanLayer) -> torch.Tensor:
    """Semantics: h[n] = A[slot[n]] @ x[token[n]] for every live row n of the plan layer (0 for inert rows).

    x: [T, d_in]; lora_a: [S, R, d_in] (R = r_max, or several r_max blocks
    stacked for fused projections); returns h: [N, R] in x's dtype.
    """
    if layer.mode == "segments":
        h = x.new_zeros(layer.num_rows, lora_a.shape[1])
        for seg in layer.segments:
            if seg.slot >= 0:
                torch.matmul(x[seg.token:seg.token + seg.end - seg.start], lora_a[seg.slot].T,
                             out=h[seg.start:seg.end])
        return h
    live, slots, tokens = _live(layer)
    x_rows = x.index_select(0, tokens) * live[:, None]
    if layer.mode == "slots":
        lo, hi = layer.slot_range
        return _unpacked_rows(torch.bmm(_packed_rows(x_rows, layer), lora_a[lo:hi].transpose(1, 2)), layer)
    return torch.bmm(lora_a.index_select(0, slots), x_rows.unsqueeze(2)).squeeze(2)


def _expand_block(y_cols: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, layer: LoraPlanLayer) -> None:
    """y_cols[token[n]] += coeff[n] * B[slot[n]][:, lo:hi] @ h[n, lo:hi] for one sub-projection."""
    if layer.mode == "segments":
        # A segment's rows share coefficient and rank range: slice the ranks, scale through addmm's alpha.
        for seg in layer.segments:
            if seg.slot < 0:
                continue
            h_seg = h[seg.start:seg.end, seg.rank_lo:seg.rank_hi]
            if layer.dynamic_coeff:  # per-token coefficients (composite gates): scale the rows
                h_seg = h_seg * layer.coeff[seg.start:seg.end, None]
            y_cols[seg.token:seg.token + seg.end - seg.start].addmm_(
                h_seg.to(y_cols.dtype), lora_b[seg.slot, :, seg.rank_lo:seg.rank_hi].T,
                alpha=1.0 if layer.dynamic_coeff else seg.coeff)
        return
    live, slots, tokens = _live(layer)
    h_scaled = (h * layer.rank_coeff * live[:, None]).to(y_cols.dtype)
    if layer.mode == "slots":
        lo, hi = layer.slot_range
        delta = _unpacked_rows(torch.bmm(_packed_rows(h_scaled, layer), lora_b[lo:hi].transpose(1, 2)), layer)
    else:
        delta = torch.bmm(lora_b.index_select(0, slots), h_scaled.unsqueeze(2)).squeeze(2)
    y_cols.index_add_(0, tokens, delta)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, layer: LoraPlanLayer,
                sub_starts: tuple[int, ...] = (0,)) -> None:
    """Semantics: for each fused sub-projection i with columns c_i = sub_starts[i]:sub_starts[i+1],
    y[token[n], c_i] += coeff[n] * B[slot[n]][c_i, lo:hi] @ h[n, i*r_max+lo : i*r_max+hi]
    for every live row n (slot[n] >= 0).

    y: [T, d_total] (updated in place); lora_b: [S, d_total, r_max] (the
    sub-projections' B stacked along the output); h: [N, n_sub * r_max] from
    `lora_shrink`; coeff, lo and hi come from the plan layer.
    """
    d_total, r_max = lora_b.shape[1], lora_b.shape[2]
    ends = list(sub_starts[1:]) + [d_total]
    for i, (start, end) in enumerate(zip(sub_starts, ends)):
        _expand_block(y[:, start:end], lora_b[:, start:end], h[:, i * r_max:(i + 1) * r_max], layer)
