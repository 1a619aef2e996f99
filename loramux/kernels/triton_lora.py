"""Triton LoRA kernels: SGMV (segments) for prefill, BGMV (one row per program) for decode.

The shrink and expand together have the semantics of `loramux.kernels.torch_ref`
(the Triton ops take the fused projection's sub-projection count for the
shrink); h is this backend's own: float32 [N, num_subs * r_max] without the
coefficient, which the expand applies. Scaled rows (MoR experts, `scale_idx`
>= 0) take λ_A in the shrink's epilogue and λ_B in the expand's (masked loads:
row -1 reads nothing); a level without scaled rows launches the variant
compiled without them (HAS_SCALES). The plan level's mode picks
the variant: "segments" runs the segmented GEMM kernels, every other mode the
gathered GEMV kernels. Fused projections take one launch each way: the shrink
reads the stacked A of q/k/v (or gate/up), the expand writes every
sub-projection's columns.

Rows that are not live read and write nothing: inert rows (slot < 0, the
CUDA-graph padding) and rows whose slot's adapter does not target this linear
(`slot_active[slot] == 0`), so a captured graph, whose launches are fixed,
still skips the projections no adapter of the step targets. Rank ranges bound
the loads, so a rank-8 adapter in a pool padded to rank 64 reads 8 ranks.

Block sizes come from `block_sizes()`, a fixed table (no autotuning):
- rank tiles are at most 64 wide (the fused q/k/v shrink at rank 64 is three
  tiles of 64), at least 16 because `tl.dot` needs 16-wide operands;
- SGMV uses 32-row tiles (16 for short segments) and 64-wide d tiles;
- BGMV reads the adapter once per row, so it uses 128-wide tiles over d_in
  (shrink) and d_out (expand) to make each load long and coalesced.
Every variant fits the shared memory of an L4/A10-class GPU (99 KB per block,
`SHARED_MEMORY_LIMIT`; tests/test_lora_ops_triton.py checks the bound
`shared_memory_bytes` for all of them). fp32 inputs use IEEE dot products,
bf16/fp16 the tensor cores.

Split-K: when rows x rank tiles give fewer than about 4 programs per SM (a
decode of a few sequences), the shrink also splits d_in; every program adds
its partial sums into the zeroed float32 `h` with atomics. The split count is
a grid dimension, not a compile-time constant.

Compiled variants: per LoRA linear shape (d_in, sub-projection sizes), r_max
and dtype, each kernel compiles once per block table entry: SGMV with short
or long segments, BGMV. Every per-step number (rows, segments, their lengths,
split count) reaches the kernels through the grid or a tensor, never as an
integer argument (Triton would specialise it on == 1 and % 16), so
`warm_up()` can compile all of them at start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace

import torch
import triton
import triton.language as tl

from loramux.kernels.plan import LoraPlanLevel, build_lora_plan, with_mode

MAX_BLOCK_R = 64
SGMV_SHORT_SEGMENT = 16  # segments up to this many rows use 16-row tiles
SHARED_MEMORY_LIMIT = 99 * 1024  # per block on L4/A10-class GPUs (sm_86/sm_89); an H100 has 227 KB
SPLIT_K_PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 32


def block_sizes(kind: str, width: int, rank_width: int, max_seg_len: int = 1) -> dict[str, int]:
    """The tile table and launch settings. kind: sgmv or bgmv; width: d_in (shrink) or d_out (expand);
    rank_width: the ranks the kernel spans (n_sub * r_max for the shrink, r_max for the expand)."""
    block_r = min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank_width)))
    if kind == "sgmv":
        return {"BLOCK_M": 16 if max_seg_len <= SGMV_SHORT_SEGMENT else 32, "BLOCK_D": 64, "BLOCK_R": block_r,
                "num_warps": 4, "num_stages": 3}
    block_d = 128 if width >= 128 else max(16, triton.next_power_of_2(width))
    return {"BLOCK_D": block_d, "BLOCK_R": block_r, "num_warps": 4, "num_stages": 2}


def shared_memory_bytes(kind: str, blocks: dict[str, int], itemsize: int) -> int:
    """An upper bound of one program's shared memory: every pipelined tile of the inner loop, num_stages
    times, counted at 4 bytes for the float32 operands (h in the expand, x/h upcast), plus one float32
    output tile for the epilogue's layout change (SGMV) or the cross-warp reduction scratch (BGMV)."""
    d, r, stages = blocks["BLOCK_D"], blocks["BLOCK_R"], blocks["num_stages"]
    if kind == "sgmv":
        m = blocks["BLOCK_M"]
        activations, weights = m * max(d, r) * 4, d * r * itemsize
        return stages * (activations + weights) + m * max(d, r) * 4
    return stages * (d * r + d) * max(itemsize, 4) + max(d, r) * blocks["num_warps"] * 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_k(programs: int, d_in: int, block_d: int, num_sms: int) -> int:
    """How many parts the shrink splits d_in into so that about SPLIT_K_PROGRAMS_PER_SM programs per SM run
    (a power of two, at most one per d tile and MAX_SPLIT_K)."""
    wanted = triton.cdiv(SPLIT_K_PROGRAMS_PER_SM * num_sms, programs)
    return min(triton.next_power_of_2(wanted), triton.cdiv(d_in, block_d), MAX_SPLIT_K)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE products for float32 (TF32 would err by ~1e-3); the tensor cores' native products otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _segment_tile(seg_start_ptr, seg, BLOCK_M: tl.constexpr):
    """The segment's first row, the rows of this program's tile of it (grid axis 1 walks the tiles), which
    are inside it, and whether the tile holds any row at all (segments shorter than the longest have empty
    tiles)."""
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    first = start + tl.program_id(1) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    return start, rows, rows < end, first < end


@triton.jit
def _live_slot(slot_ptr, active_ptr, i):
    """Slot of row (or segment) i, and whether it is live: slot >= 0 and the slot active for this linear."""
    slot = tl.load(slot_ptr + i)
    active = tl.load(active_ptr + slot, mask=slot >= 0, other=0)
    return slot, active != 0


@triton.jit
def _rank_tile_and_k_range(R, d_in, AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid axis AXIS enumerates rank tiles x d_in splits: this program's ranks and its d_in range."""
    # Plain arithmetic, not tl.cdiv / tl.minimum: each nested jit call costs the interpreter milliseconds.
    splits = tl.num_programs(AXIS) // ((R + BLOCK_R - 1) // BLOCK_R)
    pid = tl.program_id(AXIS)
    rs = (pid // splits) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = (((d_in + BLOCK_D - 1) // BLOCK_D + splits - 1) // splits) * BLOCK_D
    k_begin = (pid % splits) * chunk
    k_end = k_begin + chunk
    return rs, k_begin, tl.where(k_end < d_in, k_end, d_in)


@triton.jit
def _column_tile(t, d_total, sub1, sub2, BLOCK_D: tl.constexpr):
    """Output column tile t, tiled per fused sub-projection (columns from sub1 on are sub 1, from sub2 on
    sub 2) so that no tile straddles two: the tile's sub-projection, its columns, and which are inside it."""
    tiles0 = (sub1 + BLOCK_D - 1) // BLOCK_D
    tiles1 = (sub2 - sub1 + BLOCK_D - 1) // BLOCK_D
    sub = (t >= tiles0).to(tl.int32) + (t >= tiles0 + tiles1).to(tl.int32)
    first_tile = tl.where(sub == 0, 0, tl.where(sub == 1, tiles0, tiles0 + tiles1))
    sub_start = tl.where(sub == 0, 0, tl.where(sub == 1, sub1, sub2))
    sub_end = tl.where(sub == 0, sub1, tl.where(sub == 1, sub2, d_total))
    js = sub_start + (t - first_tile) * BLOCK_D + tl.arange(0, BLOCK_D)
    return sub, js, js < sub_end


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, token_ptr, seg_start_ptr, seg_slot_ptr, lo_ptr, hi_ptr, active_ptr,
                        scale_ptr, rank_scale_ptr, d_in, R, r_max, stride_xt, stride_as, stride_ar, stride_hn,
                        stride_rs, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: h[n, r] += λ_A[n, r] * sum_{k in split} A[slot(seg), r, k] * x[token[n], k] for the rows n of
    one segment tile, ranks r of one tile, within the segment's rank range (its rows share slot and range);
    λ_A[n] = rank_scale[scale_idx[n]] (1 where scale_idx is -1 or without HAS_SCALES).

    Grid: (segments, row tiles of the longest segment, rank tiles x d_in splits).
    """
    seg = tl.program_id(0)
    start, rows, row_ok, has_rows = _segment_tile(seg_start_ptr, seg, BLOCK_M)
    slot, live = _live_slot(seg_slot_ptr, active_ptr, seg)
    if has_rows & live:
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        rs, k_begin, k_end = _rank_tile_and_k_range(R, d_in, 2, BLOCK_R, BLOCK_D)
        local = rs % r_max  # rank within its sub-projection's block
        rank_ok = (rs < R) & (local >= tl.load(lo_ptr + start)) & (local < tl.load(hi_ptr + start))
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :],
                        mask=row_ok[:, None] & (ks[None, :] < k_end), other=0.0)
            a = tl.load(a_ptr + slot * stride_as + rs[None, :] * stride_ar + ks[:, None],
                        mask=rank_ok[None, :] & (ks[:, None] < k_end), other=0.0)
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)
        if HAS_SCALES:  # λ_A is per rank, so scaling each split's partial sum scales their total
            scale_rows = tl.load(scale_ptr + rows, mask=row_ok, other=-1)
            acc *= tl.load(rank_scale_ptr + scale_rows[:, None] * stride_rs + rs[None, :],
                           mask=(scale_rows >= 0)[:, None] & rank_ok[None, :], other=1.0).to(tl.float32)
        tl.atomic_add(h_ptr + rows[:, None] * stride_hn + rs[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, token_ptr, slot_ptr, lo_ptr, hi_ptr, active_ptr, scale_ptr,
                        rank_scale_ptr, d_in, R, r_max, stride_xt, stride_as, stride_ar, stride_hn, stride_rs,
                        HAS_SCALES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: h[n, r] += λ_A[n, r] * sum_{k in split} A[slot[n], r, k] * x[token[n], k] within row n's rank
    range (λ_A as in the SGMV shrink); one row per program.

    Grid: (rows, rank tiles x d_in splits).
    """
    n = tl.program_id(0)
    slot, live = _live_slot(slot_ptr, active_ptr, n)
    if live:
        token = tl.load(token_ptr + n)
        rs, k_begin, k_end = _rank_tile_and_k_range(R, d_in, 1, BLOCK_R, BLOCK_D)
        local = rs % r_max  # rank within its sub-projection's block
        rank_ok = (rs < R) & (local >= tl.load(lo_ptr + n)) & (local < tl.load(hi_ptr + n))
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + token * stride_xt + ks, mask=ks < k_end, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + rs[:, None] * stride_ar + ks[None, :],
                        mask=rank_ok[:, None] & (ks[None, :] < k_end), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        if HAS_SCALES:  # (tl.where: the interpreter refuses a block & a scalar as a mask)
            scale_row = tl.load(scale_ptr + n)
            acc *= tl.load(rank_scale_ptr + scale_row * stride_rs + rs,
                           mask=tl.where(scale_row >= 0, rank_ok, False), other=1.0).to(tl.float32)
        tl.atomic_add(h_ptr + n * stride_hn + rs, acc, mask=rank_ok)


@triton.jit
def _sgmv_expand_kernel(y_ptr, b_ptr, h_ptr, token_ptr, seg_start_ptr, seg_slot_ptr, coeff_ptr, lo_ptr, hi_ptr,
                        active_ptr, scale_ptr, out_scale_ptr, d_total, r_max, sub1, sub2, stride_yt, stride_bs,
                        stride_bd, stride_hn, stride_os, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: y[token[n], j] += coeff[n] * λ_B[n, j] * sum_{lo <= r < hi} B[slot, j, r] * h[n, sub(j) * r_max + r],
    λ_B[n] = out_scale[scale_idx[n]] (1 where scale_idx is -1 or without HAS_SCALES).

    Grid: (segments, row tiles of the longest segment, column tiles per sub-projection).
    """
    seg = tl.program_id(0)
    start, rows, row_ok, has_rows = _segment_tile(seg_start_ptr, seg, BLOCK_M)
    slot, live = _live_slot(seg_slot_ptr, active_ptr, seg)
    if has_rows & live:
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0)
        coeff = tl.load(coeff_ptr + rows, mask=row_ok, other=0.0)
        lo = tl.load(lo_ptr + start)
        hi = tl.load(hi_ptr + start)
        sub, js, column_ok = _column_tile(tl.program_id(2), d_total, sub1, sub2, BLOCK_D)
        delta = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, r_max, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            rank_ok = (rs >= lo) & (rs < hi) & (rs < r_max)
            h = tl.load(h_ptr + rows[:, None] * stride_hn + sub * r_max + rs[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            h = (h * coeff[:, None]).to(b_ptr.dtype.element_ty)
            b = tl.load(b_ptr + slot * stride_bs + js[None, :] * stride_bd + rs[:, None],
                        mask=column_ok[None, :] & rank_ok[:, None], other=0.0)
            delta += tl.dot(h, b, input_precision=DOT_PRECISION)
        if HAS_SCALES:
            scale_rows = tl.load(scale_ptr + rows, mask=row_ok, other=-1)
            delta *= tl.load(out_scale_ptr + scale_rows[:, None] * stride_os + js[None, :],
                             mask=(scale_rows >= 0)[:, None] & column_ok[None, :], other=1.0).to(tl.float32)
        out = y_ptr + tokens[:, None] * stride_yt + js[None, :]
        ok = row_ok[:, None] & column_ok[None, :]
        y = tl.load(out, mask=ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bgmv_expand_kernel(y_ptr, b_ptr, h_ptr, token_ptr, slot_ptr, coeff_ptr, lo_ptr, hi_ptr, active_ptr, scale_ptr,
                        out_scale_ptr, d_total, r_max, sub1, sub2, stride_yt, stride_bs, stride_bd, stride_hn,
                        stride_os, HAS_SCALES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Semantics: y[token[n], j] += coeff[n] * λ_B[n, j] * sum_{lo[n] <= r < hi[n]} B[slot[n], j, r]
    * h[n, sub(j) * r_max + r] (λ_B as in the SGMV expand).

    Grid: (rows, column tiles per sub-projection).
    """
    n = tl.program_id(0)
    slot, live = _live_slot(slot_ptr, active_ptr, n)
    if live:
        token = tl.load(token_ptr + n)
        coeff = tl.load(coeff_ptr + n)
        lo = tl.load(lo_ptr + n)
        hi = tl.load(hi_ptr + n)
        sub, js, column_ok = _column_tile(tl.program_id(1), d_total, sub1, sub2, BLOCK_D)
        delta = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, r_max, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            rank_ok = (rs >= lo) & (rs < hi) & (rs < r_max)
            h = tl.load(h_ptr + n * stride_hn + sub * r_max + rs, mask=rank_ok, other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + js[:, None] * stride_bd + rs[None, :],
                        mask=column_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
            delta += tl.sum(b * h[None, :], axis=1)
        if HAS_SCALES:
            scale_row = tl.load(scale_ptr + n)
            delta *= tl.load(out_scale_ptr + scale_row * stride_os + js,
                             mask=tl.where(scale_row >= 0, column_ok, False), other=1.0).to(tl.float32)
        out = y_ptr + token * stride_yt + js
        y = tl.load(out, mask=column_ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + delta * coeff).to(y_ptr.dtype.element_ty), mask=column_ok)


def launch_blocks(width: int, rank_width: int, level: LoraPlanLevel) -> dict[str, int]:
    """The block table entry a plan level runs with (SGMV for segments, BGMV otherwise)."""
    if level.mode == "segments":
        return block_sizes("sgmv", width, rank_width, max(seg.end - seg.start for seg in level.segments))
    return block_sizes("bgmv", width, rank_width)


def _scale_args(level: LoraPlanLevel, pool: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(scale_idx, pool, pool's row stride, HAS_SCALES) for a kernel launch; a level without scaled rows or a
    linear without pools passes `dummy` pointers the kernels never read."""
    if pool is None or level.scale_idx is None:
        return level.slot_idx, dummy, 0, False
    assert pool.stride(1) == 1
    return level.scale_idx, pool, pool.stride(0), True


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_active: torch.Tensor, level: LoraPlanLevel,
                num_subs: int = 1, rank_scale: torch.Tensor | None = None, splits: int | None = None
                ) -> torch.Tensor:
    """Semantics: h[n] = λ_A[n] ⊙ (A[slot[n]] @ x[token[n]]) for every live row n, within its rank range; 0
    elsewhere; λ_A[n] = rank_scale[scale_idx[n]], 1 for scale_idx -1.

    x: [T, d_in] (row-contiguous); lora_a: [S, num_subs * r_max, d_in] contiguous; slot_active: [S] int32;
    rank_scale: [V + 1, num_subs * r_max] or None; returns h: [N, num_subs * r_max] float32. `splits`
    overrides the split-K count (tests).
    """
    d_in, R = x.shape[1], lora_a.shape[1]
    assert x.stride(1) == 1 and lora_a.is_contiguous() and R % num_subs == 0
    h = torch.zeros(level.num_rows, R, dtype=torch.float32, device=x.device)
    if level.num_rows == 0:
        return h
    bs = launch_blocks(d_in, R, level)
    rank_tiles = triton.cdiv(R, bs["BLOCK_R"])
    scale_idx, rank_scale, stride_rs, has_scales = _scale_args(level, rank_scale, h)
    args = (scale_idx, rank_scale, d_in, R, R // num_subs, x.stride(0), lora_a.stride(0), lora_a.stride(1),
            h.stride(0), stride_rs)
    if level.mode == "segments":
        row_tiles = triton.cdiv(max(seg.end - seg.start for seg in level.segments), bs["BLOCK_M"])
        programs = len(level.segments) * row_tiles * rank_tiles
        splits = splits or split_k(programs, d_in, bs["BLOCK_D"], _num_sms(x.device))
        _sgmv_shrink_kernel[(len(level.segments), row_tiles, rank_tiles * splits)](
            x, lora_a, h, level.token_idx, level.seg_starts, level.seg_slots, level.rank_lo, level.rank_hi,
            slot_active, *args, HAS_SCALES=has_scales, DOT_PRECISION=_dot_precision(x.dtype), **bs)
    else:
        splits = splits or split_k(level.num_rows * rank_tiles, d_in, bs["BLOCK_D"], _num_sms(x.device))
        _bgmv_shrink_kernel[(level.num_rows, rank_tiles * splits)](
            x, lora_a, h, level.token_idx, level.slot_idx, level.rank_lo, level.rank_hi, slot_active, *args,
            HAS_SCALES=has_scales, **bs)
    return h


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,), out_scale: torch.Tensor | None = None
                ) -> None:
    """Semantics: for each fused sub-projection i with columns c_i = sub_starts[i]:sub_starts[i+1],
    y[token[n], c_i] += coeff[n] * λ_B[n, c_i] ⊙ (B[slot[n]][c_i, lo:hi] @ h[n, i*r_max+lo : i*r_max+hi]) for every
    live row n; λ_B[n] = out_scale[scale_idx[n]] ([V + 1, d_total] pool), 1 for scale_idx -1 or no pool.

    One launch for the whole fused projection. y: [T, d_total] row-contiguous,
    updated in place; lora_b: [S, d_total, r_max] contiguous (the
    sub-projections' B stacked along the output); h: [N, n_sub * r_max];
    slot_active: [S] int32.
    """
    d_total, r_max = lora_b.shape[1], lora_b.shape[2]
    assert y.stride(1) == 1 and lora_b.is_contiguous() and h.stride(1) == 1 and 1 <= len(sub_starts) <= 3
    if not level.unique_tokens:
        raise ValueError("the Triton expand stores without atomics: flat plans are for the torch backend")
    if level.num_rows == 0:
        return
    bounds = list(sub_starts[1:]) + [d_total] * (4 - len(sub_starts))
    bs = launch_blocks(d_total, r_max, level)
    column_tiles = sum(triton.cdiv(end - start, bs["BLOCK_D"]) for start, end in zip([0] + bounds, bounds))
    scale_idx, out_scale, stride_os, has_scales = _scale_args(level, out_scale, h)
    args = (scale_idx, out_scale, d_total, r_max, bounds[0], bounds[1], y.stride(0), lora_b.stride(0),
            lora_b.stride(1), h.stride(0), stride_os)
    if level.mode == "segments":
        row_tiles = triton.cdiv(max(seg.end - seg.start for seg in level.segments), bs["BLOCK_M"])
        _sgmv_expand_kernel[(len(level.segments), row_tiles, column_tiles)](
            y, lora_b, h, level.token_idx, level.seg_starts, level.seg_slots, level.coeff, level.rank_lo,
            level.rank_hi, slot_active, *args, HAS_SCALES=has_scales, DOT_PRECISION=_dot_precision(y.dtype), **bs)
    else:
        _bgmv_expand_kernel[(level.num_rows, column_tiles)](
            y, lora_b, h, level.token_idx, level.slot_idx, level.coeff, level.rank_lo, level.rank_hi,
            slot_active, *args, HAS_SCALES=has_scales, **bs)


def warm_up_levels(r_max: int, device: torch.device) -> list[LoraPlanLevel]:
    """Plan levels that between them select every block table entry: a short and a long segment, a row."""
    runs = [[(0, length, [(0, 1.0, 0, r_max)])] for length in (1, SGMV_SHORT_SEGMENT + 1)]
    short, long = (build_lora_plan(r, torch.ones(1), r_max, device).levels[0] for r in runs)
    return [short, long, with_mode(short, "gather")]


def warm_up(shapes: Iterable[tuple[int, tuple[int, ...]]], r_max: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Compile every kernel variant the server can launch, before it serves.

    shapes: (d_in, sub-projection output sizes) of each LoRA linear, e.g.
    (4096, (4096, 1024, 1024)) for a fused q/k/v; r_max: --max-lora-rank;
    dtype: the model's dtype. Runs each kernel once on zero weights, with and without scaling-vector pools.
    """
    levels = warm_up_levels(r_max, device)
    levels += [replace(level, scale_idx=torch.zeros_like(level.slot_idx)) for level in levels]
    for d_in, sub_sizes in set(shapes):
        tokens = SGMV_SHORT_SEGMENT + 1
        x = torch.zeros(tokens, d_in, dtype=dtype, device=device)
        y = torch.zeros(tokens, sum(sub_sizes), dtype=dtype, device=device)
        lora_a = torch.zeros(1, len(sub_sizes) * r_max, d_in, dtype=dtype, device=device)
        lora_b = torch.zeros(1, sum(sub_sizes), r_max, dtype=dtype, device=device)
        active = torch.ones(1, dtype=torch.int32, device=device)
        rank_scale = torch.ones(1, len(sub_sizes) * r_max, dtype=dtype, device=device)
        out_scale = torch.ones(1, sum(sub_sizes), dtype=dtype, device=device)
        starts = tuple(sum(sub_sizes[:i]) for i in range(len(sub_sizes)))
        for level in levels:
            h = lora_shrink(x, lora_a, active, level, len(sub_sizes), rank_scale)
            lora_expand(y, lora_b, h, active, level, starts, out_scale)
