"""LoRA kernels: `lora_shrink` / `lora_expand` behind one backend chosen at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from loramux.kernels import torch_ref
from loramux.kernels.plan import LoraPlan, LoraPlanLevel, build_lora_plan

CPU_KERNEL_RANKS = tuple(2 ** i for i in range(1, 8))  # the slot ranks (r_max) cpu_bgmv's expand is compiled for


@dataclass(frozen=True)
class LoraBackend:
    """The LoRA ops of one backend (signatures and semantics in `torch_ref`):

    shrink(x, lora_a, slot_active, level, num_subs, rank_scale) -> h
    expand(y, lora_b, h, slot_active, level, sub_starts, out_scale)
        h is the backend's own intermediate: only its expand, on the same level, reads it.
        rank_scale / out_scale: the linear's scaling-vector pools (None: none), read at the
        plan rows' `scale_idx` (MoR experts).
    warm_up(shapes, r_max, dtype, device): compile every variant the server can
        launch; shapes are (d_in, sub-projection output sizes) per LoRA linear.
    takes_flat_plans: the expand sums rows that share a token, so a step's plan
        may be flat (one level for any mixture depth, see `build_lora_plan`).
    reads_mode_tensors: the ops read the plan's per-mode masks and packed layout
        (`build_lora_plan(mode_tensors=...)`), not only the per-row tensors.
    float32_slots_on_cpu: the slot tensors of a CPU model are float32 whatever its
        dtype (torch's decode GEMMs, see `LoraLinear.slot_dtype`); False: the model's dtype.
    fused: shrink then expand of one level in one call (`apply`'s signature), where the
        backend has one; None: `apply` calls the two.
    """

    name: str
    shrink: Callable[..., torch.Tensor]
    expand: Callable[..., None]
    warm_up: Callable[..., None]
    takes_flat_plans: bool = False
    reads_mode_tensors: bool = False
    float32_slots_on_cpu: bool = True
    fused: Callable[..., None] | None = None

    def apply(self, x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              slot_active: torch.Tensor, level: LoraPlanLevel, sub_starts: tuple[int, ...],
              rank_scale: torch.Tensor | None, out_scale: torch.Tensor | None) -> None:
        """y [T, d_out_total] += the level's LoRA deltas of x [T, d_in] (one fused linear's slot tensors)."""
        if self.fused is not None:
            self.fused(x, y, lora_a, lora_b, slot_active, level, sub_starts, rank_scale, out_scale)
            return
        h = self.shrink(x, lora_a, slot_active, level, len(sub_starts), rank_scale)
        self.expand(y, lora_b, h, slot_active, level, sub_starts, out_scale)


TORCH_BACKEND = LoraBackend("torch", torch_ref.lora_shrink, torch_ref.lora_expand, torch_ref.warm_up,
                            takes_flat_plans=True, reads_mode_tensors=True)


def select_lora_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.float32,
                        r_max: int = 16) -> LoraBackend:
    """Pick the backend once: Triton on CUDA (when installed); on the CPU, for a bfloat16 model whose slot rank
    r_max the kernel is compiled for, torch's ops with the C++ decode kernel where it builds (`cpu_bgmv`);
    torch otherwise."""
    if requested == "auto" and r_max in CPU_KERNEL_RANKS:
        from loramux.kernels import cpu_bgmv, cpu_extension

        if cpu_extension.serves(device, dtype):  # builds the kernels on a machine's first use
            return LoraBackend("torch+cpu-bgmv", cpu_bgmv.lora_shrink, cpu_bgmv.lora_expand, torch_ref.warm_up,
                               takes_flat_plans=True, reads_mode_tensors=True, float32_slots_on_cpu=False,
                               fused=cpu_bgmv.lora_apply)
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    try:
        from loramux.kernels import triton_lora
    except ImportError as exc:
        if requested == "triton":
            raise ValueError(f"--lora-backend triton needs the triton package: {exc}") from exc
        return TORCH_BACKEND
    return LoraBackend("triton", triton_lora.lora_shrink, triton_lora.lora_expand, triton_lora.warm_up)


__all__ = ["LoraBackend", "LoraPlan", "LoraPlanLevel", "TORCH_BACKEND",
           "build_lora_plan", "select_lora_backend"]
