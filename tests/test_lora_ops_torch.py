"""The torch LoRA ops (both formulations) against a per-token float32 loop."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import torch_ref
from loramux.kernels.plan import with_mode
from tests.lora_cases import POPULARITY, loop_reference, plan_for, random_pool, random_runs

RANKS = [4, 8, 16, 64, 8, 4, 16, 64]


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len", [1, 13])  # decode rows, prefill segments
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_shrink_expand_match_loop(pattern, run_len, depth, mode):
    num_tokens, d_in, d_out, r_max = 37, 24, 40, 64
    a, b, scales = random_pool(len(RANKS), RANKS, r_max, d_in, d_out, seed=1)
    runs = random_runs(pattern, num_tokens, len(RANKS), RANKS, depth, run_len, seed=POPULARITY.index(pattern))
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(2))
    base = torch.randn(num_tokens, d_out + 16)
    y = base.clone()
    for layer in plan_for(runs, scales, r_max).layers:
        layer = with_mode(layer, mode)
        h = torch_ref.lora_shrink(x, a, layer)
        torch_ref.lora_expand(y, b, h, layer, y_offset=16)  # into a column slice
    expected = base + loop_reference(x, a, b, scales, runs, y_offset=16, d_total=d_out + 16)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_plan_sorts_rows_into_one_segment_per_slot():
    runs = [(0, 3, [(2, 1.0, 0, 4)]), (3, 1, [(0, 1.0, 0, 4)]), (4, 2, [(2, 0.5, 0, 4)]), (7, 1, [])]
    [layer] = plan_for(runs, torch.ones(3), 4).layers
    assert layer.segments == ((0, 0, 1, 3), (2, 1, 4, 0), (2, 4, 6, 4))
    assert layer.token_idx.tolist() == [3, 0, 1, 2, 4, 5]
    assert layer.coeff.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("runs, mode", [
    ([(t, 64, [(t // 64, 1.0, 0, 4)]) for t in range(0, 256, 64)], "segments"),  # prefill chunks
    ([(t, 1, [(t, 1.0, 0, 4)]) for t in range(8)], "slots"),  # decode, every slot once
    ([(0, 1, [(0, 1.0, 0, 4)]), (1, 1, [(40, 1.0, 0, 4)])], "gather"),  # two slots far apart
    ([(t, 1, [(0 if t < 20 else t + 10, 1.0, 0, 4)]) for t in range(22)], "gather"),  # one slot dominates
])
def test_plan_picks_the_formulation(runs, mode):
    [layer] = plan_for(runs, torch.ones(64), 4).layers
    assert layer.mode == mode
