"""The CPU backend for bfloat16 models: a C++ BGMV kernel (AVX512-BF16) for every level it can take.

At decode, LoRA on the CPU is bound by reading each row's slot tensors; torch's
bfloat16 batched GEMMs at those shapes (1-2 rows per slot, rank 16) run slower
than float32 ones, so the torch backend keeps the slots in float32 and reads
twice the bytes. `cpu_bgmv.cpp` streams bfloat16 slots once with float32 sums,
so with it the slots stay in the model's dtype (`LoraBackend.float32_slots_on_cpu`).
Prefill levels take the kernel too, a long prompt alone included: its runs of 16
tokens or more multiply their A rows transposed as pairs, which beat torch's
segment GEMMs at every length measured (one segment of 256-4,096 tokens at
SmolLM2's projections, two threads: 6.6 vs 15.3 ms ... 86 vs 100 ms for 8 layers).
Levels the kernel cannot take (another dtype, a slot rank it is not compiled
for) run torch's ops.

The kernel is built on first use (`cpu_extension`); where it cannot be, the torch ops serve with float32 slots.
"""

from __future__ import annotations

import torch

from loramux.kernels import CPU_KERNEL_RANKS, TORCH_BACKEND, torch_ref
from loramux.kernels.plan import LoraPlanLevel


def kernel_takes(activations: torch.Tensor, slots: torch.Tensor, r_max: int) -> bool:
    """The kernel takes the ops: bfloat16 activations and slot tensors on the CPU and a compiled r_max. The
    shrink and the expand decide alike (h is the kernel's own layout)."""
    return (activations.device.type == "cpu" and activations.dtype == slots.dtype == torch.bfloat16
            and r_max in CPU_KERNEL_RANKS)


def _scaling(pool: torch.Tensor | None, level: LoraPlanLevel) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (pool, scale_idx) the kernel reads for a level with scaled rows (MoR experts), else (None, None)."""
    return (pool, level.scale_idx) if pool is not None and level.scale_idx is not None else (None, None)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_active: torch.Tensor, level: LoraPlanLevel,
                num_subs: int = 1, rank_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`torch_ref.lora_shrink`'s semantics; on a kernel level h is [N, num_subs * r_max], one row per plan row."""
    if not kernel_takes(x, lora_a, lora_a.shape[1] // num_subs):
        return torch_ref.lora_shrink(x, lora_a, slot_active, level, num_subs, rank_scale)
    return torch.ops.loramux_cpu_bgmv.shrink(x.contiguous(), lora_a, slot_active, level.slot_idx, level.token_idx,
                                             level.coeff, level.rank_lo, level.rank_hi, num_subs,
                                             *_scaling(rank_scale, level))


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,), out_scale: torch.Tensor | None = None
                ) -> None:
    """`torch_ref.lora_expand`'s semantics, on h from this module's `lora_shrink` on the same level."""
    if not kernel_takes(y, lora_b, lora_b.shape[2]):
        torch_ref.lora_expand(y, lora_b, h, slot_active, level, sub_starts, out_scale)
        return
    torch.ops.loramux_cpu_bgmv.expand(y, lora_b, h, slot_active, level.slot_idx, level.token_idx, list(sub_starts),
                                      *_scaling(out_scale, level))


def lora_apply(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               slot_active: torch.Tensor, level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,),
               rank_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> None:
    """`lora_shrink` then `lora_expand` on one level (`LoraBackend.apply`): y [T, d_out_total] += the deltas of
    x [T, d_in] through lora_a [S, num_subs * r_max, d_in] and lora_b [S, d_out_total, r_max]; a kernel level
    is one call (one decision, one dispatch)."""
    if not kernel_takes(x, lora_a, lora_a.shape[1] // len(sub_starts)):
        TORCH_BACKEND.apply(x, y, lora_a, lora_b, slot_active, level, sub_starts, rank_scale, out_scale)
        return
    # each op skips the scaling where its pool or the level's scale_idx is None, as `_scaling` says
    torch.ops.loramux_cpu_bgmv.apply(x.contiguous(), y, lora_a, lora_b, slot_active, level.slot_idx,
                                     level.token_idx, level.coeff, level.rank_lo, level.rank_hi, list(sub_starts),
                                     rank_scale, out_scale, level.scale_idx)
