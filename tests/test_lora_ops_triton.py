"""Triton LoRA kernels against the float32 per-token loop.

Without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported), which has no bf16 `tl.dot`: fp32 and fp16 there,
bf16 and real sizes in the `gpu` tests.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton_lora = pytest.importorskip("loramux.kernels.triton_lora", reason="triton is not installed")

from loramux.kernels.plan import with_mode  # noqa: E402
from tests.lora_cases import (POPULARITY, fused_pool, fused_reference, plan_for, random_runs, sub_starts,  # noqa: E402
                              with_inert_rows)

RANKS = [4, 8, 16, 64, 8, 4, 16, 64]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check(pattern, run_len, depth, mode, dtype, num_tokens, d_in, d_outs, seed=0, inert=False):
    """One fused shrink and one fused expand (sub-projections of uneven widths, so tiles straddle them)."""
    r_max = 64
    a, b, scales, subs = fused_pool(RANKS, r_max, d_in, d_outs, seed)
    runs = random_runs(pattern, num_tokens, len(RANKS), RANKS, depth, run_len, seed=POPULARITY.index(pattern))
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(seed + 2))
    base = torch.randn(num_tokens, sum(d_outs))
    y = base.to(DEVICE, dtype).clone()
    to = dict(device=DEVICE, dtype=dtype)
    for layer in plan_for(runs, scales, r_max, DEVICE).layers:
        layer = with_mode(layer, mode)
        if inert:  # CUDA-graph padding: slot -1 rows pointing at real tokens
            layer = with_inert_rows(layer, [0, 3, num_tokens - 1, 0], r_max)
        h = triton_lora.lora_shrink(x.to(**to), a.to(**to).contiguous(), layer)
        triton_lora.lora_expand(y, b.to(**to).contiguous(), h, layer, sub_starts(d_outs))
    rounded = [(sa.to(dtype).float(), sb.to(dtype).float()) for sa, sb in subs]
    expected = base + fused_reference(x.to(dtype).float(), rounded, scales, runs, d_outs)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.float().cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (1, "slots"), (9, "segments"), (40, "segments")])
@pytest.mark.parametrize("depth", [1, 3])
def test_kernels_match_reference_fp32(pattern, run_len, mode, depth):
    check(pattern, run_len, depth, mode, torch.float32, num_tokens=45, d_in=24, d_outs=[40, 24, 24])


@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (1, "slots"), (9, "segments")])
def test_inert_rows_read_and_write_nothing(pattern, run_len, mode):
    check(pattern, run_len, 2, mode, torch.float32, num_tokens=29, d_in=24, d_outs=[40, 24, 24], inert=True)


@pytest.mark.parametrize("mode, run_len", [("gather", 1), ("segments", 9)])
def test_kernels_match_reference_fp16(mode, run_len):
    check("zipf", run_len, 2, mode, torch.float16, num_tokens=33, d_in=32, d_outs=[48, 40])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (128, "segments")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_match_reference_real_sizes_gpu(pattern, run_len, mode, dtype):
    check(pattern, run_len, 3, mode, dtype, num_tokens=256 if run_len == 1 else 1024, d_in=2048,
          d_outs=[2048, 512, 512])
