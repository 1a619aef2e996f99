"""Adapter validation and the slots that hold adapters next to the model."""

from loramux.adapters_store.peft_format import AdapterError, LoraAdapter, parse_peft_adapter, read_peft_folder
from loramux.adapters_store.slot_pool import LoraSlotPool

__all__ = ["AdapterError", "LoraAdapter", "LoraSlotPool", "parse_peft_adapter", "read_peft_folder"]
