"""The C++ BGMV kernel for bfloat16 on the CPU against the per-token float32 loop (tests/lora_cases.py).

Skipped where the CPU lacks AVX512-BF16 or the kernel cannot be built; the first run on a machine builds it
(about 20 s), later runs load torch's cached build.
"""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import cpu_bgmv, cpu_extension, select_lora_backend, torch_ref
from loramux.kernels.plan import with_mode
from tests.lora_cases import (POPULARITY, RANKS, fused_pool, mor_runs, plan_for, random_runs, random_scale_pools,
                              run_case, scaled_reference, sub_starts, with_inert_rows)

needs_kernel = pytest.mark.skipif(not cpu_extension.load(), reason="no AVX512-BF16 or the kernel did not build")

D_OUTS = [40, 16, 24]  # uneven sub-projections: column tiles of 16 end inside a sub-projection


def check(pattern, depth, r_max=64, run_len=1, d_in=40, num_tokens=37, **kwargs):
    got, expected = run_case(cpu_bgmv.lora_shrink, cpu_bgmv.lora_expand, pattern, run_len, depth, "gather",
                             num_tokens=num_tokens, d_in=d_in, d_outs=D_OUTS, dtype=torch.bfloat16, r_max=r_max,
                             ranks=[min(r, r_max) for r in RANKS], **kwargs)
    # x, the slots and y are bfloat16: h and y are each rounded once
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=3e-2)


@needs_kernel
@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("depth", [1, 3])
def test_decode_rows_match_the_loop(pattern, depth):
    check(pattern, depth)


@needs_kernel
@pytest.mark.parametrize("r_max", [2, 4, 8, 16, 32, 128])
def test_every_compiled_rank_padding(r_max):
    check("zipf", 2, r_max=r_max)
    check("all_distinct", 1, r_max=r_max, d_in=1000)  # d_in not a multiple of 32, long dot products


@needs_kernel
@pytest.mark.parametrize("pattern", ["all_distinct", "all_same", "with_base_tokens"])
def test_a_flat_level_adds_the_rows_of_a_repeated_token(pattern):
    check(pattern, 3, flat=True)
    check(pattern, 3, r_max=16, flat=True)


@needs_kernel
@pytest.mark.parametrize("pattern", ["all_distinct", "zipf"])
def test_inert_rows_and_inactive_slots_contribute_nothing(pattern):
    check(pattern, 2, inert=True, inactive=(1, 3, 6))
    check(pattern, 2, r_max=16, inactive=(1, 3, 6))


@needs_kernel
def test_coefficients_are_read_from_the_device_tensor():
    check("uniform", 2, coeff_factor=-1.5)


@needs_kernel
@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
def test_prefill_segments_match_the_loop(pattern):
    check(pattern, 2, run_len=13)  # groups of rows that share a slot and rank range, cut at odd places
    check(pattern, 1, run_len=5, r_max=16, inert=True)


@needs_kernel
@pytest.mark.parametrize("pattern", ["all_distinct", "zipf", "with_base_tokens"])
@pytest.mark.parametrize("r_max", [4, 8, 16, 64])
def test_long_segments_multiply_a_transposed_as_pairs_and_match_the_loop(pattern, r_max):
    """Segments of 16 tokens or more (prefill) multiply the A rows they read, transposed as pairs, in tiles of
    8 tokens (the last one short), up to 3 vectors of 16 outputs at a time (one at r_max 4); the used columns
    end inside a vector. An odd d_in cannot be read in pairs and keeps the row-by-row dot products."""
    check(pattern, 2, r_max=r_max, run_len=21, num_tokens=90)
    check(pattern, 1, r_max=r_max, run_len=40, num_tokens=90, inert=True, inactive=(2,))
    check(pattern, 1, r_max=r_max, run_len=40, num_tokens=90, d_in=41)


@needs_kernel
def test_long_runs_read_only_their_rank_range():
    """MoRE-style rank ranges on runs of 20 tokens or more: each run transposes and multiplies only the A rows
    of its range, against torch's ops in float32 on the same bfloat16 values."""
    ranks = [min(r, 16) for r in RANKS]
    a, b, scales, _ = fused_pool(ranks, 16, 40, D_OUTS, seed=11)
    a, b = a.bfloat16(), b.bfloat16()
    runs = [(0, 20, [(2, 1.0, 4, 12)]), (20, 20, [(2, 0.5, 0, 4)]), (40, 24, [(6, 1.0, 2, 16)])]
    [level] = plan_for(runs, scales, 16).levels
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(12)).bfloat16()
    active = torch.ones(len(ranks), dtype=torch.int32)
    y = torch.zeros(64, sum(D_OUTS), dtype=torch.bfloat16)
    cpu_bgmv.lora_apply(x, y, a, b, active, level, sub_starts(D_OUTS))
    expected = torch.zeros(64, sum(D_OUTS))
    h = torch_ref.lora_shrink(x.float(), a.float(), active, level, len(D_OUTS))
    torch_ref.lora_expand(expected, b.float(), h, active, level, sub_starts(D_OUTS))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=3e-2)


@needs_kernel
@pytest.mark.parametrize("run_len", [1, 5, 20])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("r_max", [16, 64])
def test_mor_rows_scale_the_shared_slot_by_their_pool_rows(run_len, flat, r_max):
    """MoR experts as rows of one shared slot, each token's rows with their own λ_A / λ_B pool rows (one of
    them -1), beside plain rows, inert rows and an inactive slot. Flat levels hold a MoR token's rows in one
    level: the shrink computes their A . x once and the expand sums them before adding them to y. Runs of 20
    tokens take the shrink's packed path."""
    num_tokens, d_in, num_rows, experts, shared = max(29, 4 * run_len), 72, 9, 8, 2
    ranks = [min(r, r_max) for r in RANKS]
    a, b, scales, subs = fused_pool(ranks, r_max, d_in, D_OUTS, seed=3)
    runs = mor_runs(num_tokens, run_len, ranks, shared_slot=shared, num_rows=num_rows, seed=4, experts=experts)
    rank_scale, out_scale = (pool.bfloat16() for pool in
                             random_scale_pools(num_rows, len(D_OUTS) * r_max, sum(D_OUTS), seed=5))
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(6)).bfloat16()
    base = torch.randn(num_tokens, sum(D_OUTS), generator=torch.Generator().manual_seed(7)).bfloat16()
    inactive = 5
    active = torch.tensor([s != inactive for s in range(len(ranks))], dtype=torch.int32)
    a_bf, b_bf, y = a.bfloat16(), b.bfloat16(), base.clone()
    levels = plan_for(runs, scales, r_max, flat=flat).levels
    assert levels[0].scale_idx is not None and len(levels) == (1 if flat else experts)
    for level in levels:
        level = with_inert_rows(level, [0, 3, num_tokens - 1], r_max)
        assert cpu_bgmv.kernel_takes(x, a_bf, r_max)
        h = cpu_bgmv.lora_shrink(x, a_bf, active, level, len(D_OUTS), rank_scale)
        cpu_bgmv.lora_expand(y, b_bf, h, active, level, sub_starts(D_OUTS), out_scale)
    live_runs = [(start, count, [c for c in assignments if c[0] != inactive]) for start, count, assignments in runs]
    rounded = [(sa.bfloat16().float(), sb.bfloat16().float()) for sa, sb in subs]
    expected = base.float() + scaled_reference(x.float(), rounded, scales, live_runs, rank_scale.float(),
                                               out_scale.float(), D_OUTS, r_max)
    # h, and y once per level (flat) or per expert level, are rounded to bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=6e-2)


@needs_kernel
def test_a_long_prompt_alone_takes_the_kernel():
    """One segment of hundreds of rows (a long prompt alone) runs the kernel's paired path: 8-token tiles over
    all of it, the output columns split over the threads."""
    x, a = torch.zeros(600, 8, dtype=torch.bfloat16), torch.zeros(2, 16, 8, dtype=torch.bfloat16)
    assert cpu_bgmv.kernel_takes(x, a, 16)
    check("zipf", 1, r_max=16, run_len=600, num_tokens=600)
    check("all_same", 2, r_max=64, run_len=300, num_tokens=600, inert=True)


@needs_kernel
def test_two_threads_give_the_one_thread_result():
    a, b, scales, _ = fused_pool(RANKS, 64, 256, D_OUTS, seed=5)
    runs = random_runs("uniform", 37, len(RANKS), RANKS, 3, 1, seed=1)
    [level] = plan_for(runs, scales, 64, flat=True).levels
    x, active = torch.randn(37, 256).bfloat16(), torch.ones(len(RANKS), dtype=torch.int32)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y = torch.zeros(37, sum(D_OUTS), dtype=torch.bfloat16)
            cpu_bgmv.lora_expand(y, b.bfloat16(), cpu_bgmv.lora_shrink(x, a.bfloat16(), active, level, 3), active,
                                 level, sub_starts(D_OUTS))
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    assert results[0].abs().max() > 0
    assert torch.equal(results[0], results[1])  # rows of a token add in plan order on either thread count


@needs_kernel
def test_a_bfloat16_cpu_model_gets_the_kernel_and_keeps_its_slots_in_bfloat16():
    cpu = torch.device("cpu")
    backend = select_lora_backend("auto", cpu, torch.bfloat16)
    assert backend.name == "torch+cpu-bgmv" and not backend.float32_slots_on_cpu
    assert select_lora_backend("auto", cpu, torch.float32).float32_slots_on_cpu
    assert select_lora_backend("torch", cpu, torch.bfloat16).name == "torch"
    # a slot rank the expand is not compiled for would send every level to torch's bfloat16 GEMMs: no kernel
    assert select_lora_backend("auto", cpu, torch.bfloat16, r_max=24).float32_slots_on_cpu
    # the kernel reads the level's per-row tensors only: any mode of a decode level gives one result
    level = plan_for([(t, 1, [(t % 8, 1.0, 0, 16)]) for t in range(12)], torch.ones(8), 64).levels[0]
    a, b, _, _ = fused_pool(RANKS, 64, 24, [24], seed=0)
    x, active = torch.randn(12, 24).bfloat16(), torch.ones(8, dtype=torch.int32)
    outputs = []
    for mode in ("segments", "slots", "gather"):
        y = torch.zeros(12, 24, dtype=torch.bfloat16)
        same = with_mode(level, mode)
        backend.expand(y, b.bfloat16(), backend.shrink(x, a.bfloat16(), active, same, 1), active, same, (0,))
        outputs.append(y)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@needs_kernel
def test_rows_that_index_outside_the_slots_or_tokens_are_refused_not_read():
    """The kernel reads A, B, x and y at the plan's indices: an index out of range is an error, not a stray read."""
    a, b, _, _ = fused_pool(RANKS, 64, 24, [24], seed=0)
    a, b, x = a.bfloat16(), b.bfloat16(), torch.randn(4, 24).bfloat16()
    active = torch.ones(len(RANKS), dtype=torch.int32)
    level = plan_for([(t, 1, [(t, 1.0, 0, 4)]) for t in range(4)], torch.ones(len(RANKS)), 64).levels[0]
    ops = torch.ops.loramux_cpu_bgmv
    args = (level.coeff, level.rank_lo, level.rank_hi, 1, None, None)
    ops.shrink(x, a, active, level.slot_idx, level.token_idx, *args)  # in range: runs
    with pytest.raises(RuntimeError, match="token 4 of 4"):
        ops.shrink(x, a, active, level.slot_idx, level.token_idx + 1, *args)
    with pytest.raises(RuntimeError, match=f"slot {len(RANKS)} of {len(RANKS)}"):
        ops.shrink(x, a, active, level.slot_idx + len(RANKS) - 3, level.token_idx, *args)
    h = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="token 4 of 4"):
        ops.expand(torch.zeros(4, 24, dtype=torch.bfloat16), b, h, active, level.slot_idx, level.token_idx + 1, [0],
                   None, None)


@needs_kernel
@pytest.mark.parametrize("run_len", [1, 20])
def test_apply_gives_what_shrink_then_expand_give(run_len):
    """The backend's one call per level (`LoraBackend.apply` through `cpu_bgmv.lora_apply`) against its two ops,
    with MoR rows scaled by both pools, inert rows and an inactive slot; and with slots of a rank the kernel is
    not compiled for, which torch's ops take."""
    backend = select_lora_backend("auto", torch.device("cpu"), torch.bfloat16, r_max=16)
    assert backend.fused is cpu_bgmv.lora_apply
    num_tokens, d_in, num_rows, ranks = 4 * run_len + 9, 72, 9, [min(r, 16) for r in RANKS]
    a, b, scales, _ = fused_pool(ranks, 16, d_in, D_OUTS, seed=3)
    a, b = a.bfloat16(), b.bfloat16()
    pools = [pool.bfloat16() for pool in random_scale_pools(num_rows, len(D_OUTS) * 16, sum(D_OUTS), seed=5)]
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(6)).bfloat16()
    active = torch.tensor([s != 5 for s in range(len(ranks))], dtype=torch.int32)
    runs = mor_runs(num_tokens, run_len, ranks, shared_slot=2, num_rows=num_rows, seed=4)
    levels = [with_inert_rows(level, [0, num_tokens - 1], 16) for level in plan_for(runs, scales, 16).levels]
    a24, b24, scales24, _ = fused_pool(ranks, 24, d_in, D_OUTS, seed=8)
    a24, b24 = a24.bfloat16(), b24.bfloat16()
    assert not cpu_bgmv.kernel_takes(x, a24, 24)
    [level24] = plan_for([(0, num_tokens, [(1, 0.7, 0, 16)])], scales24, 24).levels
    cases = [(level, a, b, pools) for level in levels] + [(level24, a24, b24, (None, None))]
    for level, slots_a, slots_b, (rank_scale, out_scale) in cases:
        base = torch.randn(num_tokens, sum(D_OUTS), generator=torch.Generator().manual_seed(7)).bfloat16()
        fused, separate = base.clone(), base.clone()
        backend.apply(x, fused, slots_a, slots_b, active, level, sub_starts(D_OUTS), rank_scale, out_scale)
        h = backend.shrink(x, slots_a, active, level, len(D_OUTS), rank_scale)
        backend.expand(separate, slots_b, h, active, level, sub_starts(D_OUTS), out_scale)
        assert not torch.equal(fused, base)
        assert torch.equal(fused, separate)
