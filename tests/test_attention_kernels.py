"""Paged-attention kernels (Triton and the torch reference) against SDPA on gathered K/V.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1,
set before triton is imported), which runs programs one by one: sizes stay
small here; the `gpu` tests run bf16 at real sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton_attention = pytest.importorskip("loramux.kernels.triton_attention", reason="triton is not installed")

from loramux.kernels import attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
BLOCK_SIZE = 16


def make_case(context_lens, query_lens, num_kv_heads, group, head_dim, dtype, seed=0, shared_prefix_blocks=1):
    """A cache with random, non-contiguous block tables; every sequence shares its first blocks.

    Returns q [T, Hq, D], the caches, int32 block tables / query starts / context lengths.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 4
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shared = order[:shared_prefix_blocks]
    free = order[shared_prefix_blocks:]
    width = max(blocks_per_seq)
    tables = []
    for n in blocks_per_seq:
        own = [free.pop() for _ in range(max(0, n - len(shared)))]
        table = (shared + own)[:n]
        tables.append(table + [0] * (width - n))
    slots = num_blocks * BLOCK_SIZE
    to = dict(dtype=dtype, device=DEVICE)
    k_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(**to)
    v_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(**to)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=gen).to(**to)
    starts = torch.tensor([0] + query_lens).cumsum(0)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, i32(tables), starts.to(torch.int32).to(DEVICE), i32(context_lens)


def sdpa_on_gathered(q, k_cache, v_cache, tables, starts, context_lens, window=None):
    """Independent check: gather each sequence's K/V in float32 and run SDPA with enable_gqa."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for n in range(tables.shape[0]):
        start, end, ctx = int(starts[n]), int(starts[n + 1]), int(context_lens[n])
        pos = torch.arange(ctx, device=q.device)
        slots = tables[n].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        keys, values = (c.float()[slots].transpose(0, 1) for c in (k_cache, v_cache))
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        mask = pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask &= pos[None, :] > q_pos[:, None] - window
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].float().transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True).transpose(0, 1)
    return out.cpu()


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected, rtol=tol, atol=tol)


DECODE_CONTEXTS = [1, 7, 16, 17, 40, 75]  # one token, partial blocks, exact block, several blocks


@pytest.mark.parametrize("group, head_dim, num_splits", [(1, 64, 1), (4, 128, 3), (8, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_sdpa(group, head_dim, num_splits, dtype):
    q, kc, vc, tables, starts, ctx = make_case(DECODE_CONTEXTS, [1] * len(DECODE_CONTEXTS), 2, group, head_dim,
                                              dtype, seed=group)
    expected = sdpa_on_gathered(q, kc, vc, tables, starts, ctx)
    scale = head_dim ** -0.5
    out = triton_attention.paged_attention_decode(q, kc, vc, tables, ctx, BLOCK_SIZE, scale, num_splits=num_splits)
    assert_close(out, expected, dtype)
    assert_close(attention_ref.paged_attention_decode(q, kc, vc, tables, ctx, BLOCK_SIZE, scale), expected, dtype)


@pytest.mark.parametrize("group, head_dim", [(1, 128), (4, 64), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_prefill_matches_sdpa(group, head_dim, dtype):
    # From position 0, chunks after cached context (partial and whole blocks), and a decode row (mixed step).
    context_lens, query_lens = [20, 45, 33, 9], [20, 13, 1, 5]
    q, kc, vc, tables, starts, ctx = make_case(context_lens, query_lens, 2, group, head_dim, dtype, seed=10 + group)
    expected = sdpa_on_gathered(q, kc, vc, tables, starts, ctx)
    scale = head_dim ** -0.5
    out = triton_attention.paged_attention_varlen(q, kc, vc, tables, starts, ctx, BLOCK_SIZE, scale)
    assert_close(out, expected, dtype)
    ref = attention_ref.paged_attention_varlen(q, kc, vc, tables, starts, ctx, BLOCK_SIZE, scale)
    assert_close(ref, expected, dtype)


def test_sliding_window_decode_and_prefill():
    window = 10
    context_lens, query_lens = [40, 45], [1, 14]  # the chunk's first keys fall outside its window
    q, kc, vc, tables, starts, ctx = make_case(context_lens, query_lens, 1, 4, 64, torch.float32, seed=3)
    expected = sdpa_on_gathered(q, kc, vc, tables, starts, ctx, window)
    scale = 0.125
    out = triton_attention.paged_attention_varlen(q, kc, vc, tables, starts, ctx, BLOCK_SIZE, scale, window)
    assert_close(out, expected, torch.float32)
    decode_q = q[:1]
    decode = triton_attention.paged_attention_decode(decode_q, kc, vc, tables[:1], ctx[:1], BLOCK_SIZE, scale,
                                                     window, num_splits=2)
    assert_close(decode, expected[:1], torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("window", [None, 4096])
def test_decode_real_sizes_gpu(dtype, group, batch, window):
    gen = torch.Generator().manual_seed(batch)
    contexts = torch.randint(1, 4096, (batch,), generator=gen).tolist()
    contexts[0] = 8192
    q, kc, vc, tables, starts, ctx = make_case(contexts, [1] * batch, 8, group, 128, dtype, seed=group,
                                              shared_prefix_blocks=8)
    expected = sdpa_on_gathered(q, kc, vc, tables, starts, ctx, window)
    splits = triton_attention.decode_splits(batch, 8, q.device)
    out = triton_attention.paged_attention_decode(q, kc, vc, tables, ctx, BLOCK_SIZE, 128 ** -0.5, window, splits)
    assert_close(out, expected, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_chunked_prefill_real_sizes_gpu(dtype, group):
    context_lens, query_lens = [2048, 4096 + 300, 1, 6000, 517], [2048, 512, 1, 2000, 17]
    q, kc, vc, tables, starts, ctx = make_case(context_lens, query_lens, 8, group, 128, dtype, seed=group,
                                              shared_prefix_blocks=4)
    expected = sdpa_on_gathered(q, kc, vc, tables, starts, ctx)
    out = triton_attention.paged_attention_varlen(q, kc, vc, tables, starts, ctx, BLOCK_SIZE, 128 ** -0.5)
    assert_close(out, expected, dtype)
