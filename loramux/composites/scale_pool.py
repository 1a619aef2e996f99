"""Rows of the LoRA linears' scaling-vector pools, taken by MoR composites.

A MoR composite is served from one slot holding its shared A and B; its
expert i differs only by λ_A,i [r] and λ_B,i [d_out] per module. Those live in
every `LoraLinear`'s `rank_scale` / `out_scale` pools, `num_rows` rows
allocated at start-up (fixed sizes: captured CUDA graphs read them in place).
A MoR composite with N experts takes N rows at registration and gives them
back once it is deleted and no request uses it, as it does its gate row; the
LoRA plan's rows of expert i carry its pool row (`scale_idx`).
"""

from __future__ import annotations

import torch

from loramux.adapters_store.peft_format import AdapterError


class ScaleRowPool:
    def __init__(self, lora_linears, num_rows: int):
        """lora_linears: [(layer index, LoraLinear)] of the model, slots already allocated."""
        self.lora_linears = list(lora_linears)
        self.num_rows = num_rows
        for _, module in self.lora_linears:
            module.allocate_scale_rows(num_rows)
        self._free = list(range(num_rows - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check_room(self, num_experts: int, returning: int = 0) -> None:
        """Refuse (AdapterError too_many_mor_experts) unless `num_experts` rows are free once `returning` rows
        (a replaced composite's) are back."""
        if num_experts > self.num_free + returning:
            raise AdapterError("too_many_mor_experts", f"this server holds at most {self.num_rows} MoR experts in "
                                                       f"all (--max-mor-experts); {self.num_free} are free and the "
                                                       f"composite has {num_experts}")

    def take(self, scales: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], num_experts: int) -> list[int]:
        """Write each expert's vectors into a free row: scales maps (layer, module) to (λ_A [N, r],
        λ_B [N, d_out]); modules it lacks keep ones. Returns the rows, in expert order."""
        self.check_room(num_experts)
        rows = [self._free.pop() for _ in range(num_experts)]
        try:
            for layer, module in self.lora_linears:
                for i, row in enumerate(rows):
                    module.reset_scales(row)
                    for sub in module.sub_names:
                        if (layer, sub) in scales:
                            lambda_a, lambda_b = scales[(layer, sub)]
                            module.set_scales(row, sub, lambda_a[i], lambda_b[i])
        except BaseException:  # a failed copy gives the rows back
            self.give_back(rows)
            raise
        return rows

    def give_back(self, rows: list[int]) -> None:
        self._free.extend(reversed(rows))
