"""Triton LoRA kernels: SGMV (segments) for prefill, BGMV (one row per program) for decode.

Same signatures and semantics as `loramux.kernels.torch_ref`. The plan layer's
mode picks the variant: "segments" runs the segmented GEMM kernels, every
other mode the gathered GEMV kernels.

Block sizes come from `block_sizes()`, a fixed table by rank and width (no
autotuning at request time):
- rank tiles are the padded rank itself (r_max ≤ 64 fits one tile), at least
  16 because `tl.dot` needs 16-wide operands;
- SGMV uses 32-row tiles (16 for short segments) and 64-wide d tiles: a
  rank-16 adapter's A tile is then 16 x 64, small enough to keep several
  programs per SM busy while reusing it across 32 tokens;
- BGMV reads the adapter once per row, so it uses wide 128-column tiles over
  d_in (shrink) and d_out (expand) to make each load long and coalesced.

Fused projections take one launch each way: the shrink reads the stacked A
of q/k/v (or gate/up), the expand writes every sub-projection's columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.plan import LoraPlanLayer


def block_sizes(kind: str, width: int, r_max: int, max_seg_len: int = 1) -> dict[str, int]:
    """The tile table. kind: sgmv or bgmv; width: d_in (shrink) or d_out (expand)."""
    block_r = max(16, triton.next_power_of_2(r_max))
    if kind == "sgmv":
        return {"BLOCK_M": 16 if max_seg_len <= 16 else 32, "BLOCK_D": 64, "BLOCK_R": block_r}
    return {"BLOCK_D": 128 if width >= 128 else max(16, triton.next_power_of_2(width)), "BLOCK_R": block_r}


@triton.jit
def _segment_tile(seg_start_ptr, seg, BLOCK_M: tl.constexpr):
    """Rows of this program's tile of segment `seg` (grid axis 1 walks the tiles), which are inside it,
    and whether the tile holds any row at all (segments shorter than the longest have empty tiles)."""
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    first = start + tl.program_id(1) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    return rows, rows < end, first < end


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, token_ptr, seg_start_ptr, seg_slot_ptr,
                        d_in, R, stride_xt, stride_as, stride_ar, stride_hn,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: h[n, r] = sum_k A[slot(seg), r, k] * x[token[n], k] for the rows n of one segment tile.

    Grid: (segments, row tiles of the longest segment, rank tiles).
    """
    seg = tl.program_id(0)
    rows, row_ok, active = _segment_tile(seg_start_ptr, seg, BLOCK_M)
    slot = tl.load(seg_slot_ptr + seg)
    if active & (slot >= 0):  # a segment of inert rows (slot < 0) reads and writes nothing
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        rs = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :],
                        mask=row_ok[:, None] & (ks[None, :] < d_in), other=0.0)
            a = tl.load(a_ptr + slot * stride_as + rs[None, :] * stride_ar + ks[:, None],
                        mask=(rs[None, :] < R) & (ks[:, None] < d_in), other=0.0)
            acc += tl.dot(x, a)
        tl.store(h_ptr + rows[:, None] * stride_hn + rs[None, :], acc, mask=row_ok[:, None] & (rs[None, :] < R))


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, token_ptr, slot_ptr,
                        d_in, R, stride_xt, stride_as, stride_ar, stride_hn,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: h[n, r] = sum_k A[slot[n], r, k] * x[token[n], k]; one row per program.

    Grid: (rows, rank tiles).
    """
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)
    if slot >= 0:  # an inert row reads and writes nothing (h is zeroed by the caller)
        token = tl.load(token_ptr + n)
        rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + token * stride_xt + ks, mask=ks < d_in, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + rs[:, None] * stride_ar + ks[None, :],
                        mask=(rs[:, None] < R) & (ks[None, :] < d_in), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(h_ptr + n * stride_hn + rs, acc, mask=rs < R)


@triton.jit
def _sub_of_column(js, sub1, sub2):
    """Which fused sub-projection each output column belongs to (at most three: q, k, v)."""
    return (js >= sub1).to(tl.int32) + (js >= sub2).to(tl.int32)


@triton.jit
def _sgmv_expand_kernel(y_ptr, b_ptr, h_ptr, token_ptr, seg_start_ptr, seg_slot_ptr, coeff_ptr, lo_ptr, hi_ptr,
                        d_total, r_max, sub1, sub2, stride_yt, stride_bs, stride_bd, stride_hn,
                        NUM_SUBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """Semantics: y[token[n], j] += coeff[n] * sum_{lo[n] <= r < hi[n]} B[slot, j, r] * h[n, sub(j) * r_max + r].

    sub(j) is the fused sub-projection of column j (columns from sub1 on are
    sub 1, from sub2 on sub 2). Grid: (segments, row tiles of the longest
    segment, d_total tiles). A tile may straddle sub-projections, so each sub's
    rank block is multiplied with the columns of that sub only.
    """
    seg = tl.program_id(0)
    rows, row_ok, active = _segment_tile(seg_start_ptr, seg, BLOCK_M)
    slot = tl.load(seg_slot_ptr + seg)
    if active & (slot >= 0):  # a segment of inert rows (slot < 0) reads and writes nothing
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        coeff = tl.load(coeff_ptr + rows, mask=row_ok, other=0.0)
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0)
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=0)
        rs = tl.arange(0, BLOCK_R)
        in_rank = (rs[None, :] >= lo[:, None]) & (rs[None, :] < hi[:, None]) & (rs[None, :] < r_max)
        js = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        b = tl.load(b_ptr + slot * stride_bs + js[None, :] * stride_bd + rs[:, None],
                    mask=(js[None, :] < d_total) & (rs[:, None] < r_max), other=0.0)
        column_sub = _sub_of_column(js, sub1, sub2)
        delta = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for sub in tl.static_range(NUM_SUBS):
            h = tl.load(h_ptr + rows[:, None] * stride_hn + sub * r_max + rs[None, :],
                        mask=row_ok[:, None] & in_rank, other=0.0)
            h = (h * coeff[:, None]).to(b_ptr.dtype.element_ty)
            delta += tl.dot(h, tl.where(column_sub[None, :] == sub, b, 0.0).to(b_ptr.dtype.element_ty))
        out = y_ptr + tokens[:, None] * stride_yt + js[None, :]
        ok = row_ok[:, None] & (js[None, :] < d_total)
        y = tl.load(out, mask=ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bgmv_expand_kernel(y_ptr, b_ptr, h_ptr, token_ptr, slot_ptr, coeff_ptr, lo_ptr, hi_ptr,
                        d_total, r_max, sub1, sub2, stride_yt, stride_bs, stride_bd, stride_hn,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: y[token[n], j] += coeff[n] * sum_{lo[n] <= r < hi[n]} B[slot[n], j, r] * h[n, sub(j) * r_max + r].

    Grid: (rows, d_total tiles); each column reads the rank block of its own sub-projection.
    """
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)
    if slot >= 0:  # an inert row reads and writes nothing
        token = tl.load(token_ptr + n)
        coeff = tl.load(coeff_ptr + n)
        lo = tl.load(lo_ptr + n)
        hi = tl.load(hi_ptr + n)
        rs = tl.arange(0, BLOCK_R)
        js = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        column_ok = js < d_total
        rank_ok = (rs >= lo) & (rs < hi) & (rs < r_max)
        column_sub = _sub_of_column(js, sub1, sub2)
        h = tl.load(h_ptr + n * stride_hn + column_sub[:, None] * r_max + rs[None, :],
                    mask=column_ok[:, None] & rank_ok[None, :], other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + js[:, None] * stride_bd + rs[None, :],
                    mask=column_ok[:, None] & (rs[None, :] < r_max), other=0.0).to(tl.float32)
        delta = tl.sum(b * h, axis=1) * coeff
        out = y_ptr + token * stride_yt + js
        y = tl.load(out, mask=column_ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=column_ok)


def _max_segment_len(layer: LoraPlanLayer) -> int:
    return max(seg.end - seg.start for seg in layer.segments)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, layer: LoraPlanLayer) -> torch.Tensor:
    """Semantics: h[n] = A[slot[n]] @ x[token[n]].

    x: [T, d_in] (row-contiguous); lora_a: [S, R, d_in] contiguous; returns h: [N, R] float32.
    """
    d_in, R = x.shape[1], lora_a.shape[1]
    assert x.stride(1) == 1 and lora_a.is_contiguous()
    h = torch.zeros(layer.num_rows, R, dtype=torch.float32, device=x.device)
    if layer.mode == "segments":
        longest = _max_segment_len(layer)
        bs = block_sizes("sgmv", d_in, R, longest)
        grid = (len(layer.segments), triton.cdiv(longest, bs["BLOCK_M"]), triton.cdiv(R, bs["BLOCK_R"]))
        _sgmv_shrink_kernel[grid](x, lora_a, h, layer.token_idx, layer.seg_starts, layer.seg_slots,
                                  d_in, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0), **bs)
    else:
        bs = block_sizes("bgmv", d_in, R)
        grid = (layer.num_rows, triton.cdiv(R, bs["BLOCK_R"]))
        _bgmv_shrink_kernel[grid](x, lora_a, h, layer.token_idx, layer.slot_idx,
                                  d_in, R, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0), **bs)
    return h


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, layer: LoraPlanLayer,
                sub_starts: tuple[int, ...] = (0,)) -> None:
    """Semantics: for each fused sub-projection i with columns c_i = sub_starts[i]:sub_starts[i+1],
    y[token[n], c_i] += coeff[n] * B[slot[n]][c_i, lo:hi] @ h[n, i*r_max+lo : i*r_max+hi].

    One launch for the whole fused projection. y: [T, d_total] row-contiguous,
    updated in place; lora_b: [S, d_total, r_max] contiguous (the
    sub-projections' B stacked along the output); h: [N, n_sub * r_max].
    """
    d_total, r_max = lora_b.shape[1], lora_b.shape[2]
    assert y.stride(1) == 1 and lora_b.is_contiguous() and h.stride(1) == 1 and 1 <= len(sub_starts) <= 3
    subs = list(sub_starts[1:]) + [d_total] * (3 - len(sub_starts))
    args = (d_total, r_max, subs[0], subs[1], y.stride(0), lora_b.stride(0), lora_b.stride(1), h.stride(0))
    if layer.mode == "segments":
        longest = _max_segment_len(layer)
        bs = block_sizes("sgmv", d_total, r_max, longest)
        grid = (len(layer.segments), triton.cdiv(longest, bs["BLOCK_M"]), triton.cdiv(d_total, bs["BLOCK_D"]))
        _sgmv_expand_kernel[grid](y, lora_b, h, layer.token_idx, layer.seg_starts, layer.seg_slots, layer.coeff,
                                  layer.rank_lo, layer.rank_hi, *args, NUM_SUBS=len(sub_starts), **bs)
    else:
        bs = block_sizes("bgmv", d_total, r_max)
        grid = (layer.num_rows, triton.cdiv(d_total, bs["BLOCK_D"]))
        _bgmv_expand_kernel[grid](y, lora_b, h, layer.token_idx, layer.slot_idx, layer.coeff,
                                  layer.rank_lo, layer.rank_hi, *args, **bs)
