"""Pure-torch LoRA shrink/expand: the reference backend and the CPU backend.

Three formulations of the same math; the plan level's `mode` picks one
(see `loramux.kernels.plan` for when each wins). A row contributes only when
it is live: its slot is >= 0 (inert rows are CUDA-graph padding) and
`slot_active[slot]` is set (the slot's adapter targets this linear).
Segments skip inert rows on the host; "slots" packs only the plan's rows
(its padding places read token 0 and a slot of their group, with a zero
mask); "gather" zeroes the contribution of rows that are not live, reading
slot 0 / token 0 in their place, so no shape depends on how many rows are
live (CUDA-graph safe).
The shrink applies each row's coefficient, rank range and liveness to h
once, so the expand only multiplies and adds. Coefficients are read from
the plan's device tensor (composite gates rewrite it per decoder layer);
mode "gather" also reads the rank ranges there (CUDA-graph levels rewrite
them between steps), the other modes the masks the plan built for the step.
Every formulation adds its rows into `y` one after another (`+=`,
`index_add_`), so a flat level, where a token has several rows, sums them.
A level with scaled rows (`scale_idx`, MoR experts) takes each row's λ_A from
the linear's `rank_scale` pool into the shrink's per-row factor, and its λ_B
from `out_scale` as one multiply of the expand's delta rows; scale_idx -1
reads a pool's last row, all ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loramux.kernels.plan import LoraPlanLevel, rank_range_mask


def _slots_and_tokens(level: LoraPlanLevel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mode "gather": [N] bool inert rows, and the slots and tokens to read (0 for inert rows)."""
    inert = level.slot_idx < 0
    return inert, torch.where(inert, 0, level.slot_idx), torch.where(inert, 0, level.token_idx)


def _row_scales(pool: torch.Tensor, level: LoraPlanLevel) -> torch.Tensor:
    """The pool's scaling vector of each row of a level with `scale_idx`: [N, w], in mode "slots" [P, w] per
    packed place (padding places read their row 0's; their h is 0). Row -1 reads the pool's last row (ones):
    `remainder` wraps it, and index_select runs far faster on the CPU than advanced indexing."""
    rows = level.scale_idx.index_select(0, level.packed_row) if level.mode == "slots" else level.scale_idx
    return pool.index_select(0, rows.remainder(pool.shape[0]))


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# A shrink's slot group with at most this many rows per slot multiplies the slot tensor as the left operand,
# in its own layout: torch's CPU bmm ran that about 2x faster at 1-2 rows (float32 A at SmolLM2's shapes) and
# slower from 4 rows on; the expand's B slices are faster as they are.
LEFT_OPERAND_MAX_ROWS = 2


def _group_products(rows: torch.Tensor, weights: torch.Tensor, level: LoraPlanLevel,
                    weights_left: bool = False) -> torch.Tensor:
    """Mode "slots": out[p] = weights[slot of place p] @ rows[p] over the packed layout, one batched GEMM per
    slot group reading the slot tensors in place. rows: [P, k]; weights: [S, out, k] -> [P, out].
    weights_left: groups of at most LEFT_OPERAND_MAX_ROWS rows per slot compute (weights @ rowsᵀ)ᵀ."""
    products, offset = [], 0
    for lo, hi, m in level.slot_groups:
        group = rows[offset:offset + (hi - lo) * m].view(hi - lo, m, rows.shape[1])
        if weights_left and m <= LEFT_OPERAND_MAX_ROWS:
            product = torch.bmm(weights[lo:hi], group.transpose(1, 2)).transpose(1, 2)
        else:
            product = torch.bmm(group, weights[lo:hi].transpose(1, 2))
        products.append(product.reshape(-1, weights.shape[1]))
        offset += (hi - lo) * m
    return _joined(products, 0) if products else rows.new_zeros(0, weights.shape[1])


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_active: torch.Tensor, level: LoraPlanLevel,
                num_subs: int = 1, rank_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: h[n] = coeff[n] * A[slot[n]] @ x[token[n]] for every live row n of the plan level, within its
    rank range [rank_lo, rank_hi) of each sub-projection's block; 0 elsewhere.

    x: [T, d_in]; lora_a: [S, num_subs * r_max, d_in] (the fused
    sub-projections' A stacked along the rank); slot_active: [S] int32,
    non-zero where the slot's adapter targets this linear. Returns h, for
    `lora_expand` only: [N, num_subs * r_max], or in mode "slots"
    [P, num_subs * r_max], one row per place of the packed layout; in
    lora_a's dtype (x is cast to it: the slot tensors may be kept in float32
    for a bfloat16 model), except for long segments (prefill), whose GEMMs
    run in x's dtype (each segment's slot tensors are cast to it).
    rank_scale: [V + 1, num_subs * r_max] λ_A pool (`LoraLinear.rank_scale`); row scale_idx[n] multiplies h[n].
    The coefficient is applied here, once, so the expand is products and one add.
    """
    width = lora_a.shape[1]
    assert width == num_subs * level.r_max or level.mode == "gather", "the plan's r_max is not the pool's"
    if level.mode == "slots":
        h = _group_products(x.index_select(0, level.packed_token).to(lora_a.dtype), lora_a, level, weights_left=True)
        scale = level.coeff.index_select(0, level.packed_row) * slot_active.index_select(0, level.packed_slot)
        factor = level.packed_mask * scale[:, None]
    elif level.mode == "segments":
        # Long GEMMs (prefill) run at the activations' dtype (bfloat16's rate on the CPU), casting one slot's
        # A per segment rather than every token of x; the few rows of a decode keep the slots' dtype
        # (`LoraLinear.slot_dtype` says why).
        dtype = x.dtype if level.long_segments else lora_a.dtype
        h = x.new_zeros(level.num_rows, width, dtype=dtype)
        for seg in level.segments:
            if seg.slot >= 0:
                torch.matmul(x[seg.token:seg.token + seg.end - seg.start].to(dtype), lora_a[seg.slot].to(dtype).T,
                             out=h[seg.start:seg.end])
        # Inert rows read slot 0 here; their rank_mask row is 0.
        factor = level.rank_mask * (level.coeff * slot_active.index_select(0, level.slot_idx.clamp(min=0)))[:, None]
    else:
        inert, slots, tokens = _slots_and_tokens(level)
        live = slot_active.index_select(0, slots).float().masked_fill(inert, 0.0)
        h = torch.bmm(lora_a.index_select(0, slots), x.index_select(0, tokens).to(lora_a.dtype).unsqueeze(2))
        # the rank ranges from the per-row tensors, which CUDA-graph levels (mode "gather") rewrite in place
        factor = rank_range_mask(level.rank_lo, level.rank_hi, width // num_subs) * (level.coeff * live)[:, None]
    factor = factor[:, None, :]
    if rank_scale is not None and level.scale_idx is not None:  # MoR experts: λ_A joins the per-row factor
        factor = factor * _row_scales(rank_scale, level).view(h.shape[0], num_subs, -1)
    scaled = h.view(h.shape[0], num_subs, -1) * factor  # float32 products, rounded once below
    return scaled.view(h.shape[0], width).to(h.dtype)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,), out_scale: torch.Tensor | None = None
                ) -> None:
    """Semantics: for each fused sub-projection i with columns c_i = sub_starts[i]:sub_starts[i+1],
    y[token[n], c_i] += λ_B[n, c_i] ⊙ (B[slot[n]][c_i, :] @ h[n, i*r_max : (i+1)*r_max]) for every row n of h
    (`lora_shrink` has applied the coefficient, the rank range and the liveness of each row).

    y: [T, d_total] (updated in place); lora_b: [S, d_total, r_max] (the
    sub-projections' B stacked along the output); h from `lora_shrink` on the
    same level; slot_active: [S] int32 (read by the shrink already);
    out_scale: [V + 1, d_total] λ_B pool (`LoraLinear.out_scale`), λ_B[n] = out_scale[scale_idx[n]] (1 without).
    The deltas are computed in h's dtype and added to y once.
    """
    d_total, r_max = lora_b.shape[1], lora_b.shape[2]
    ends = list(sub_starts[1:]) + [d_total]
    blocks = [(slice(start, end), slice(i * r_max, (i + 1) * r_max))  # (columns of y, ranks of h) per sub-projection
              for i, (start, end) in enumerate(zip(sub_starts, ends))]
    if level.mode == "segments":
        # Each segment's sub-projections write their columns of one delta block, added to y's rows once;
        # a segment's rows share their rank range: slice it (the plan's host copy).
        buffer = h.new_empty(max((s.end - s.start for s in level.segments), default=0), d_total)
        for seg in level.segments:
            if seg.slot >= 0:
                count, lo, hi = seg.end - seg.start, seg.rank_lo, seg.rank_hi
                delta, h_seg, b = buffer[:count], h[seg.start:seg.end], lora_b[seg.slot, :, lo:hi].to(h.dtype)
                for cols, ranks in blocks:
                    torch.mm(h_seg[:, ranks][:, lo:hi], b[cols].T, out=delta[:, cols])
                if out_scale is not None and seg.scale_row >= 0:
                    delta.mul_(out_scale[seg.scale_row])  # in place, as the gathered modes below
                y[seg.token:seg.token + count] += delta.to(y.dtype)
        return
    # The gathered modes add the whole delta row of every sub-projection in one index_add_: small
    # column-slice updates cost more than the GEMMs at decode shapes.
    if level.mode == "slots":
        delta = _joined([_group_products(h[:, ranks], lora_b[:, cols], level) for cols, ranks in blocks], 1)
        tokens = level.packed_token  # padding places add their zero rows to token 0
    else:
        _, slots, tokens = _slots_and_tokens(level)
        b_rows = lora_b.index_select(0, slots)
        delta = _joined([torch.bmm(b_rows[:, cols], h[:, ranks, None]).squeeze(2) for cols, ranks in blocks], 1)
    if out_scale is not None and level.scale_idx is not None:
        delta.mul_(_row_scales(out_scale, level))  # in place: delta is this call's own (a new [P, d] costs page faults)
    y.index_add_(0, tokens, delta.to(y.dtype))


def warm_up(shapes: Iterable[tuple[int, tuple[int, ...]]], r_max: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Nothing to compile: the torch ops are ready as they are (same signature as the Triton warm-up)."""
