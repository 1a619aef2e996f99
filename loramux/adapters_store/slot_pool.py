"""A fixed pool of adapter slots resident next to the model.

Every `LoraLinear` holds stacked slot tensors; this pool decides which adapter
lives in which slot and keeps the per-slot scale, rank and targeted
sub-projections the LoRA plan needs.
"""

from __future__ import annotations

import torch

from loramux.adapters_store.peft_format import AdapterError, LoraAdapter


class LoraSlotPool:
    def __init__(self, lora_linears, num_slots: int, max_rank: int, device: torch.device):
        """lora_linears: [(layer index, LoraLinear)] of the model."""
        self.lora_linears = list(lora_linears)
        self.num_slots = num_slots
        self.max_rank = max_rank
        for _, module in self.lora_linears:
            module.allocate_slots(num_slots, max_rank)
        self.scales = torch.zeros(num_slots, dtype=torch.float32)
        self.ranks = [0] * num_slots
        self.targets: list[frozenset[str]] = [frozenset()] * num_slots  # sub-projection names, e.g. q_proj
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.device = device
        self.dtype = self.lora_linears[0][1].slot_dtype  # adapters load in the slots' dtype

    def __contains__(self, name: str) -> bool:
        return name in self.slot_of

    def load(self, name: str, adapter: LoraAdapter) -> int:
        if name in self.slot_of:
            raise AdapterError("already_exists", f"adapter {name!r} is already loaded")
        if not self.free_slots:
            raise AdapterError("no_free_slot", f"all {self.num_slots} adapter slots are in use (--max-loras)")
        slot = self.free_slots.pop()
        try:
            for layer, module in self.lora_linears:
                module.reset_slot(slot)
                for sub in module.sub_names:
                    if (layer, sub) in adapter.weights:
                        a, b = adapter.weights[(layer, sub)]
                        module.set_slot(slot, sub, a, b)
            self.scales[slot] = adapter.scale
        except BaseException:  # a failed copy gives its slot back, zeroed
            self._clear(slot)
            raise
        self.ranks[slot] = adapter.rank
        self.targets[slot] = frozenset(module for _, module in adapter.weights)
        self.slot_of[name] = slot
        return slot

    def unload(self, name: str) -> None:
        self._clear(self.slot_of.pop(name))

    def _clear(self, slot: int) -> None:
        for _, module in self.lora_linears:
            module.reset_slot(slot)
        self.scales[slot] = 0.0
        self.ranks[slot] = 0
        self.targets[slot] = frozenset()
        self.free_slots.append(slot)
