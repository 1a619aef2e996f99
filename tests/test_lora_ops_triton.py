"""Triton LoRA kernels against the float32 per-token loop, their block table and their warm-up.

Without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported), which has no bf16 `tl.dot`: fp32 and fp16 there,
bf16 and real sizes (7B projection shapes) in the `gpu` tests.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton_lora = pytest.importorskip("loramux.kernels.triton_lora", reason="triton is not installed")

from loramux.kernels.plan import build_lora_plan, with_mode  # noqa: E402
from tests.lora_cases import POPULARITY, RANKS, fused_pool, random_runs, run_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SEVEN_B = {"qkv": (4096, [4096, 4096, 4096]), "gate_up": (4096, [11008, 11008]), "down": (11008, [4096])}


def check(pattern, run_len, depth, mode, dtype=torch.float32, num_tokens=45, d_in=24, d_outs=(40, 24, 24),
          splits=None, **kwargs):
    shrink = functools.partial(triton_lora.lora_shrink, splits=splits)
    got, expected = run_case(shrink, triton_lora.lora_expand, pattern, run_len, depth, mode, num_tokens=num_tokens,
                             d_in=d_in, d_outs=list(d_outs), dtype=dtype, device=DEVICE, **kwargs)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


# The interpreter runs each program in Python (~0.1 s): the default suite checks every pattern on a single
# projection and the fused 3-sub q/k/v at rank 64 on a few, the full grid is `slow`.
@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (9, "segments")])
def test_kernels_match_reference_fp32(pattern, run_len, mode):
    check(pattern, run_len, 2, mode, num_tokens=7 if run_len == 1 else 23, d_outs=[40])


@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (9, "segments")])
def test_fused_qkv_at_rank_64_matches_reference_fp32(run_len, mode):
    check("zipf", run_len, 1, mode, num_tokens=6 if run_len == 1 else 23)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (1, "slots"), (9, "segments"), (40, "segments")])
@pytest.mark.parametrize("depth", [1, 3])
def test_kernels_match_reference_full_grid_fp32(pattern, run_len, mode, depth):
    check(pattern, run_len, depth, mode)


@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (1, "slots"), (9, "segments")])
def test_inert_rows_read_and_write_nothing(run_len, mode):
    check("with_base_tokens", run_len, 2, mode, num_tokens=7 if run_len == 1 else 23, d_outs=[40, 24], inert=True)


@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (9, "segments")])
def test_coefficients_are_read_from_the_device_tensor(run_len, mode):
    check("zipf", run_len, 2, mode, num_tokens=5 if run_len == 1 else 19, d_outs=[40], coeff_factor=-1.5)


@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (9, "segments")])
def test_rows_of_slots_inactive_for_the_linear_are_skipped(run_len, mode):
    check("uniform", run_len, 2, mode, num_tokens=8 if run_len == 1 else 27, d_outs=[40], inactive=(1, 3, 6))


@pytest.mark.parametrize("splits", [1, 3, 4])
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (5, "segments")])
def test_split_k_matches_reference(splits, run_len, mode):
    # d_in 200: two 128-wide BGMV tiles, four 64-wide SGMV tiles; 3 and 4 splits leave some parts empty
    check("zipf", run_len, 1, mode, num_tokens=4 if run_len == 1 else 11, d_in=200, d_outs=[40], splits=splits)


@pytest.mark.parametrize("mode, run_len", [("gather", 1), ("segments", 9)])
def test_kernels_match_reference_fp16(mode, run_len):
    check("zipf", run_len, 2, mode, torch.float16, num_tokens=5 if run_len == 1 else 33, d_in=32, d_outs=[48, 40])


def test_split_k_fills_the_gpu_only_when_rows_are_few():
    assert triton_lora.split_k(programs=3, d_in=4096, block_d=128, num_sms=132) == 32  # decode of one, q/k/v
    assert triton_lora.split_k(programs=96, d_in=4096, block_d=128, num_sms=132) == 8
    assert triton_lora.split_k(programs=768, d_in=4096, block_d=128, num_sms=132) == 1  # batch 256
    assert triton_lora.split_k(programs=1, d_in=200, block_d=128, num_sms=132) == 2  # at most one per d tile


def every_block_variant():
    """Every entry `block_sizes` returns, over widths, every rank width up to fused q/k/v at rank 64
    (3 x 64 stacked ranks) and every segment length class."""
    variants = set()
    for width in (16, 24, 64, 100, 128, 576, 4096, 11008, 3 * 11008):
        for rank_width in range(1, 3 * 64 + 1):
            variants.add(("bgmv", tuple(triton_lora.block_sizes("bgmv", width, rank_width).items())))
            for seg_len in (1, 16, 17, 512, 4096):
                variants.add(("sgmv", tuple(triton_lora.block_sizes("sgmv", width, rank_width, seg_len).items())))
    return sorted(variants)


@pytest.mark.parametrize("itemsize", [2, 4])  # bf16/fp16, fp32
def test_every_block_variant_fits_the_shared_memory_of_an_l4(itemsize):
    for kind, blocks in every_block_variant():
        blocks = dict(blocks)
        assert blocks["BLOCK_R"] <= triton_lora.MAX_BLOCK_R
        used = triton_lora.shared_memory_bytes(kind, blocks, itemsize)
        assert used <= triton_lora.SHARED_MEMORY_LIMIT, (kind, blocks, itemsize, used)


def test_rank_64_fused_qkv_is_tiled():
    blocks = triton_lora.block_sizes("bgmv", 4096, 3 * 64)
    assert blocks["BLOCK_R"] == 64 and blocks["BLOCK_R"] * blocks["BLOCK_D"] <= 64 * 128  # no 256-wide tile


@pytest.mark.parametrize("d_in, d_out_total, r_max", [(4096, 12288, 64), (2048, 3072, 16), (24, 88, 64)])
def test_warm_up_plans_select_every_variant_a_step_can(d_in, d_out_total, r_max):
    """Every block table entry a real step can select, for shrink and expand, is one the warm-up runs."""
    warm = triton_lora.warm_up_levels(r_max, "cpu")
    for width, rank_width in ((d_in, 3 * r_max), (d_out_total, r_max)):
        ran = {tuple(triton_lora.launch_blocks(width, rank_width, level).items()) for level in warm}
        levels = [build_lora_plan([(0, n, [(0, 1.0, 0, r_max)])], torch.ones(1), r_max).levels[0]
                  for n in [*range(1, 40), 128, 512, 4096]]  # one segment: "segments" mode
        for level in levels + [with_mode(levels[0], "gather"), with_mode(levels[0], "slots")]:
            assert tuple(triton_lora.launch_blocks(width, rank_width, level).items()) in ran


def test_warm_up_runs_every_kernel():
    """Start-up calls warm_up on CUDA: every variant it launches must run (here under the interpreter) without
    raising, or the server would not start; the GPU test below checks that nothing compiles after it."""
    triton_lora.warm_up([(24, (40, 24, 24)), (40, (24,))], 16, torch.float32, torch.device(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("projection, pattern", [("qkv", p) for p in POPULARITY]
                         + [(proj, p) for proj in ("gate_up", "down") for p in ("all_distinct", "zipf")])
@pytest.mark.parametrize("run_len, mode", [(1, "gather"), (1, "segments"), (128, "segments")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_match_reference_7b_shapes_gpu(projection, pattern, run_len, mode, dtype):
    d_in, d_outs = SEVEN_B[projection]
    check(pattern, run_len, 3, mode, dtype, num_tokens=256 if run_len == 1 else 1024, d_in=d_in, d_outs=d_outs,
          inert=True)


def _compiled(kernel) -> int:
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nothing_compiles_after_warm_up_gpu(dtype):
    kernels = [triton_lora._sgmv_shrink_kernel, triton_lora._bgmv_shrink_kernel, triton_lora._sgmv_expand_kernel,
               triton_lora._bgmv_expand_kernel]
    shapes = [(d_in, tuple(d_outs)) for d_in, d_outs in SEVEN_B.values()]
    triton_lora.warm_up(shapes, 64, dtype, torch.device("cuda"))
    before = [_compiled(k) for k in kernels]
    steps = [(1, "gather", 1), (33, "segments", 99), (1, "slots", 64)]  # decode of one, prefill, decode batch
    for (d_in, d_outs), (run_len, mode, tokens) in zip(SEVEN_B.values(), steps):
        run_case(triton_lora.lora_shrink, triton_lora.lora_expand, "zipf", run_len, 2, mode, num_tokens=tokens,
                 d_in=d_in, d_outs=list(d_outs), dtype=dtype, device="cuda", inert=True)
    assert [_compiled(k) for k in kernels] == before


def test_expand_refuses_a_flat_plan():
    """The expand stores without atomics, so a level where a token has two rows would lose one of them."""
    runs = [(0, 2, [(0, 1.0, 0, 4), (1, 1.0, 0, 4)])]
    [level] = build_lora_plan(runs, torch.ones(2), 4, DEVICE, flat=True).levels
    y, h = torch.zeros(2, 8, device=DEVICE), torch.zeros(level.num_rows, 4, device=DEVICE)
    with pytest.raises(ValueError, match="flat plans"):
        triton_lora.lora_expand(y, torch.zeros(2, 8, 4, device=DEVICE), h, torch.ones(2, dtype=torch.int32,
                                                                                        device=DEVICE), level)


@pytest.mark.parametrize("run_len", [1, 9])
def test_a_plan_built_without_mode_tensors_gives_the_same_result(run_len):
    """The engine builds the Triton backend's plans without the torch ops' masks and packed layout
    (`reads_mode_tensors`): the kernels must read only the per-row tensors."""
    a, b, scales, _ = fused_pool(RANKS, 64, 24, [40], seed=0)
    runs = random_runs("zipf", 23, len(RANKS), RANKS, 2, run_len, seed=1)
    x = torch.randn(23, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    a, b = a.to(DEVICE), b.to(DEVICE)
    active = torch.ones(len(RANKS), dtype=torch.int32, device=DEVICE)
    results = []
    for mode_tensors in (True, False):
        y = torch.zeros(23, 40, device=DEVICE)
        for level in build_lora_plan(runs, scales, 64, DEVICE, mode_tensors=mode_tensors).levels:
            assert mode_tensors or (level.rank_mask is None and level.packed_row is None)
            triton_lora.lora_expand(y, b, triton_lora.lora_shrink(x, a, active, level, 1), active, level, (0,))
        results.append(y)
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[1], results[0])
