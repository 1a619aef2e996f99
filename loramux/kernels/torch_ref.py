"""Pure-torch LoRA shrink/expand: the reference backend and the CPU backend.

Two formulations of the same math, picked by the plan layer:
- gathered (BGMV-like): gather every row's A/B matrix and run one `bmm`;
  best when segments are short (decode), where a Python loop would dominate.
- segmented (SGMV-like): one dense matmul per (slot, token run); best for
  prefill, where gathering per-token weight copies would cost T * r * d memory.
"""

from __future__ import annotations

import torch

from loramux.kernels.plan import LoraPlanLayer


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, layer: LoraPlanLayer) -> torch.Tensor:
    """Semantics: h[n] = A[slot[n]] @ x[token[n]] for every row n of the plan layer.

    x: [T, d_in]; lora_a: [S, R, d_in] (R = r_max, or several r_max blocks
    stacked for fused projections); returns h: [N, R] in x's dtype.
    """
    if layer.use_segments:
        h = x.new_empty(layer.num_rows, lora_a.shape[1])
        for slot, start, end in layer.segments:
            h[start:end] = x[layer.token_idx[start:end]] @ lora_a[slot].T
        return h
    x_rows = x[layer.token_idx].unsqueeze(2)  # [N, d_in, 1]
    return torch.bmm(lora_a[layer.slot_idx], x_rows).squeeze(2)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    layer: LoraPlanLayer,
    h_offset: int = 0,
    y_offset: int = 0,
) -> None:
    """Semantics: y[token[n], y_off:y_off+d_out] += coeff[n] * B[slot[n]][:, lo:hi] @ h[n, h_off+lo:h_off+hi].

    y: [T, d_total] (updated in place); lora_b: [S, d_out, r_max];
    h: [N, R] from `lora_shrink`; coeff, lo and hi come from the plan layer.
    """
    r_max = lora_b.shape[2]
    d_out = lora_b.shape[1]
    h_scaled = (h[:, h_offset:h_offset + r_max] * layer.rank_coeff).to(y.dtype)
    if layer.use_segments:
        delta = y.new_empty(layer.num_rows, d_out)
        for slot, start, end in layer.segments:
            delta[start:end] = h_scaled[start:end] @ lora_b[slot].T
    else:
        delta = torch.bmm(lora_b[layer.slot_idx], h_scaled.unsqueeze(2)).squeeze(2)
    y[:, y_offset:y_offset + d_out].index_add_(0, layer.token_idx, delta)
