"""The C++ element-wise ops of a decoder layer (`cpu_layers.cpp`, `layer_ops.cpu_kernel_layer_ops`) for bfloat16.

Each op is checked against a float32 reference written here (one rounding at the end, so the tolerance is
the bfloat16 roundings torch makes on the way), and bit for bit against torch's bfloat16 ops that the
model ran before (`layer_ops.TORCH_LAYER_OPS`), which round at the same places.
Skipped where the CPU lacks AVX512-BF16 or the kernels cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from loramux.engine import layer_ops
from loramux.engine.layer_ops import TORCH_LAYER_OPS, select_layer_ops
from loramux.kernels import cpu_extension
from tests.conftest import make_engine

needs_kernel = pytest.mark.skipif(not cpu_extension.load(), reason="no AVX512-BF16 or the kernels did not build")
BF16_ROUNDING = 2.0 ** -8  # bfloat16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of itself
TWO_ROUNDINGS = 2.01 * BF16_ROUNDING  # a value rounded twice (float32's errors are far below)


@pytest.fixture(scope="module")
def cpu_ops():
    return layer_ops.cpu_kernel_layer_ops()


def bf16_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps lie between a and b, element by element (+0 and -0 are 0 apart)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:  # bit patterns on one increasing integer line
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def strided_rows(rows: int, width: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[rows, width] bfloat16 whose rows lie 7 values further apart than their width (a column slice)."""
    return (torch.randn(rows, width + 7, generator=gen) * scale).bfloat16()[:, 3:3 + width]


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 1, D] in bfloat16 as `RotaryEmbedding` builds them (theta 10000)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().bfloat16().unsqueeze(1), angles.sin().bfloat16().unsqueeze(1)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 32, 300])
@pytest.mark.parametrize("d", [576, 40, 17])  # SmolLM2's width; tails of a 16-lane vector
def test_rms_norm(cpu_ops, rows, d):
    gen = torch.Generator().manual_seed(rows * 1000 + d)
    x = strided_rows(rows, d, gen, scale=3.0)
    weight = torch.randn(d, generator=gen).bfloat16()
    got = cpu_ops.rms_norm(x, weight, 1e-5)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, d) and got.is_contiguous()
    x32 = x.float()
    reference = x32 / (x32.square().mean(-1, keepdim=True) + 1e-5).sqrt() * weight.float()
    torch.testing.assert_close(got.float(), reference, rtol=TWO_ROUNDINGS, atol=1e-6)  # x * rsqrt, then * weight
    # torch sums the squares in another order: a float32 mean one step apart can round x * rsqrt the other way
    ulps = bf16_ulps_apart(got, TORCH_LAYER_OPS.rms_norm(x, weight, 1e-5))
    assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= max(1, x.numel() // 1000)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 40), (2, 1, 2)])  # SmolLM2; tails
def test_rotate_strided_q_and_k(cpu_ops, rows, heads, kv_heads, head_dim):
    """q and k as the model has them: views of the fused q/k/v projection's rows."""
    gen = torch.Generator().manual_seed(rows + head_dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = (torch.randn(rows, q_size + 2 * kv_size, generator=gen) * 2).bfloat16()
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rope = rope_tables(torch.randint(0, 4096, (rows,), generator=gen), head_dim)
    for x in (q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim)):
        got = cpu_ops.rotate(x, rope)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape and got.is_contiguous()
        x32, (cos, sin) = x.float(), (t.float() for t in rope)
        half = head_dim // 2
        products = (x32 * cos, torch.cat([-x32[..., half:], x32[..., :half]], dim=-1) * sin)
        reference = products[0] + products[1]
        # each product is rounded (relative to itself), then their sum (relative to the sum)
        bound = 1.01 * BF16_ROUNDING * (products[0].abs() + products[1].abs() + reference.abs())
        assert bool(((got.float() - reference).abs() <= bound).all())
        assert torch.equal(got, TORCH_LAYER_OPS.rotate(x, rope))  # the same three roundings as torch's ops


@needs_kernel
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("width", [1536, 40, 17])  # SmolLM2's intermediate size; tails
def test_silu_mul(cpu_ops, rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = strided_rows(rows, 2 * width, gen, scale=4.0)
    gate_up[0, :5] = torch.tensor([0.0, -20.0, 20.0, -80.0, 80.0]).bfloat16()  # where e^-g under- or overflows
    got = cpu_ops.silu_mul(gate_up)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, width) and got.is_contiguous()
    gate, up = gate_up.float().chunk(2, dim=-1)
    reference = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(got.float(), reference, rtol=TWO_ROUNDINGS, atol=1e-6)  # silu, then the product
    # the kernel's e^x (a polynomial, relative error < 2e-7) is not torch's: a silu within that of a bfloat16
    # rounding boundary can round the other way (none did in 150M random values)
    ulps = bf16_ulps_apart(got, TORCH_LAYER_OPS.silu_mul(gate_up))
    assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= max(1, got.numel() // 1000)


@needs_kernel
def test_one_and_two_threads_give_the_same_bits(cpu_ops):
    """300 rows are split over the threads; each row is summed in one order whatever the thread count."""
    gen = torch.Generator().manual_seed(7)
    x, weight = strided_rows(300, 576, gen), torch.randn(576, generator=gen).bfloat16()
    qkv = torch.randn(300, 960, generator=gen).bfloat16()
    q = qkv[:, :576].view(-1, 9, 64)
    rope = rope_tables(torch.arange(300), 64)
    gate_up = torch.randn(300, 3072, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((cpu_ops.rms_norm(x, weight, 1e-5), cpu_ops.rotate(q, rope), cpu_ops.silu_mul(gate_up)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one, two) for one, two in zip(*results))


@needs_kernel
def test_inputs_the_kernels_cannot_read_are_refused(cpu_ops):
    x, weight = torch.randn(4, 16).bfloat16(), torch.randn(16).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_ops.rms_norm(x.float(), weight.float(), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous rows"):  # columns 2 apart
        cpu_ops.rms_norm(torch.randn(4, 32).bfloat16()[:, ::2], weight, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight \[d\]"):
        cpu_ops.rms_norm(x, weight[:8], 1e-5)
    with pytest.raises(RuntimeError, match=r"cos, sin \[T, 1, D\]"):
        cpu_ops.rotate(x.view(4, 2, 8), rope_tables(torch.arange(3), 8))
    with pytest.raises(RuntimeError, match=r"gate_up \[T, 2I\]"):
        cpu_ops.silu_mul(torch.randn(4, 15).bfloat16())


def test_layer_ops_choice(monkeypatch):
    """The C++ ops for bfloat16 on the CPU where they build; torch's for float32 and where they do not build."""
    cpu = torch.device("cpu")
    assert select_layer_ops(cpu, torch.float32) is TORCH_LAYER_OPS
    assert select_layer_ops(cpu, torch.bfloat16).name == ("cpu" if cpu_extension.load() else "torch")
    monkeypatch.setattr(cpu_extension, "load", lambda: False)  # a CPU without AVX512-BF16, or no compiler
    assert select_layer_ops(cpu, torch.bfloat16) is TORCH_LAYER_OPS


@needs_kernel
def test_dense_forward_with_the_kernels_matches_transformers_in_bf16(tiny_llama_dir):
    """`final_hidden_states` (the router's path, no KV cache) runs all three ops in every layer."""
    from transformers import AutoModelForCausalLM

    engine = make_engine(tiny_llama_dir, dtype="bfloat16")
    assert engine.layer_ops.name == "cpu"
    ids = engine.tokenizer.encode("Routing embeds prompts with the base model", add_special_tokens=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = hf.model(torch.tensor([ids])).last_hidden_state[0]
    got = engine.model.final_hidden_states(torch.tensor(ids))
    torch.testing.assert_close(got.float(), expected.float(), rtol=4 * BF16_ROUNDING, atol=4 * BF16_ROUNDING)
