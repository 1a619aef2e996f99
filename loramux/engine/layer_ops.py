"""A decoder layer's element-wise ops (RMSNorm, rotary, silu(gate) * up), chosen once per model.

At decode these run on small tensors ([32, 576] for SmolLM2 at batch 32),
where each torch op costs mostly its dispatch (about 5 us on the CPU): the
torch RMSNorm is 7 ops. For bfloat16 on a CPU with AVX512-BF16 each is one
call of `cpu_layers.cpp` instead, rounding where torch rounds. CUDA (where CUDA
graphs remove the dispatch) and float32 keep torch's ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from loramux.kernels import cpu_extension

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [T, 1, D], from `model.RotaryEmbedding`


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, d] over its float32 root mean square, rounded to x's dtype, times weight [d] -> [T, d]."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def torch_rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: [T, H, D] rotated by its positions' (cos, sin) -> [T, H, D]."""
    cos, sin = rope
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


@dataclass(frozen=True)
class LayerOps:
    """The element-wise ops of one model (semantics and shapes: the torch_* functions above)."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rotate: Callable[[torch.Tensor, Rope], torch.Tensor]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_LAYER_OPS = LayerOps("torch", torch_rms_norm, torch_rotate, torch_silu_mul)


def cpu_kernel_layer_ops() -> LayerOps:
    """The ops of `cpu_layers.cpp` (built by `cpu_extension.load()`), each overload looked up once: through
    `torch.ops.<namespace>.<op>` every call would pay the lookups again (about 0.5 us of a 2.5 us call)."""
    ops = torch.ops.loramux_cpu_layers
    rotate = ops.rotate.default
    return LayerOps("cpu", ops.rms_norm.default, lambda x, rope: rotate(x, *rope), ops.silu_mul.default)


def select_layer_ops(device: torch.device, dtype: torch.dtype) -> LayerOps:
    """Pick the ops once: the C++ kernels for a bfloat16 model on a CPU where they build, torch's otherwise."""
    return cpu_kernel_layer_ops() if cpu_extension.serves(device, dtype) else TORCH_LAYER_OPS
