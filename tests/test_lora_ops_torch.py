"""The torch LoRA ops (both formulations) against a per-token float32 loop."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import torch_ref
from loramux.kernels.plan import with_mode
from tests.lora_cases import (POPULARITY, fused_pool, fused_reference, plan_for, random_runs, sub_starts,
                              with_inert_rows)

RANKS = [4, 8, 16, 64, 8, 4, 16, 64]


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len", [1, 13])  # decode rows, prefill segments
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_shrink_expand_match_loop(pattern, run_len, depth, mode):
    check(pattern, run_len, depth, mode, inert=False)


@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_inert_rows_read_and_write_nothing(pattern, mode):
    check(pattern, 1, 2, mode, inert=True)


def check(pattern, run_len, depth, mode, inert):
    """Fused shrink + expand of every plan layer (with inert rows appended if asked) against the loop."""
    num_tokens, d_in, d_outs, r_max = 37, 24, [40, 16, 16], 64  # three fused sub-projections, like q/k/v
    a, b, scales, subs = fused_pool(RANKS, r_max, d_in, d_outs, seed=1)
    runs = random_runs(pattern, num_tokens, len(RANKS), RANKS, depth, run_len, seed=POPULARITY.index(pattern))
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(2))
    base = torch.randn(num_tokens, sum(d_outs))
    y = base.clone()
    for layer in plan_for(runs, scales, r_max).layers:
        layer = with_mode(layer, mode)
        if inert:
            layer = with_inert_rows(layer, [0, 5, num_tokens - 1, 0], r_max)
        torch_ref.lora_expand(y, b, torch_ref.lora_shrink(x, a, layer), layer, sub_starts(d_outs))
    torch.testing.assert_close(y, base + fused_reference(x, subs, scales, runs, d_outs), rtol=1e-5, atol=1e-5)


def test_plan_sorts_rows_into_one_segment_per_slot():
    runs = [(0, 3, [(2, 1.0, 0, 4)]), (3, 1, [(0, 1.0, 0, 4)]), (4, 2, [(2, 0.5, 0, 4)]), (7, 1, [])]
    [layer] = plan_for(runs, torch.ones(3), 4).layers
    assert [(s.slot, s.start, s.end, s.token, s.coeff) for s in layer.segments] == [
        (0, 0, 1, 3, 1.0), (2, 1, 4, 0, 1.0), (2, 4, 6, 4, 0.5)]
    assert layer.token_idx.tolist() == [3, 0, 1, 2, 4, 5]
    assert layer.coeff.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("runs, mode", [
    ([(t, 64, [(t // 64, 1.0, 0, 4)]) for t in range(0, 256, 64)], "segments"),  # prefill chunks
    ([(t, 1, [(t, 1.0, 0, 4)]) for t in range(8)], "slots"),  # decode, every slot once
    ([(0, 1, [(5, 1.0, 0, 4)]), (1, 1, [(9, 1.0, 0, 4)])], "segments"),  # decode of two: fewest ops
    ([(t, 1, [(40 * t, 1.0, 0, 4)]) for t in range(6)], "gather"),  # slots far apart
    ([(t, 1, [(0 if t < 20 else t + 10, 1.0, 0, 4)]) for t in range(22)], "gather"),  # one slot dominates
])
def test_plan_picks_the_formulation(runs, mode):
    [layer] = plan_for(runs, torch.ones(256), 4).layers
    assert layer.mode == mode
