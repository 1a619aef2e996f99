"""The torch LoRA ops (every formulation) against a per-token float32 loop, and the plan builder."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import torch_ref
from loramux.kernels.plan import with_mode
from tests.lora_cases import POPULARITY, RANKS, fused_pool, plan_for, random_runs, run_case


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


@pytest.mark.parametrize("pattern", ["all_distinct", "all_same", "one_dominant", "with_base_tokens"])
@pytest.mark.parametrize("run_len", [1, 13])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_a_flat_plan_sums_the_rows_a_token_has_in_its_one_level(pattern, run_len, mode):
    check(pattern, run_len, 3, mode, flat=True)
    check(pattern, run_len, 3, mode, flat=True, inert=True)


def test_a_flat_plan_is_one_level_with_each_rows_place_in_its_mix():
    runs = [(0, 2, [(3, 1.0, 0, 4), (1, 0.5, 0, 4)]), (2, 1, [(1, 1.0, 0, 4)]), (3, 1, [])]
    [level] = plan_for(runs, torch.ones(4), 4, flat=True).levels
    assert not level.unique_tokens
    assert level.slot_idx.tolist() == [1, 1, 1, 3, 3]
    assert level.token_idx.tolist() == [2, 0, 1, 0, 1]  # sorted by slot, then by level
    assert level.mix_index.tolist() == [0, 1, 1, 0, 0]
    assert level.coeff.tolist() == [1.0, 0.5, 0.5, 1.0, 1.0]
    levels = plan_for(runs, torch.ones(4), 4).levels
    assert [lv.unique_tokens for lv in levels] == [True, True]
    assert [lv.mix_index.tolist() for lv in levels] == [[0, 0, 0], [1, 1]]


def test_slot_groups_cut_at_a_gap_and_around_a_popular_slot():
    # 16 slots with one row each, a gap of 8 unused slots, 4 slots with 4 rows each, then one slot with 40.
    slots = list(range(16)) + [24 + i % 4 for i in range(16)] + [28] * 40
    runs = [(t, 1, [(s, 1.0, 0, 4)]) for t, s in enumerate(slots)]
    level = with_mode(plan_for(runs, torch.ones(32), 4).levels[0], "slots")
    assert level.slot_groups == ((0, 16, 1), (24, 28, 4), (28, 29, 40))
    # Every row has its own place in the packed layout, under its own slot: no row is lost or doubled.
    real = level.packed_mask.any(1)
    assert level.packed_mask.shape == (16 * 1 + 4 * 4 + 40, 4) and int(real.sum()) == level.num_rows
    assert sorted(level.packed_row[real].tolist()) == list(range(level.num_rows))
    assert level.packed_slot[real].tolist() == level.slot_idx[level.packed_row[real]].tolist()
    assert level.packed_token[real].tolist() == level.token_idx[level.packed_row[real]].tolist()


@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_inert_rows_read_and_write_nothing(pattern, mode):
    check(pattern, 1, 2, mode, inert=True)


@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_coefficients_are_read_from_the_device_tensor(mode):
    check("zipf", 3, 2, mode, coeff_factor=-1.5)


@pytest.mark.parametrize("run_len", [1, 13])
@pytest.mark.parametrize("mode", ["segments", "slots", "gather"])
def test_coefficients_rewritten_between_layers_are_read_by_the_next_layer(run_len, mode):
    """Composite gates rewrite a step's coefficients before each decoder layer: what the plan builds once per
    step must not hold them."""
    a, b, scales, _ = fused_pool(RANKS, 64, 24, [40, 16, 16], seed=0)
    runs = random_runs("zipf", 37, len(RANKS), RANKS, 2, run_len, seed=1)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(2))
    deltas = []
    plan = plan_for(runs, scales, 64, flat=True)
    assert len(plan.levels) == 1  # flat: one level, so `deltas` holds the two layers' results
    for level in plan.levels:
        level = with_mode(level, mode)
        for factor in (1.0, -2.5):  # the first layer, then the second with rewritten coefficients
            level.coeff.mul_(factor)
            y = torch.zeros(37, 72)
            torch_ref.lora_expand(y, b, torch_ref.lora_shrink(x, a, torch.ones(8, dtype=torch.int32), level, 3),
                                  torch.ones(8, dtype=torch.int32), level, (0, 40, 56))
            deltas.append(y)
    first, second = deltas
    assert first.abs().max() > 0
    torch.testing.assert_close(second, -2.5 * first, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("runs, mode, num_groups", [
    ([(t, 64, [(t // 64, 1.0, 0, 4)]) for t in range(0, 256, 64)], "segments", 0),  # prefill chunks
    ([(t, 1, [(t, 1.0, 0, 4)]) for t in range(8)], "slots", 1),  # decode, every slot once
    ([(0, 1, [(5, 1.0, 0, 4)]), (1, 1, [(9, 1.0, 0, 4)])], "segments", 0),  # decode of two: fewest ops
    ([(t, 1, [(40 * t, 1.0, 0, 4)]) for t in range(6)], "gather", 0),  # slots far apart
    ([(t, 1, [(0 if t < 20 else t + 10, 1.0, 0, 4)]) for t in range(22)], "slots", 2),  # one slot dominates
])
def test_plan_picks_the_formulation(runs, mode, num_groups):
    [level] = plan_for(runs, torch.ones(256), 4).levels
    assert level.mode == mode and len(level.slot_groups) == num_groups


def test_plan_carries_the_projections_its_slots_target():
    targets = [frozenset({"q_proj", "v_proj"}), frozenset({"o_proj"}), frozenset({"down_proj"})]
    runs = [(0, 2, [(0, 1.0, 0, 4)]), (2, 1, [(1, 0.5, 0, 4), (0, 0.5, 0, 4)])]
    plan = plan_for(runs, torch.ones(3), 4, slot_targets=targets)
    assert plan.targets == {"q_proj", "v_proj", "o_proj"}
    assert plan_for(runs, torch.ones(3), 4).targets is None  # unknown: every linear runs
