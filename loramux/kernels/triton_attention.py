"""Triton paged attention: K/V are read through the block table, never gathered into a copy.

Same signatures and semantics as `loramux.kernels.attention_ref`.

- `paged_attention_decode`: one query per sequence, flash-decoding style. A
  program takes one sequence, one KV head and one split of the context; the
  GQA group's query heads ride along as the rows of one `tl.dot` (K/V are read
  once per KV head, never repeated). Each split writes its normalised partial
  output and log-sum-exp; a second kernel merges the splits. The split count
  is a host-side choice per batch size (`decode_splits`), and each sequence's
  split length comes from its context length on the device, so a captured
  graph serves every context length.
- `paged_attention_varlen`: prefill and chunked prefill with cached context
  (and mixed steps, where a decode token is a query run of length 1). A
  program takes one tile of one sequence's queries for one query head.

Every per-step integer reaches the kernels through a tensor or is listed in
`do_not_specialize`, so the set of compiled variants depends only on the model
(head dim, GQA group, block size, window, dtype) and the warm-up covers them.
fp32 dot products are IEEE (no TF32): the kernels match the fp32 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DECODE_BLOCK_N = 32  # keys per inner step
VARLEN_BLOCK_M = 32  # queries per program
VARLEN_BLOCK_N = 32
MAX_DECODE_SPLITS = 32
DEFAULT_NUM_SMS = 132  # an H100's, when no GPU is there to ask (CPU tests)


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """How many context splits a decode batch uses: enough programs to fill the GPU about twice."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_NUM_SMS
    return max(1, min(MAX_DECODE_SPLITS, triton.cdiv(2 * sms, batch * num_kv_heads)))


@triton.jit
def _load_kv_tile(cache_ptr, bt_row_ptr, pos, ok, kv_head, stride_cs, stride_ch, d, d_ok,
                  BLOCK_SIZE: tl.constexpr):
    """The [BLOCK_D, BLOCK_N] transposed tile of one KV head at context positions `pos`, via the block table."""
    block = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    return tl.load(cache_ptr + slot[None, :] * stride_cs + kv_head * stride_ch + d[:, None],
                   mask=ok[None, :] & d_ok[:, None], other=0.0)


@triton.jit
def _attend_tile(q, m, l, acc, k_ptr, v_ptr, bt_row_ptr, pos, ok, visible, kv_head, stride_cs, stride_ch, d, d_ok,
                 scale, BLOCK_SIZE: tl.constexpr):
    """One key tile of the online softmax: q [M, BLOCK_D] against the keys at `pos` where `visible`
    ([M, BLOCK_N] or broadcastable); returns the updated running max m [M], sum l [M] and output acc [M, BLOCK_D]."""
    k = _load_kv_tile(k_ptr, bt_row_ptr, pos, ok, kv_head, stride_cs, stride_ch, d, d_ok, BLOCK_SIZE)
    s = tl.dot(q, k, input_precision="ieee") * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    v = _load_kv_tile(v_ptr, bt_row_ptr, pos, ok, kv_head, stride_cs, stride_ch, d, d_ok, BLOCK_SIZE)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), tl.trans(v), input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, part_out_ptr, part_lse_ptr, scale, window,
                         stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, num_splits,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    """**Semantics:** for sequence b, KV head g and split s, the softmax-attention of the GROUP query
    heads g*GROUP.. over the context positions of split s, normalised within the split, and its
    log-sum-exp (-inf for an empty split).

    q: [B, Hq, D] (row stride stride_qt); caches: [slots, Hkv, D]; bt: [B, max_blocks] int32;
    ctx: [B] int32; part_out: [B, Hq, num_splits, D] fp32; part_lse: [B, Hq, num_splits] fp32.
    Grid: (B, Hkv, num_splits).
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full((GROUP_PAD,), -1e30, dtype=tl.float32)
    l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        m, l, acc = _attend_tile(q, m, l, acc, k_ptr, v_ptr, bt_row, pos, ok, ok[None, :], kv_head, stride_cs,
                                 stride_ch, d, d_ok, scale, BLOCK_SIZE)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row, lse, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """**Semantics:** out[b, h] = sum_s w_s * part_out[b, h, s] / sum_s w_s with w_s = exp(lse_s - max lse).

    part_out: [B, Hq, num_splits, D] fp32; part_lse: [B, Hq, num_splits]; out: [B, Hq, D].
    Grid: (B, Hq).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = (b * tl.num_programs(1) + h) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(part_out_ptr + (base + s[:, None]) * HEAD_DIM + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["stride_bt"])
def _varlen_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, qstart_ptr, ctx_ptr, scale, window,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """**Semantics:** out[t, h] = softmax-attention of query row t (head h) of sequence n over the keys
    at positions j <= p (and j > p - window) of n's context, p = ctx[n] - q_len[n] + (t - qstart[n]).

    q, out: [T, Hq, D]; caches: [slots, Hkv, D]; bt: [N, max_blocks] int32; qstart: [N + 1] int32;
    ctx: [N] int32. Grid: (N, query tiles of the longest run, Hq).
    """
    n = tl.program_id(0)
    tile = tl.program_id(1)
    h = tl.program_id(2)
    kv_head = h // GROUP
    q_first = tl.load(qstart_ptr + n)
    q_len = tl.load(qstart_ptr + n + 1) - q_first
    if tile * BLOCK_M < q_len:
        ctx = tl.load(ctx_ptr + n)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_pos = ctx - q_len + rows
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_first + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        hi = tl.minimum(ctx - q_len + tile * BLOCK_M + BLOCK_M, ctx)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - q_len + tile * BLOCK_M - window + 1, 0)
        m = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        bt_row = bt_ptr + n * stride_bt
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            ok = pos < hi
            visible = ok[None, :] & (pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            m, l, acc = _attend_tile(q, m, l, acc, k_ptr, v_ptr, bt_row, pos, ok, visible, kv_head, stride_cs,
                                     stride_ch, d, d_ok, scale, BLOCK_SIZE)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_first + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int]:
    """(GQA group, BLOCK_D); the kernels index the cache rows and q heads with unit inner stride."""
    assert q.stride(-1) == 1 and k_cache.is_contiguous(), "q rows and the caches need a unit inner stride"
    return q.shape[1] // k_cache.shape[1], max(16, triton.next_power_of_2(q.shape[2]))  # tl.dot needs 16


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, num_splits: int = 1) -> torch.Tensor:
    """**Semantics:** as `attention_ref.paged_attention_decode`: q [B, Hq, D] -> [B, Hq, D].

    block_tables: [B, max_blocks] int32 (inner stride 1); context_lens: [B] int32.
    """
    group, block_d = _check(q, k_cache)
    assert 1 <= num_splits <= MAX_DECODE_SPLITS
    batch, num_heads, head_dim = q.shape
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, k_cache.shape[1], num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=DECODE_BLOCK_N, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None)
    out = torch.empty_like(q)
    _decode_merge_kernel[(batch, num_heads)](
        part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_DECODE_SPLITS)  # one variant for every split count
    return out


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, sliding_window: int | None = None,
                           max_query_len: int | None = None) -> torch.Tensor:
    """**Semantics:** as `attention_ref.paged_attention_varlen`: q [T, Hq, D] -> [T, Hq, D].

    block_tables: [N, max_blocks] int32; query_start: [N + 1] int32; context_lens: [N] int32;
    max_query_len: the longest query run (read from query_start when not given: a host sync).
    """
    group, block_d = _check(q, k_cache)
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max())
    out = torch.zeros_like(q)
    grid = (block_tables.shape[0], triton.cdiv(max_query_len, VARLEN_BLOCK_M), q.shape[1])
    _varlen_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, context_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=q.shape[2], BLOCK_D=block_d, BLOCK_M=VARLEN_BLOCK_M, BLOCK_N=VARLEN_BLOCK_N,
        BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None)
    return out
