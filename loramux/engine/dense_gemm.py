"""The base model's dense GEMMs, with weights prepacked once for oneDNN where that pays (bfloat16 on the CPU).

torch's `F.linear` on the CPU hands a bfloat16 GEMM to oneDNN, which reorders
the weight into its blocked layout on every call. At decode's few rows that
reorder is much of the call: on this project's CPU (2 threads, SmolLM2's
shapes) a 32-row GEMM took 20-25% less time on a weight reordered once at load
(`torch.ops.mkldnn._reorder_linear_weight`, the step torch.compile's CPU
freezing takes), a 1-row one half; 4,096-row prefill GEMMs the same. The
outputs are the same bits (oneDNN runs the same kernel). Other devices and
dtypes keep `F.linear`; float32 is not packed because oneDNN's float32 sums
differ from MKL's in the last bits, and the float32 path is the exact one.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ROWS_HINT = 32  # the blocked layout is chosen for this many rows; measured as good for 1 to 4,096 rows


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `prepack` applies: bfloat16 on a CPU where this torch's oneDNN packs and runs bfloat16."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_packs_bf16()


@functools.cache
def _onednn_packs_bf16() -> bool:
    """Probed once on a small weight: a torch built without oneDNN (or its linear ops) keeps F.linear, logged."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        weight = prepack(torch.zeros(16, 16, dtype=torch.bfloat16))
        linear(torch.zeros(1, 16, dtype=torch.bfloat16), weight)
        return True
    except (AttributeError, RuntimeError) as exc:
        logger.warning("dense GEMMs: oneDNN cannot prepack bfloat16 weights here (%s); using F.linear", exc)
        return False


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """weight [d_out, d_in] -> the same weight in oneDNN's layout (an opaque mkldnn tensor of the same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, d_in] @ weight.T (+ bias) -> [T, d_out], for a plain or a prepacked weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
