"""The adapter store: registration, files, fusions and page-ins over the adapter lifecycle.

Every adapter's state (its tier: disk, CPU, GPU slot; its phase: live,
deleting; its uses and pins) is one entry of `AdapterLifecycle`
(lifecycle.py), the state machine. This module does what touches files and
weights around those transitions:

- Registration is split in two so the slow part never runs on the engine
  thread: `prepare_upload` / `prepare_path` (worker thread: read, parse,
  validate, sha256, cast and pin the weights, write and fsync a staged
  folder) and `install` (engine thread: name checks, the crash-safe renames,
  one lifecycle transition, listeners).
- Deleting an uploaded adapter renames its folder out of sight at once (so
  an acknowledged delete survives a crash); the files go when its last use ends.
- Fusions (LoraRetriever's averaged A and B of several experts) are derived
  adapters: built once per (experts, weights), kept in CPU memory (they have
  no files), at most `max_fused` of them, and dropped with any of their experts.
- A composite expert's members built in memory (MoR experts, MoRE rank
  prefixes; `register_derived`) are in-memory entries too: they page into
  slots like any adapter and go only when their composite deletes them
  (`delete_derived`); `delete` refuses them.
- `ensure_resident` pages adapters into GPU slots; a page-in that fails
  raises `AdapterError("page_in_failed")` for the scheduler to fail only the
  requests of that adapter, and its slot stays free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loramux.adapters_store.fusion import fuse_adapters
from loramux.adapters_store.lifecycle import AdapterEntry, AdapterLifecycle, Phase, Tier
from loramux.adapters_store.peft_format import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter,
                                                parse_peft_adapter)
from loramux.adapters_store.registry import (COMPOSITE_CONFIG_FILE, AdapterRecord, check_name, commit_adapter_dir,
                                             content_checksum, make_record, read_card, recover_store_dir,
                                             stage_adapter_dir,
                                             trash_adapter_dir)
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
    page_in_failures: int = 0
    page_in_seconds_total: float = 0.0


@dataclass
class PreparedAdapter:
    """A validated adapter ready to install: the record, its CPU-tier weights, and a staged folder for uploads."""

    record: AdapterRecord
    weights: LoraAdapter
    replace: bool
    staged: Path | None = None  # uploads: the fsynced `.tmp-*` folder that `install` renames into place

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


class AdapterStore:
    def __init__(self, pool: LoraSlotPool, target_shapes: dict[str, tuple[int, int]], num_layers: int,
                 max_cpu_loras: int, max_adapter_bytes: int, store_dir: Path | None, device: torch.device,
                 max_fused: int = 16, reserved_names: frozenset[str] = frozenset()):
        self.pool = pool
        self.target_shapes = target_shapes
        self.num_layers = num_layers
        self.max_adapter_bytes = max_adapter_bytes
        self.store_dir = store_dir
        self.device = device
        self.reserved_names = reserved_names
        self.stats = StoreStats()
        self.lifecycle = AdapterLifecycle(pool, max_cpu_loras, self.stats)
        self.page_in_listeners: list[Callable[[float], None]] = []  # called with each page-in's seconds
        # Called with (name, record) when an adapter is registered or replaced, (name, None) when deleted;
        # not for fusions. Called on the engine thread: listeners must be quick (the router queues its work).
        self.change_listeners: list[Callable[[str, AdapterRecord | None], None]] = []
        self.max_fused = max_fused
        # Names an adapter may not take because something else holds them (the composite registry sets it).
        self.name_taken_elsewhere: Callable[[str], str | None] = lambda name: None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[torch.cuda.Event] = []
        if store_dir is not None:
            store_dir.mkdir(parents=True, exist_ok=True)
            for line in recover_store_dir(store_dir):
                logger.warning("adapter store recovery: %s", line)
            for folder in sorted(p for p in store_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                                 and not (p / COMPOSITE_CONFIG_FILE).is_file()):  # composites: CompositeRegistry
                try:
                    self.install(self.prepare_path(folder.name, folder, uploaded=True))
                except AdapterError as exc:
                    logger.error("skipping adapter folder %s: %s", folder, exc)

    # ------------------------------------------------------------ registry
    @property
    def records(self) -> dict[str, AdapterRecord]:
        """The live adapters (fusions included), by name."""
        return {e.name: e.record for e in self.lifecycle.live_entries()}

    @property
    def num_in_cpu(self) -> int:
        return sum(e.tier >= Tier.CPU for e in self.lifecycle.entries.values())

    def __contains__(self, name: str) -> bool:
        return self.lifecycle.live(name) is not None

    def get(self, name: str) -> AdapterRecord:
        entry = self.lifecycle.live(name)
        if entry is None:
            raise AdapterError("not_found", f"adapter {name!r} does not exist")
        return entry.record

    def tier(self, name: str) -> str:
        self.get(name)
        return {Tier.SLOT: "gpu", Tier.CPU: "cpu", Tier.DISK: "disk"}[self.lifecycle[name].tier]

    def pinned(self, name: str) -> int:
        """Running sequences that use the adapter."""
        self.get(name)
        return self.lifecycle[name].pins

    def is_uploaded(self, name: str) -> bool:
        entry = self.lifecycle.live(name)
        return entry is not None and entry.record.uploaded

    def validate(self, config_bytes: bytes, weights_bytes: bytes) -> LoraAdapter:
        """Parse and check PEFT files against this base, the limits and the serving dtype (AdapterError if not)."""
        if len(weights_bytes) > self.max_adapter_bytes:
            raise AdapterError("too_large", f"{WEIGHTS_FILE} is {len(weights_bytes)} bytes; the limit is "
                                            f"{self.max_adapter_bytes} (--max-adapter-bytes)")
        return parse_peft_adapter(config_bytes, weights_bytes, self.target_shapes, self.num_layers,
                                  self.pool.max_rank, self.pool.dtype)

    def _to_cpu_tier(self, adapter: LoraAdapter) -> LoraAdapter:
        # Cast once to the slot dtype; on CUDA pin the pages so page-ins are asynchronous DMA copies.
        dtype, pin = self.pool.dtype, self.device.type == "cuda"
        adapter.weights = {k: tuple(t.to(dtype).pin_memory() if pin else t.to(dtype) for t in ab)
                           for k, ab in adapter.weights.items()}
        return adapter

    def check_new_name(self, name: str, replace: bool) -> None:
        """Cheap checks against the current registry (they run again in `install`, which decides)."""
        check_name(name, self.reserved_names)
        holder = self.name_taken_elsewhere(name)
        if holder is not None:
            raise AdapterError("already_exists", f"{name!r} is already the name of {holder}")
        entry = self.lifecycle.entries.get(name)
        if entry is not None and entry.phase is Phase.DELETING:
            raise AdapterError("in_use", f"adapter {name!r} is being deleted; running requests still use it")
        if entry is not None and not replace:
            raise AdapterError("already_exists", f"adapter {name!r} already exists (replacing needs replace=true)")

    # ------------------------------------------- preparing (any thread) and installing (engine thread)
    def prepare_path(self, name: str, path: str | Path, metadata: dict | None = None, replace: bool = False,
                     uploaded: bool = False) -> PreparedAdapter:
        """Read and validate a PEFT folder registered in place (it is read again when the adapter pages in)."""
        check_name(name, self.reserved_names)
        folder = Path(path).expanduser()
        for filename in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / filename).is_file():
                raise AdapterError("not_found", f"{folder} has no {filename} (expected a PEFT LoRA folder)")
        config_bytes, weights_bytes = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        adapter = self.validate(config_bytes, weights_bytes)
        metadata = metadata if metadata is not None else read_card(folder)
        record = make_record(name, folder, adapter, config_bytes, weights_bytes, metadata, uploaded=uploaded)
        return PreparedAdapter(record, self._to_cpu_tier(adapter), replace)

    def prepare_upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, metadata: dict | None = None,
                       replace: bool = False) -> PreparedAdapter:
        """Validate uploaded bytes and stage them (fsynced) in the store directory; `install` publishes them."""
        if self.store_dir is None:
            raise AdapterError("no_store", "this server has no adapter store directory for uploads")
        check_name(name, self.reserved_names)
        adapter = self.validate(config_bytes, weights_bytes)
        metadata = metadata or {}
        record = make_record(name, self.store_dir / name, adapter, config_bytes, weights_bytes, metadata,
                             uploaded=True)
        weights = self._to_cpu_tier(adapter)
        staged = stage_adapter_dir(self.store_dir, name, config_bytes, weights_bytes, metadata)
        return PreparedAdapter(record, weights, replace, staged)

    def install(self, prepared: PreparedAdapter) -> AdapterRecord:
        """Publish a prepared adapter (engine thread): checks, renames, one lifecycle transition.

        On any refusal the staged folder is removed and nothing changes.
        """
        record = prepared.record
        try:
            self.check_new_name(record.name, prepared.replace)
            old = self.lifecycle.entries.get(record.name)
            if old is not None and old.uses:
                raise AdapterError("in_use", f"adapter {record.name!r} is in use by running requests; retry later")
            if prepared.staged is not None:
                commit_adapter_dir(self.store_dir, record.name, prepared.staged)
                self.stats.uploads += 1
            elif old is not None and old.record.uploaded:  # a folder registered over an upload: the upload goes
                shutil.rmtree(trash_adapter_dir(self.store_dir, Path(old.record.path)).parent, ignore_errors=True)
        except BaseException:
            prepared.discard()
            raise
        if old is not None:
            self._drop_fusions_of(record.name)
        self.lifecycle.register(record, prepared.weights)
        for listener in self.change_listeners:
            listener(record.name, record)
        return record

    def register_path(self, name: str, path: str | Path, metadata: dict | None = None, replace: bool = False,
                      uploaded: bool = False) -> AdapterRecord:
        """prepare_path then install, in one call (start-up and tests)."""
        self.check_new_name(name, replace)
        return self.install(self.prepare_path(name, path, metadata, replace, uploaded))

    def register_from_files(self, name: str, config_bytes: bytes, weights_bytes: bytes,
                            metadata: dict | None = None, replace: bool = False) -> AdapterRecord:
        """prepare_upload then install, in one call (tests and scripts)."""
        self.check_new_name(name, replace)
        return self.install(self.prepare_upload(name, config_bytes, weights_bytes, metadata, replace))

    # ------------------------------------------------------------ deleting
    def delete(self, name: str) -> None:
        """Unregister now (an upload's folder is renamed away at once); slot and files go after the last use."""
        entry = self.lifecycle.live(name)
        if entry is None or entry.is_fusion:
            raise AdapterError("not_found", f"adapter {name!r} does not exist")
        if entry.record.member_of is not None:
            raise AdapterError("in_use", f"adapter {name!r} belongs to composite {entry.record.member_of!r}; "
                                         "delete the composite")
        if entry.record.uploaded:
            entry.record.path = str(trash_adapter_dir(self.store_dir, Path(entry.record.path)))
        self.stats.deletions += 1
        self._unregister(name)
        for listener in self.change_listeners:
            listener(name, None)

    def _unregister(self, name: str) -> None:
        self._drop_fusions_of(name)
        gone = self.lifecycle.delete(name)
        if gone is not None:
            self._remove_files(gone)

    def _remove_files(self, entry: AdapterEntry) -> None:
        if entry.record.uploaded:  # already in its `.del-*` folder
            shutil.rmtree(Path(entry.record.path).parent, ignore_errors=True)

    # ------------------------------------------------------------ fusions
    def fuse(self, names: list[str], weights: list[float]) -> str:
        """The name of the fusion of `names` with `weights`, built on first use and cached."""
        sources = [self.get(name) for name in names]
        signature = json.dumps([[r.name, r.checksum, round(float(w), 4)] for r, w in zip(sources, weights)])
        name = "fusion-" + hashlib.sha256(signature.encode()).hexdigest()[:16]
        existing = self.lifecycle.entries.get(name)
        if existing is not None:
            if existing.phase is Phase.DELETING:
                self.lifecycle.revive(name)
            existing.touch()
            return name
        fused = fuse_adapters([self._cpu_weights(self.lifecycle[n]) for n in names],
                              [round(float(w), 4) for w in weights])
        record = AdapterRecord(
            name=name, path="", base_model=fused.base_model, rank=fused.rank, alpha=fused.alpha,
            target_modules=list(fused.target_modules), size_bytes=fused.num_bytes, checksum=name,
            description="fusion of " + ", ".join(f"{n} ({w:.3f})" for n, w in zip(names, weights)),
            fused_from=list(names))
        self.lifecycle.register(record, self._to_cpu_tier(fused))
        live = sorted((e for e in self.lifecycle.live_entries() if e.is_fusion), key=lambda e: e.last_used)
        idle = [e.name for e in live if e.name != name and not e.uses]
        for victim in idle[:max(0, len(live) - self.max_fused)]:
            self._unregister(victim)
        return name

    # ------------------------------------------------------------ composite experts' members
    def register_derived(self, name: str, adapter: LoraAdapter, composite: str) -> AdapterRecord:
        """Hold an adapter built in memory for `composite` (an MoR expert, an MoRE task's rank prefix, a
        MoLE member shipped inside it). Its checksum is a digest of its weights, so the prefix cache keys
        its K/V by content, as for any adapter."""
        self.check_new_name(name, replace=False)
        weights = self._to_cpu_tier(adapter)
        digest = hashlib.sha256(f"{weights.rank}:{weights.scale}".encode())
        for module in sorted(weights.weights):
            for t in weights.weights[module]:
                digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        record = AdapterRecord(name=name, path="", base_model=adapter.base_model, rank=adapter.rank,
                               alpha=adapter.alpha, target_modules=list(adapter.target_modules),
                               size_bytes=adapter.num_bytes, checksum=digest.hexdigest(),
                               description=f"member of composite {composite}", member_of=composite)
        self.lifecycle.register(record, weights)
        return record

    def delete_derived(self, name: str) -> None:
        """The composite that built `name` is going: unregister it (after its last use, like any adapter)."""
        entry = self.lifecycle.live(name)
        assert entry is not None and entry.record.member_of is not None, name
        self._unregister(name)

    def _drop_fusions_of(self, expert: str) -> None:
        for entry in self.lifecycle.live_entries():
            if expert in entry.record.fused_from:
                self._unregister(entry.name)

    # ------------------------------------------------------------ uses and pins
    def acquire(self, names) -> None:
        """A request that names these adapters was accepted (they must exist)."""
        for name in names:
            self.get(name)
        for name in names:
            self.lifecycle.acquire(name)

    def release(self, names) -> None:
        """That request has finished or was aborted."""
        for name in names:
            gone = self.lifecycle.release(name)
            if gone is not None:
                self._remove_files(gone)

    def pin(self, names) -> None:
        """A sequence using these (resident) adapters starts running."""
        for name in names:
            self.lifecycle.pin(name)

    def unpin(self, names) -> None:
        for name in names:
            self.lifecycle.unpin(name)

    # ------------------------------------------------------------ paging
    def _cpu_weights(self, entry: AdapterEntry) -> LoraAdapter:
        """The adapter's CPU copy, read from its files first if it is only on disk."""
        if entry.tier >= Tier.CPU:
            entry.touch()
            self.stats.cpu_hits += 1
            return entry.weights
        folder = Path(entry.record.path)
        try:
            config_bytes, weights_bytes = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        except OSError as exc:
            raise AdapterError("page_in_failed", f"adapter {entry.name!r}: its files at {folder} cannot be read "
                                                 f"({exc.strerror or exc})") from exc
        if content_checksum(config_bytes, weights_bytes) != entry.record.checksum:
            raise AdapterError("page_in_failed", f"adapter {entry.name!r}: its files in {folder} changed on disk "
                                                 "after it was registered; register it again")
        try:
            adapter = self.validate(config_bytes, weights_bytes)
        except AdapterError as exc:
            raise AdapterError("page_in_failed", f"adapter {entry.name!r} no longer validates: {exc}") from exc
        self.stats.disk_loads += 1
        self.lifecycle.hold_in_cpu(entry, self._to_cpu_tier(adapter))
        return entry.weights

    def ensure_resident(self, names: frozenset[str]) -> bool:
        """Page in every adapter of `names` that is not in a GPU slot; False when slots are all pinned.

        Raises AdapterError("page_in_failed") naming the adapter whose page-in
        failed; no slot is lost. On CUDA the slot writes (eviction's zeroing
        and the copy) run on a side stream that first waits for the compute
        stream, so a slot is never rewritten while a step still reads it;
        `wait_for_page_ins` orders the next step after them.
        """
        for name in sorted(names):
            entry = self.lifecycle[name]
            if entry.tier is Tier.SLOT:
                entry.touch()
                self.stats.gpu_hits += 1
                continue
            if not self.pool.free_slots:
                victim = self.lifecycle.slot_victim(keep=names)
                if victim is None:
                    return False
                with self._on_side_stream():
                    self.lifecycle.evict_slot(victim)
                self.stats.gpu_evictions += 1
            start = time.perf_counter()
            try:
                self._cpu_weights(entry)
                with self._on_side_stream():
                    self.lifecycle.load_slot(entry)
            except Exception as exc:
                self.stats.page_in_failures += 1
                logger.error("page-in of adapter %s failed: %s", name, exc)
                if isinstance(exc, AdapterError) and exc.code == "page_in_failed":
                    raise
                raise AdapterError("page_in_failed", f"adapter {name!r} could not be loaded into a slot: {exc}") \
                    from exc
            seconds = time.perf_counter() - start
            self.stats.page_ins += 1
            self.stats.page_in_seconds_total += seconds
            for listener in self.page_in_listeners:
                listener(seconds)
        return True

    @contextmanager
    def _on_side_stream(self):
        """Slot writes on the side stream, after the compute stream's queued work; the next step waits for them."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending.append(event)

    def wait_for_page_ins(self) -> None:
        """Make the compute stream wait for the copies started since the last step (no host sync)."""
        if self._pending:
            stream = torch.cuda.current_stream(self.device)
            for event in self._pending:
                stream.wait_event(event)
            self._pending.clear()

