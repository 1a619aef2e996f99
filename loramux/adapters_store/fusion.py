"""LoraRetriever's fusion: one adapter whose A and B are weighted averages of several experts'.

    A_f = sum_i w_i A_i        B_f = sum_i w_i s_i B_i        delta_f = B_f @ A_f

Each expert's scale s_i (alpha/rank) is folded into its B so that experts
trained with different alphas average on the same footing; the fused adapter
has scale 1. Ranks may differ: smaller ones are zero-padded to the largest,
and a projection an expert does not target counts as zeros for it. This is
not a mixture of the experts' outputs — B_f A_f has cross terms B_i A_j.
"""

from __future__ import annotations

import torch

from loramux.adapters_store.peft_format import LoraAdapter


def _padded(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad a rank dimension (`dim`) of A [r, d_in] or B [d_out, r] up to `rank`."""
    missing = rank - t.shape[dim]
    if not missing:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def fuse_adapters(adapters: list[LoraAdapter], weights: list[float]) -> LoraAdapter:
    """The weighted A/B average of `adapters` (float32 math, returned in float32)."""
    if not adapters or len(adapters) != len(weights):
        raise ValueError("fusion needs one weight per adapter and at least one adapter")
    rank = max(adapter.rank for adapter in adapters)
    fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for adapter, weight in zip(adapters, weights):
        for key, (a, b) in adapter.weights.items():
            a = _padded(a.float(), rank, 0) * weight
            b = _padded(b.float(), rank, 1) * (weight * adapter.scale)
            if key in fused:
                fa, fb = fused[key]
                a, b = fa + a, fb + b
            fused[key] = (a, b)
    targets = tuple(sorted({module for adapter in adapters for module in adapter.target_modules}))
    base_models = {adapter.base_model for adapter in adapters}
    return LoraAdapter(rank=rank, alpha=float(rank), scale=1.0, target_modules=targets, weights=fused,
                       base_model=base_models.pop() if len(base_models) == 1 else None)
