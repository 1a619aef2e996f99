"""The adapter store: every registered adapter, paged between disk, CPU memory and GPU slots.

Tiers:
- disk: every registered adapter's PEFT folder (uploads live in `store_dir`);
- CPU: an LRU of parsed adapters (`max_cpu_loras`), in pinned memory on CUDA;
- GPU: the slot pool (`max_loras` slots). A slot whose adapter a running
  sequence uses is pinned and never evicted; eviction is LRU among the rest.

Fusions (LoraRetriever's averaged A and B of several experts) are derived
adapters: built once per (experts, weights), kept in CPU memory (they have no
files), at most `max_fused` of them, and dropped with any of their experts.

Two reference counts per adapter:
- `uses`: unfinished requests that name it (from add_request to finish). A
  deleted adapter disappears from the registry at once but its files and slot
  are freed only when its uses reach zero, so running requests finish.
- `pins`: running sequences that use it; they keep its GPU slot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loramux.adapters_store.fusion import fuse_adapters
from loramux.adapters_store.peft_format import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter,
                                                parse_peft_adapter)
from loramux.adapters_store.registry import (COMPOSITE_CONFIG_FILE, AdapterRecord, check_name,
                                             clean_partial_uploads, make_record, read_card, write_adapter_dir)
from loramux.adapters_store.slot_pool import LoraSlotPool

logger = logging.getLogger(__name__)


@dataclass
class StoreStats:
    """Counters the metrics export. Hits count look-ups served by a tier without going lower."""

    gpu_hits: int = 0
    cpu_hits: int = 0
    disk_loads: int = 0
    page_ins: int = 0
    gpu_evictions: int = 0
    cpu_evictions: int = 0
    uploads: int = 0
    deletions: int = 0
    page_in_seconds_total: float = 0.0


class AdapterStore:
    def __init__(self, pool: LoraSlotPool, target_shapes: dict[str, tuple[int, int]], num_layers: int,
                 max_cpu_loras: int, max_adapter_bytes: int, store_dir: Path | None, device: torch.device,
                 max_fused: int = 16):
        self.pool = pool
        self.target_shapes = target_shapes
        self.num_layers = num_layers
        self.max_cpu_loras = max_cpu_loras
        self.max_adapter_bytes = max_adapter_bytes
        self.store_dir = store_dir
        self.device = device
        self.records: dict[str, AdapterRecord] = {}
        self.stats = StoreStats()
        self.page_in_listeners: list[Callable[[float], None]] = []  # called with each page-in's seconds
        # Called with (name, record) when an adapter is registered or replaced, (name, None) when deleted;
        # not for fusions.
        self.change_listeners: list[Callable[[str, AdapterRecord | None], None]] = []
        self.max_fused = max_fused
        self._fused: OrderedDict[str, LoraAdapter] = OrderedDict()  # fusion name -> weights, LRU order
        self._derived: dict[str, LoraAdapter] = {}  # composite members built in memory (register_derived)
        self._cpu: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._gpu_lru: OrderedDict[str, None] = OrderedDict()
        self._uses: Counter[str] = Counter()
        self._pins: Counter[str] = Counter()
        self._deleted: dict[str, AdapterRecord] = {}  # waiting for their last use to end
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[torch.cuda.Event] = []
        if store_dir is not None:
            store_dir.mkdir(parents=True, exist_ok=True)
            for leftover in clean_partial_uploads(store_dir):
                logger.warning("removed an interrupted upload: %s", leftover)
            for folder in sorted(p for p in store_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                                 and not (p / COMPOSITE_CONFIG_FILE).is_file()):  # composites: CompositeRegistry
                self._register_existing(folder, uploaded=True)

    # ------------------------------------------------------------ registry
    def __contains__(self, name: str) -> bool:
        return name in self.records

    def get(self, name: str) -> AdapterRecord:
        if name not in self.records:
            raise AdapterError("not_found", f"adapter {name!r} does not exist")
        return self.records[name]

    def tier(self, name: str) -> str:
        self.get(name)
        return "gpu" if name in self.pool else "cpu" if name in self._cpu else "disk"

    def _validate(self, config_bytes: bytes, weights_bytes: bytes) -> LoraAdapter:
        if len(weights_bytes) > self.max_adapter_bytes:
            raise AdapterError("too_large", f"{WEIGHTS_FILE} is {len(weights_bytes)} bytes; the limit is "
                                            f"{self.max_adapter_bytes} (--max-adapter-bytes)")
        return parse_peft_adapter(config_bytes, weights_bytes, self.target_shapes, self.num_layers,
                                  self.pool.max_rank)

    def _check_new_name(self, name: str, replace: bool) -> None:
        check_name(name)
        if name in self._deleted:
            raise AdapterError("in_use", f"adapter {name!r} is being deleted; running requests still use it")
        if name in self.records:
            if not replace:
                raise AdapterError("already_exists", f"adapter {name!r} already exists (replacing needs replace=true)")
            if self._uses[name]:
                raise AdapterError("in_use", f"adapter {name!r} is in use by running requests; retry later")

    def _install(self, record: AdapterRecord, adapter: LoraAdapter) -> AdapterRecord:
        if record.name in self.records:  # a replacement: drop every cached copy of the old one
            self._drop_copies(record.name)
            self._drop_fusions_of(record.name)
        self.records[record.name] = record
        self._cpu_put(record.name, adapter)
        for listener in self.change_listeners:
            listener(record.name, record)
        return record

    def _register_existing(self, folder: Path, uploaded: bool) -> None:
        try:
            self.register_path(folder.name, folder, uploaded=uploaded)
        except AdapterError as exc:
            logger.error("skipping adapter folder %s: %s", folder, exc)

    def register_path(self, name: str, path: str | Path, metadata: dict | None = None, replace: bool = False,
                      uploaded: bool = False) -> AdapterRecord:
        """Register a PEFT folder in place (it is read again whenever the adapter pages in from disk)."""
        self._check_new_name(name, replace)
        folder = Path(path).expanduser()
        for filename in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / filename).is_file():
                raise AdapterError("not_found", f"{folder} has no {filename} (expected a PEFT LoRA folder)")
        config_bytes, weights_bytes = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        adapter = self._validate(config_bytes, weights_bytes)
        metadata = metadata if metadata is not None else read_card(folder)
        record = make_record(name, folder, adapter, weights_bytes, metadata, uploaded=uploaded)
        return self._install(record, adapter)

    def register_from_files(self, name: str, config_bytes: bytes, weights_bytes: bytes,
                            metadata: dict | None = None, replace: bool = False) -> AdapterRecord:
        """Validate uploaded bytes, then write them to the store directory atomically and register them."""
        if self.store_dir is None:
            raise AdapterError("no_store", "this server has no adapter store directory for uploads")
        self._check_new_name(name, replace)
        adapter = self._validate(config_bytes, weights_bytes)
        metadata = metadata or {}
        record = make_record(name, self.store_dir / name, adapter, weights_bytes, metadata, uploaded=True)
        write_adapter_dir(self.store_dir, name, config_bytes, weights_bytes, metadata, replace)
        self.stats.uploads += 1
        return self._install(record, adapter)

    def delete(self, name: str) -> None:
        """Unregister now; free slot and files once no request uses the adapter."""
        self.get(name)
        self.stats.deletions += 1
        self._unregister(name)

    def _unregister(self, name: str) -> None:
        record = self.records.pop(name)
        if self._uses[name]:
            self._deleted[name] = record
        else:
            self._finish_delete(record)
        self._drop_fusions_of(name)
        if not record.fused_from:  # fusions come and go without telling anyone: nobody was told of them
            for listener in self.change_listeners:
                listener(name, None)

    def _finish_delete(self, record: AdapterRecord) -> None:
        self._drop_copies(record.name)
        self._fused.pop(record.name, None)
        self._derived.pop(record.name, None)
        if record.uploaded:
            shutil.rmtree(record.path, ignore_errors=True)

    # ------------------------------------------------------------ fusions
    def fuse(self, names: list[str], weights: list[float]) -> str:
        """The name of the fusion of `names` with `weights`, built on first use and cached."""
        sources = [self.get(name) for name in names]
        signature = json.dumps([[r.name, r.checksum, round(float(w), 4)] for r, w in zip(sources, weights)])
        name = "fusion-" + hashlib.sha256(signature.encode()).hexdigest()[:16]
        if name in self.records:
            self._fused.move_to_end(name)
            return name
        fused = fuse_adapters([self._cpu_get(n) for n in names], [round(float(w), 4) for w in weights])
        self._fused[name] = self._to_cpu_tier(fused)
        self.records[name] = AdapterRecord(
            name=name, path="", base_model=fused.base_model, rank=fused.rank, alpha=fused.alpha,
            target_modules=list(fused.target_modules), size_bytes=fused.num_bytes, checksum=name,
            description="fusion of " + ", ".join(f"{n} ({w:.3f})" for n, w in zip(names, weights)),
            fused_from=list(names))
        live = [n for n in self._fused if n in self.records]
        idle = [n for n in live if n != name and not self._uses[n]]
        for victim in idle[:max(0, len(live) - self.max_fused)]:
            self._unregister(victim)
        return name

    # ------------------------------------------------------------ derived (composite experts)
    def register_derived(self, name: str, adapter: LoraAdapter, source: str) -> AdapterRecord:
        """Hold an adapter built in memory for the composite `source` (an expert or a task's rank prefix).

        It pages into slots like any adapter, is never evicted from the CPU tier,
        and goes when the composite deletes it.
        """
        self._check_new_name(name, replace=False)
        self._derived[name] = self._to_cpu_tier(adapter)
        record = AdapterRecord(name=name, path="", base_model=adapter.base_model, rank=adapter.rank,
                               alpha=adapter.alpha, target_modules=list(adapter.target_modules),
                               size_bytes=adapter.num_bytes, checksum=f"{source}:{name}:{time.time_ns()}",
                               description=f"member of composite {source}", fused_from=[source])
        self.records[name] = record
        return record

    def _drop_fusions_of(self, expert: str) -> None:
        for name in [n for n in self._fused if n in self.records and expert in self.records[n].fused_from]:
            self._unregister(name)

    def _drop_copies(self, name: str) -> None:
        self._cpu.pop(name, None)
        if name in self.pool:
            self.pool.unload(name)
            self._gpu_lru.pop(name, None)

    # ------------------------------------------------------------ uses and pins
    def acquire(self, names) -> None:
        """A request that names these adapters was accepted (they must exist)."""
        for name in names:
            self.get(name)
        self._uses.update(names)

    def release(self, names) -> None:
        """That request has finished or was aborted."""
        for name in names:
            self._uses[name] -= 1
            if not self._uses[name]:
                del self._uses[name]
                if name in self._deleted:
                    self._finish_delete(self._deleted.pop(name))

    def pin(self, names) -> None:
        """A sequence using these (resident) adapters starts running."""
        assert all(name in self.pool for name in names)
        self._pins.update(names)

    def unpin(self, names) -> None:
        for name in names:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def pinned(self, name: str) -> int:
        return self._pins[name]

    # ------------------------------------------------------------ paging
    def _to_cpu_tier(self, adapter: LoraAdapter) -> LoraAdapter:
        # Cast once to the slot dtype; on CUDA pin the pages so page-ins are asynchronous DMA copies.
        dtype, pin = self.pool.dtype, self.device.type == "cuda"
        adapter.weights = {k: tuple(t.to(dtype).pin_memory() if pin else t.to(dtype) for t in ab)
                           for k, ab in adapter.weights.items()}
        return adapter

    def _cpu_put(self, name: str, adapter: LoraAdapter) -> None:
        self._cpu[name] = self._to_cpu_tier(adapter)
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
            self.stats.cpu_evictions += 1

    def _cpu_get(self, name: str) -> LoraAdapter:
        if name in self._fused:
            return self._fused[name]
        if name in self._derived:
            return self._derived[name]
        if name in self._cpu:
            self._cpu.move_to_end(name)
            self.stats.cpu_hits += 1
            return self._cpu[name]
        record = self.records.get(name) or self._deleted[name]
        folder = Path(record.path)
        try:
            config_bytes, weights_bytes = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        except OSError as exc:
            raise AdapterError("not_found", f"adapter {name!r}: its files at {folder} cannot be read: {exc}") from exc
        adapter = self._validate(config_bytes, weights_bytes)
        self.stats.disk_loads += 1
        self._cpu_put(name, adapter)
        return adapter

    def _free_slot(self, keep: frozenset[str]) -> bool:
        if self.pool.free_slots:
            return True
        victim = next((n for n in self._gpu_lru if not self._pins[n] and n not in keep), None)
        if victim is None:
            return False
        self.pool.unload(victim)
        del self._gpu_lru[victim]
        self.stats.gpu_evictions += 1
        return True

    def ensure_resident(self, names: frozenset[str]) -> bool:
        """Page in every adapter of `names` that is not in a GPU slot; False when slots are all pinned.

        On CUDA the copies run on a side stream; `wait_for_page_ins` orders the next step after them.
        """
        for name in names:
            if name in self.pool:
                self._gpu_lru.move_to_end(name)
                self.stats.gpu_hits += 1
                continue
            if not self._free_slot(names):
                return False
            start = time.perf_counter()
            adapter = self._cpu_get(name)
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    self.pool.load(name, adapter)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                self._pending.append(event)
            else:
                self.pool.load(name, adapter)
            self._gpu_lru[name] = None
            seconds = time.perf_counter() - start
            self.stats.page_ins += 1
            self.stats.page_in_seconds_total += seconds
            for listener in self.page_in_listeners:
                listener(seconds)
        return True

    def wait_for_page_ins(self) -> None:
        """Make the compute stream wait for the copies started since the last step (no host sync)."""
        if self._pending:
            stream = torch.cuda.current_stream(self.device)
            for event in self._pending:
                stream.wait_event(event)
            self._pending.clear()
