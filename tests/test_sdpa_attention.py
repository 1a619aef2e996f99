"""The CPU attention backends against the float32 reference: `sdpa` (block gathers, query heads folded per KV
head) and `cpu` (prefill as sdpa, decode by the C++ kernel reading the paged cache in place)."""

from __future__ import annotations

import pytest
import torch

from loramux.engine.attention import CpuKernelAttention, SdpaAttention, grouped_decode_attention
from loramux.engine.step_inputs import attention_metadata
from loramux.kernels import attention_ref, cpu_extension

BLOCK_SIZE = 4
NUM_KV_HEADS, GROUP, HEAD_DIM = 2, 3, 8


def step_case(chunks: list[tuple[int, int]], num_decode: int, dtype: torch.dtype, seed: int = 0):
    """Random caches and scattered block tables for sequences with (cached, new) tokens, decode first."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-(cached + new) // BLOCK_SIZE) for cached, new in chunks]
    order = torch.randperm(sum(blocks) + 3, generator=gen).tolist()  # block 0 may belong to anyone
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    slots = (sum(blocks) + 3) * BLOCK_SIZE
    k_cache, v_cache = (torch.randn(slots, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    num_tokens = sum(new for _, new in chunks)
    q = torch.randn(num_tokens, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, k_cache, v_cache, tables


needs_kernel = pytest.mark.skipif(not cpu_extension.load(), reason="no AVX512-BF16 or the kernels did not build")


@pytest.mark.parametrize("backend_type, dtype, tol", [
    (SdpaAttention, torch.float32, 1e-5), (SdpaAttention, torch.bfloat16, 3e-2),
    pytest.param(CpuKernelAttention, torch.bfloat16, 3e-2, marks=needs_kernel),  # the kernel is bfloat16 only
])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("chunks, num_decode", [
    ([(0, 1), (6, 1), (11, 1), (3, 1)], 4),  # decode only: contexts of 1, a partial and whole blocks
    ([(9, 1), (2, 1), (0, 5), (4, 3)], 2),  # decode beside a fresh prefill and a chunk with cached context
])
def test_cpu_backends_match_reference(backend_type, dtype, tol, window, chunks, num_decode):
    q, k, v, k_cache, v_cache, tables = step_case(chunks, num_decode, dtype)
    backend = backend_type(NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, window, torch.device("cpu"))
    meta, _ = attention_metadata(tables, chunks, num_decode, backend, torch.device("cpu"))
    got = backend(q, k, v, k_cache, v_cache, meta)  # writes this step's K/V into the caches, then attends
    expected = attention_ref.paged_attention_varlen(
        q.float(), k_cache.float(), v_cache.float(), meta.block_tables, meta.query_start, meta.context_lens,
        BLOCK_SIZE, HEAD_DIM ** -0.5, window)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_decode_attention_matches_float32_loop(dtype, tol):
    """The decode formulation (query heads folded per KV head, padded keys biased to -inf) at real-like
    sizes (SmolLM2's 9 query / 3 KV heads, contexts that end mid-block) against a float32 loop per query head."""
    gen = torch.Generator().manual_seed(0)
    batch, num_kv_heads, group, head_dim, padded = 5, 3, 3, 64, 48
    lengths = [1, 17, 32, 40, 48]
    q = torch.randn(batch, num_kv_heads, group, head_dim, generator=gen)
    keys, values = (torch.randn(batch, num_kv_heads, padded, head_dim, generator=gen) for _ in range(2))
    bias = torch.full((batch, 1, 1, padded), float("-inf"))
    for b, n in enumerate(lengths):
        bias[b, ..., :n] = 0
    got = grouped_decode_attention(q.to(dtype), keys.to(dtype), values.to(dtype), bias, head_dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    expected = torch.empty_like(q)
    for b, n in enumerate(lengths):
        for h in range(num_kv_heads):
            for g in range(group):
                weights = torch.softmax(keys[b, h, :n] @ q[b, h, g] * head_dim ** -0.5, dim=0)
                expected[b, h, g] = weights @ values[b, h, :n]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
