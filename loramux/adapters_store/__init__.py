"""The adapter store: validation, registry, and paging between disk, CPU memory and GPU slots."""

from loramux.adapters_store.peft_format import AdapterError, LoraAdapter, parse_peft_adapter
from loramux.adapters_store.registry import AdapterRecord
from loramux.adapters_store.slot_pool import LoraSlotPool
from loramux.adapters_store.store import AdapterStore, StoreStats

__all__ = ["AdapterError", "AdapterRecord", "AdapterStore", "LoraAdapter", "LoraSlotPool", "StoreStats",
           "parse_peft_adapter"]
