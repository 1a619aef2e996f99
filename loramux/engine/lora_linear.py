"""A linear layer that adds the step's LoRA deltas to one or several fused projections."""

from __future__ import annotations

import torch
from torch import nn

from loramux.engine import dense_gemm
from loramux.kernels import LoraBackend, LoraPlan


class LoraLinear(nn.Module):
    """y = x @ W.T (+ b) + the LoRA deltas the plan assigns to each token.

    W may be prepacked for oneDNN (`dense_gemm.prepack`: bfloat16 on the CPU); it keeps its shape and dtype.

    `sub_names` / `sub_sizes` describe the projections fused into W along its
    output dimension (q, k, v or gate, up; one name for o_proj and down_proj).
    Slot tensors, allocated by `allocate_slots`:
      lora_a: [S, n_sub * r_max, d_in]  the sub-projections' A matrices stacked
              along the rank, so one shrink serves the whole fused projection
      lora_b: [S, d_out_total, r_max]   their B matrices stacked along the
              output, so one expand writes every sub-projection's columns
      slot_active: [S] int32            1 where the slot's adapter targets one of
              the sub-projections here: the kernels skip the other slots' rows
    An adapter that does not target a sub-projection leaves zeros there.
    Scaling-vector pools of the MoR experts, allocated by `allocate_scale_rows`
    (None on a server without them); plan rows read row `scale_idx`:
      rank_scale: [V + 1, n_sub * r_max]  λ_A of each sub-projection in its rank block
      out_scale:  [V + 1, d_out_total]    λ_B in each sub-projection's columns
    Rows are ones where a composite does not target a sub-projection (its shared
    A and B are zero there anyway), and the last row stays ones: scale_idx -1
    (no scaling) reads it.
    The slot tensors and pools share the weight's dtype, except on the CPU with
    the torch backend, where they are float32 (`slot_dtype`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 sub_names: tuple[str, ...], sub_sizes: tuple[int, ...], backend: LoraBackend):
        super().__init__()
        assert sum(sub_sizes) == weight.shape[0], (sub_names, sub_sizes, weight.shape)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sub_names = sub_names
        self.sub_sizes = sub_sizes
        self.sub_offsets = tuple(sum(sub_sizes[:i]) for i in range(len(sub_sizes)))
        self.backend = backend
        self.r_max = 0
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.slot_active: torch.Tensor | None = None
        self.rank_scale: torch.Tensor | None = None
        self.out_scale: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def slot_dtype(self) -> torch.dtype:
        """float32 on the CPU unless the backend says otherwise: there torch's bfloat16 batched GEMMs at LoRA's
        decode shapes (a few rows, rank 16) run slower than float32 ones (twice the slots' memory buys that
        speed). Prefill's long segment GEMMs cast each segment's slot tensors to the activations' dtype instead
        (`torch_ref.lora_shrink`). The C++ decode kernel (`kernels.cpu_bgmv`) reads bfloat16 slots at speed."""
        on_cpu = self.weight.device.type == "cpu"
        return torch.float32 if on_cpu and self.backend.float32_slots_on_cpu else self.weight.dtype

    def allocate_slots(self, num_slots: int, r_max: int) -> None:
        w = self.weight
        self.r_max = r_max
        to = dict(dtype=self.slot_dtype, device=w.device)
        self.lora_a = torch.zeros(num_slots, len(self.sub_names) * r_max, w.shape[1], **to)
        self.lora_b = torch.zeros(num_slots, w.shape[0], r_max, **to)
        self.slot_active = torch.zeros(num_slots, dtype=torch.int32, device=w.device)

    def allocate_scale_rows(self, num_rows: int) -> None:
        """`num_rows` rows of scaling vectors (and the ones row), after `allocate_slots`; 0: no pools."""
        if num_rows:
            to = dict(dtype=self.slot_dtype, device=self.weight.device)
            self.rank_scale = torch.ones(num_rows + 1, len(self.sub_names) * self.r_max, **to)
            self.out_scale = torch.ones(num_rows + 1, self.weight.shape[0], **to)

    def set_scales(self, row: int, sub_name: str, lambda_a: torch.Tensor, lambda_b: torch.Tensor) -> None:
        """Write one sub-projection's λ_A [r] and λ_B [d_out] into pool row `row` (ones beyond rank r)."""
        i = self.sub_names.index(sub_name)
        block = self.rank_scale[row, i * self.r_max:(i + 1) * self.r_max]
        block.fill_(1.0)
        block[:lambda_a.shape[0]].copy_(lambda_a)
        self.out_scale[row, self.sub_offsets[i]:self.sub_offsets[i] + self.sub_sizes[i]].copy_(lambda_b)

    def reset_scales(self, row: int) -> None:
        self.rank_scale[row].fill_(1.0)
        self.out_scale[row].fill_(1.0)

    def set_slot(self, slot: int, sub_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one sub-projection's A [r, d_in] and B [d_out, r] into `slot` (zero-padded to r_max)."""
        i = self.sub_names.index(sub_name)
        rank = a.shape[0]
        block = self.lora_a[slot, i * self.r_max:(i + 1) * self.r_max]
        block.zero_()
        block[:rank].copy_(a, non_blocking=True)
        rows = self.lora_b[slot, self.sub_offsets[i]:self.sub_offsets[i] + self.sub_sizes[i]]
        rows.zero_()
        rows[:, :rank].copy_(b, non_blocking=True)
        self.slot_active[slot] = 1

    def reset_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.slot_active[slot] = 0

    @property
    def shape(self) -> tuple[int, tuple[int, ...]]:
        """(d_in, sub-projection output sizes): what the LoRA kernels compile for (`LoraBackend.warm_up`)."""
        return self.in_features, self.sub_sizes

    def forward(self, x: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
        """x: [T, d_in] -> y: [T, d_out_total]."""
        y = dense_gemm.linear(x, self.weight, self.bias)
        if plan.targets is not None and plan.targets.isdisjoint(self.sub_names):
            return y  # no adapter of the step targets this projection: launch nothing
        for level in plan.levels:
            self.backend.apply(x, y, self.lora_a, self.lora_b, self.slot_active, level, self.sub_offsets,
                               self.rank_scale, self.out_scale)
        return y
