"""The base model's dense GEMMs (`engine/dense_gemm.py`): weights prepacked for oneDNN in bfloat16 on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramux.engine import dense_gemm
from tests.conftest import make_engine

needs_bf16_onednn = pytest.mark.skipif(not dense_gemm.packs_weights(torch.device("cpu"), torch.bfloat16),
                                       reason="oneDNN cannot run bfloat16 on this CPU")


@needs_bf16_onednn
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_prepacked_weight_gives_f_linears_bits_and_the_float32_product(rows, with_bias):
    """Packing is a layout change only: the same bits as F.linear (oneDNN's kernel either way), whatever the rows
    (the layout is chosen for ROWS_HINT rows), and within bfloat16 rounding of the float32 product."""
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 200, generator=gen).bfloat16(), torch.randn(96, 200, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16() if with_bias else None
    packed = dense_gemm.prepack(w)
    assert packed.is_mkldnn and packed.shape == w.shape and packed.dtype == torch.bfloat16
    got = dense_gemm.linear(x, packed, bias)
    assert torch.equal(got, F.linear(x, w, bias))
    expected = x.float() @ w.float().T + (bias.float() if with_bias else 0)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=5e-2)


def test_only_bfloat16_on_the_cpu_is_packed(tiny_llama_dir):
    """float32 stays on F.linear (MKL's sums, which the exactness tests compare against); CUDA too."""
    engine = make_engine(tiny_llama_dir, dtype="float32")
    assert not any(module.weight.is_mkldnn for _, module in engine.model.lora_linears())
    assert not engine.model.lm_head.is_mkldnn
    assert not dense_gemm.packs_weights(torch.device("cpu"), torch.float32)
    assert not dense_gemm.packs_weights(torch.device("cuda"), torch.bfloat16)


@needs_bf16_onednn
def test_a_bfloat16_cpu_model_runs_on_packed_weights_and_keeps_a_plain_embedding(tiny_llama_tied_dir):
    """The tied LM head is a packed copy: the embedding lookup still reads the plain table."""
    engine = make_engine(tiny_llama_tied_dir, dtype="bfloat16")
    model = engine.model
    assert model.lm_head.is_mkldnn and not model.embed_tokens.is_mkldnn
    assert all(module.weight.is_mkldnn for _, module in model.lora_linears())
