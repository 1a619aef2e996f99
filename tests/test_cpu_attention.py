"""The C++ paged decode attention (`cpu_attention.cpp`, the `cpu` backend's decode) against the float32 reference.

Skipped where the CPU lacks AVX512-BF16 or the kernels cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from loramux.engine.attention import CpuKernelAttention, SdpaAttention, select_attention_backend
from loramux.kernels import attention_ref, cpu_extension

needs_kernel = pytest.mark.skipif(not cpu_extension.load(), reason="no AVX512-BF16 or the kernels did not build")


def decode_case(num_heads, num_kv_heads, head_dim, block_size, lengths, seed=0):
    """bfloat16 q and caches with every sequence's blocks scattered over a cache with spare blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lengths]
    total = sum(blocks) + 5
    order = torch.randperm(total, generator=gen).tolist()
    width = max(blocks) + 2  # unused trailing entries (-1: a read of one would fault, not pass unseen)
    tables = torch.tensor([[order.pop() for _ in range(n)] + [-1] * (width - n) for n in blocks], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(total * block_size, num_kv_heads, head_dim, generator=gen).bfloat16()
                        for _ in range(2))
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen).bfloat16()
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32)


def decode(q, k_cache, v_cache, tables, lens, block_size, window=None):
    return torch.ops.loramux_cpu_attention.decode(q, k_cache, v_cache, tables, lens, block_size,
                                                  q.shape[-1] ** -0.5, window or 0)


@needs_kernel
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [
    (9, 3, 64),  # SmolLM2
    (8, 8, 128),  # multi-head (Llama-2 7B's head size)
    (8, 2, 40),  # a head size that is no multiple of 32: masked tails in every pass
    (4, 1, 160),  # more than 128 columns: two column groups of V
])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_matches_the_float32_reference(num_heads, num_kv_heads, head_dim, block_size, window):
    """Contexts of 1 key, a partial block, whole blocks, odd and even runs, and one longer than any window."""
    lengths = [1, 2, 3, block_size, block_size + 1, 4 * block_size - 1, 150]
    q, k_cache, v_cache, tables, lens = decode_case(num_heads, num_kv_heads, head_dim, block_size, lengths)
    got = decode(q, k_cache, v_cache, tables, lens, block_size, window)
    expected = attention_ref.paged_attention_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                                    block_size, head_dim ** -0.5, window)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    # softmax weights rounded to bfloat16 before weighing V (as torch's attention does), out rounded once
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@needs_kernel
def test_one_and_two_threads_give_the_same_bits():
    """Each sequence is one task with a fixed order of sums: the thread count must not change a value."""
    q, k_cache, v_cache, tables, lens = decode_case(9, 3, 64, 16, [5, 40, 77, 130, 1, 16])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(q, k_cache, v_cache, tables, lens, 16)
        torch.set_num_threads(2)
        two = decode(q, k_cache, v_cache, tables, lens, 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_a_nan_key_makes_its_sequence_nan_and_no_other():
    """As the reference: NaN propagates through the softmax of the sequence whose context holds it."""
    q, k_cache, v_cache, tables, lens = decode_case(9, 3, 64, 16, [20, 7])
    k_cache[int(tables[0, 1]) * 16 + 2, 1] = float("nan")  # sequence 0's key 18, KV head 1
    got = decode(q, k_cache, v_cache, tables, lens, 16)
    assert got[0, 3:6].isnan().all() and not got[0, :3].isnan().any() and not got[0, 6:].isnan().any()
    assert not got[1].isnan().any()


@needs_kernel
def test_tables_and_lengths_outside_the_cache_are_refused_not_read():
    q, k_cache, v_cache, tables, lens = decode_case(9, 3, 64, 16, [20, 3])
    decode(q, k_cache, v_cache, tables, lens, 16)  # in range: runs
    bad_block = tables.clone()
    bad_block[0, 1] = k_cache.shape[0] // 16
    with pytest.raises(RuntimeError, match=r"block_tables\[0\]\[1\]"):
        decode(q, k_cache, v_cache, bad_block, lens, 16)
    with pytest.raises(RuntimeError, match="context_lens"):
        decode(q, k_cache, v_cache, tables, torch.tensor([0, 3], dtype=torch.int32), 16)
    with pytest.raises(RuntimeError, match="context_lens"):  # more keys than the table has blocks for
        decode(q, k_cache, v_cache, tables, torch.tensor([16 * tables.shape[1] + 1, 3], dtype=torch.int32), 16)


def test_backend_choice(monkeypatch):
    """auto: the kernel for bfloat16 on the CPU where it builds, sdpa for float32; `cpu` asked for where it
    cannot serve is a clear error at start-up."""
    cpu = torch.device("cpu")
    args = (3, 64, 16, None, cpu)
    assert type(select_attention_backend("auto", *args, torch.float32)) is SdpaAttention
    assert type(select_attention_backend("sdpa", *args, torch.bfloat16)) is SdpaAttention
    with pytest.raises(ValueError, match="--attention-backend cpu needs a bfloat16 model"):
        select_attention_backend("cpu", *args, torch.float32)
    expected = CpuKernelAttention if cpu_extension.load() else SdpaAttention
    assert type(select_attention_backend("auto", *args, torch.bfloat16)) is expected
    monkeypatch.setattr(cpu_extension, "load", lambda: False)  # a CPU without AVX512-BF16, or no compiler
    assert type(select_attention_backend("auto", *args, torch.bfloat16)) is SdpaAttention
    with pytest.raises(ValueError, match="--attention-backend cpu needs"):
        select_attention_backend("cpu", *args, torch.bfloat16)
