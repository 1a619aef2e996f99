"""The LoRA kernels with coefficients read from device tensors that are rewritten per decoder layer.

Composite gates overwrite a plan level's `coeff` in place before
each decoder layer; every formulation (torch: segments, slots, gather; Triton
under the interpreter: SGMV, BGMV) must read the per-token values, not the
numbers the plan was built with. Reference: the float32 per-token loop.
"""

from __future__ import annotations

import os
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from loramux.kernels import torch_ref  # noqa: E402
from loramux.kernels.plan import with_mode  # noqa: E402
from tests.lora_cases import (POPULARITY, fused_pool, mor_runs, plan_for, random_runs, random_scale_pools,  # noqa: E402
                              scaled_reference, sub_starts, with_inert_rows)

RANKS = [4, 8, 16, 8, 4, 16]
R_MAX = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gated_reference(x, subs, scales, runs, gates, d_outs):
    """y[t] = sum_k gates[t, k] * w_k * scale * B[:, lo:hi] @ A[lo:hi] @ x[t], per sub-projection, float32."""
    y = torch.zeros(x.shape[0], sum(d_outs))
    for start, count, assignments in runs:
        for t in range(start, start + count):
            offset = 0
            for (a, b), d_out in zip(subs, d_outs):
                for k, (slot, w, lo, hi) in enumerate(assignments):
                    delta = b[slot, :, lo:hi] @ (a[slot, lo:hi] @ x[t])
                    y[t, offset:offset + d_out] += float(gates[t, k]) * w * float(scales[slot]) * delta
                offset += d_out
    return y


def cases():
    """(backend, run_len, mode, flat): Triton runs every non-segment mode as BGMV, so it takes gather and
    segments, and only plans with one level per mixture depth (flat plans are for the torch backend)."""
    out = [(("torch", torch_ref.lora_shrink, torch_ref.lora_expand), run_len, mode, flat)
           for run_len, mode in [(1, "gather"), (1, "slots"), (7, "segments")] for flat in (False, True)]
    try:
        from loramux.kernels import triton_lora
    except ImportError:
        return out
    return out + [(("triton", triton_lora.lora_shrink, triton_lora.lora_expand), run_len, mode, False)
                  for run_len, mode in [(1, "gather"), (7, "segments")]]


@pytest.mark.parametrize("backend, run_len, mode, flat", cases(),
                         ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("pattern", ["zipf", "all_same", "with_base_tokens"])
def test_coefficients_rewritten_per_layer(backend, pattern, run_len, mode, flat):
    _, shrink, expand = backend
    num_tokens, d_in, d_outs, depth = 21, 24, [32, 16], 3
    a, b, scales, subs = fused_pool(RANKS, R_MAX, d_in, d_outs, seed=0)
    runs = random_runs(pattern, num_tokens, len(RANKS), RANKS, depth, run_len, seed=POPULARITY.index(pattern))
    plan = plan_for(runs, scales, R_MAX, DEVICE, flat=flat)
    levels = [with_mode(level, mode) for level in plan.levels]
    built = [level.coeff.clone() for level in levels]
    active = torch.ones(len(RANKS), dtype=torch.int32, device=DEVICE)
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for decoder_layer in range(2):  # a different gate per decoder level, written into the same tensors
        gates = torch.rand(num_tokens, depth, generator=g)
        y = torch.zeros(num_tokens, sum(d_outs), device=DEVICE)
        for level, coeff in zip(levels, built):  # each row takes the gate of its place in its token's mix
            column = gates.to(DEVICE)[level.token_idx, level.mix_index]
            torch.mul(coeff, column, out=level.coeff)
            h = shrink(x.to(DEVICE), a.to(DEVICE).contiguous(), active, level, len(d_outs))
            expand(y, b.to(DEVICE).contiguous(), h, active, level, sub_starts(d_outs))
        expected = gated_reference(x, subs, scales, runs, gates, d_outs)
        torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, run_len, mode, flat", cases(),
                         ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("inert", [False, True])
def test_mor_rows_scale_the_shared_slot_by_their_pool_rows(backend, run_len, mode, flat, inert):
    """MoR experts as rows of one shared slot with scale rows: λ_A over the ranks of each fused sub-projection,
    λ_B over its columns, read from pools whose last row (ones) stands for scale_idx -1."""
    _, shrink, expand = backend
    num_tokens, d_in, d_outs, num_rows = 19, 24, [32, 16], 5
    a, b, scales, subs = fused_pool(RANKS, R_MAX, d_in, d_outs, seed=3)
    runs = mor_runs(num_tokens, run_len, RANKS, shared_slot=2, num_rows=num_rows, seed=4)
    rank_scale, out_scale = random_scale_pools(num_rows, len(d_outs) * R_MAX, sum(d_outs), seed=5)
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(6))
    y = torch.zeros(num_tokens, sum(d_outs), device=DEVICE)
    active = torch.ones(len(RANKS), dtype=torch.int32, device=DEVICE)
    levels = plan_for(runs, scales, R_MAX, DEVICE, flat=flat).levels
    assert levels[0].scale_idx is not None
    for level in levels:
        level = with_mode(level, mode)
        if inert:
            level = with_inert_rows(level, [0, 3, num_tokens - 1], R_MAX)
        h = shrink(x.to(DEVICE), a.to(DEVICE).contiguous(), active, level, len(d_outs), rank_scale.to(DEVICE))
        expand(y, b.to(DEVICE).contiguous(), h, active, level, sub_starts(d_outs), out_scale.to(DEVICE))
    expected = scaled_reference(x, subs, scales, runs, rank_scale, out_scale, d_outs, R_MAX)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_a_level_without_scaled_rows_has_no_scale_idx():
    runs = [(0, 2, [(1, 1.0, 0, 4)]), (2, 1, [(0, 1.0, 0, 4, -1)])]
    assert plan_for(runs, torch.ones(2), 4).levels[0].scale_idx is None
    [level] = plan_for(runs + [(3, 2, [(1, 1.0, 0, 4, 7)])], torch.ones(2), 4).levels
    assert level.scale_idx.tolist() == [-1, -1, -1, 7, 7]  # sorted by slot: slot 0, then slot 1's runs in order
    assert [s.scale_row for s in level.segments] == [-1, -1, 7]
