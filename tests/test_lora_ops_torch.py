"""The torch LoRA ops (every formulation) against a per-token float32 loop, and the plan builder."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import torch_ref
from tests.lora_cases import POPULARITY, plan_for, run_case


def check(pattern, run_len, depth, mode, **kwargs):
    got, expected = run_case(torch_ref.lora_shrink, torch_ref.lora_expand, pattern, run_len, depth, mode,
                             num_tokens=37, d_in=24, d_outs=[40, 16, 16], **kwargs)  # fused 3-sub, like q/k/v
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len", [1, 13])  # decode rows, prefill segments
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_shrink_expand_match_loop(pattern, run_len, depth, mode):
    check(pattern, run_len, depth, mode)


@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_inert_rows_read_and_write_nothing(pattern, mode):
    check(pattern, 1, 2, mode, inert=True)


@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_coefficients_are_read_from_the_device_tensor(mode):
    check("zipf", 3, 2, mode, coeff_factor=-1.5)


@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_rows_of_slots_inactive_for_the_linear_contribute_nothing(mode):
    check("uniform", 2, 2, mode, inactive=(1, 3, 6))


@pytest.mark.parametrize("run_len", [1, 13])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_bfloat16_activations_with_float32_slots(run_len, mode):
    """The CPU keeps a bfloat16 model's slots in float32: the ops cast x up and add the delta to y once."""
    got, expected = run_case(torch_ref.lora_shrink, torch_ref.lora_expand, "zipf", run_len, 2, mode, num_tokens=37,
                             d_in=24, d_outs=[40, 16, 16], dtype=torch.bfloat16, slot_dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)  # y is rounded to bfloat16 once per level


def test_plan_sorts_rows_into_one_segment_per_slot():
    runs = [(0, 3, [(2, 1.0, 0, 4)]), (3, 1, [(0, 1.0, 0, 4)]), (4, 2, [(2, 0.5, 0, 4)]), (7, 1, [])]
    [level] = plan_for(runs, torch.ones(3), 4).levels
    assert [(s.slot, s.start, s.end, s.token) for s in level.segments] == [(0, 0, 1, 3), (2, 1, 4, 0), (2, 4, 6, 4)]
    assert level.token_idx.tolist() == [3, 0, 1, 2, 4, 5]
    assert level.coeff.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("runs, mode", [
    ([(t, 64, [(t // 64, 1.0, 0, 4)]) for t in range(0, 256, 64)], "segments"),  # prefill chunks
    ([(t, 1, [(t, 1.0, 0, 4)]) for t in range(8)], "slots"),  # decode, every slot once
    ([(0, 1, [(5, 1.0, 0, 4)]), (1, 1, [(9, 1.0, 0, 4)])], "segments"),  # decode of two: fewest ops
    ([(t, 1, [(40 * t, 1.0, 0, 4)]) for t in range(6)], "gather"),  # slots far apart
    ([(t, 1, [(0 if t < 20 else t + 10, 1.0, 0, 4)]) for t in range(22)], "gather"),  # one slot dominates
])
def test_plan_picks_the_formulation(runs, mode):
    [level] = plan_for(runs, torch.ones(256), 4).levels
    assert level.mode == mode


def test_plan_carries_the_projections_its_slots_target():
    targets = [frozenset({"q_proj", "v_proj"}), frozenset({"o_proj"}), frozenset({"down_proj"})]
    runs = [(0, 2, [(0, 1.0, 0, 4)]), (2, 1, [(1, 0.5, 0, 4), (0, 0.5, 0, 4)])]
    plan = plan_for(runs, torch.ones(3), 4, slot_targets=targets)
    assert plan.targets == {"q_proj", "v_proj", "o_proj"}
    assert plan_for(runs, torch.ones(3), 4).targets is None  # unknown: every linear runs
