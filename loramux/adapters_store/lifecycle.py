"""The adapter lifecycle as one state machine: where each adapter's weights are and whether it is alive.

Every adapter the store knows is one `AdapterEntry` in `AdapterLifecycle.entries`,
and every change of its state is one method here:

    tier   DISK ──hold_in_cpu──> CPU ──load_slot──> SLOT        (weights: files → CPU copy → GPU slot)
           DISK <──(CPU bound)── CPU <──evict_slot── SLOT
    phase  LIVE ──delete──> DELETING ──last release──> GONE     (requests still use it: they finish first)
           LIVE ──delete (unused) / replace (unused)──> GONE

"In use" is `uses` > 0 (requests that name it were accepted), "pinned" is
`pins` > 0 (running sequences read its slot). An adapter in a slot keeps its
CPU copy, so evicting a slot never reads the disk again; the CPU bound
(`max_cpu`) counts the adapters whose highest tier is CPU. Fusions and
composite experts' members are built in memory and have no files: they never
drop to DISK and the CPU bound does not count them.

Invariants (`check` asserts them; the tests call it after every operation):
- pins <= uses; pins > 0 implies tier SLOT.
- tier SLOT if and only if the slot pool holds the adapter; tier >= CPU if and only if it has weights.
- a DELETING entry is in use; a GONE entry is no longer in `entries`.
- at most `max_cpu` entries (in-memory ones aside) sit at tier CPU.

The methods that can make an entry GONE return it, so the caller (the store)
removes its files: nothing here touches the disk, nothing here recurses.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from loramux.adapters_store.peft_format import AdapterError, LoraAdapter
from loramux.adapters_store.registry import AdapterRecord
from loramux.adapters_store.slot_pool import LoraSlotPool


class Tier(enum.IntEnum):
    DISK = 0
    CPU = 1
    SLOT = 2


class Phase(enum.Enum):
    LIVE = "live"
    DELETING = "deleting"
    GONE = "gone"


_ticks = itertools.count(1)


@dataclass(eq=False)
class AdapterEntry:
    record: AdapterRecord
    weights: LoraAdapter | None = None  # the CPU copy (slot dtype; pinned on CUDA)
    tier: Tier = Tier.DISK
    phase: Phase = Phase.LIVE
    uses: int = 0
    pins: int = 0
    last_used: int = field(default_factory=lambda: next(_ticks))  # LRU order for both tiers

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def is_fusion(self) -> bool:
        return bool(self.record.fused_from)

    @property
    def in_memory(self) -> bool:
        """A fusion or a composite's member: its weights exist only in memory."""
        return self.record.in_memory

    def touch(self) -> None:
        self.last_used = next(_ticks)


class AdapterLifecycle:
    def __init__(self, pool: LoraSlotPool, max_cpu: int, stats):
        """stats: the store's StoreStats (cpu_evictions is counted here)."""
        self.pool = pool
        self.max_cpu = max_cpu
        self.stats = stats
        self.entries: dict[str, AdapterEntry] = {}

    # ------------------------------------------------------------ lookups
    def live(self, name: str) -> AdapterEntry | None:
        entry = self.entries.get(name)
        return entry if entry is not None and entry.phase is Phase.LIVE else None

    def live_entries(self) -> list[AdapterEntry]:
        return [e for e in self.entries.values() if e.phase is Phase.LIVE]

    def __getitem__(self, name: str) -> AdapterEntry:
        """Any entry that is not GONE (requests may still hold a DELETING one)."""
        return self.entries[name]

    # ------------------------------------------------------------ phase
    def register(self, record: AdapterRecord, weights: LoraAdapter) -> AdapterEntry | None:
        """A new adapter (or a new version of an unused one) enters LIVE at tier CPU.

        Returns the replaced entry, now GONE, or None. A name held by a request or being deleted is refused.
        """
        old = self.entries.get(record.name)
        if old is not None and old.uses:
            raise AdapterError("in_use", f"adapter {record.name!r} is in use by running requests; retry later")
        if old is not None:
            self._gone(old)
        entry = AdapterEntry(record)
        self.entries[record.name] = entry
        self.hold_in_cpu(entry, weights)
        return old

    def revive(self, name: str) -> AdapterEntry:
        """DELETING → LIVE for a fusion asked for again while requests still held it (same content, same name)."""
        entry = self.entries[name]
        assert entry.is_fusion and entry.phase is Phase.DELETING
        entry.phase = Phase.LIVE
        return entry

    def delete(self, name: str) -> AdapterEntry | None:
        """LIVE → DELETING while requests use it, else → GONE (returned)."""
        entry = self.entries[name]
        assert entry.phase is Phase.LIVE
        if entry.uses:
            entry.phase = Phase.DELETING
            return None
        self._gone(entry)
        return entry

    def _gone(self, entry: AdapterEntry) -> None:
        if entry.tier is Tier.SLOT:
            self.pool.unload(entry.name)
        entry.weights, entry.tier, entry.phase = None, Tier.DISK, Phase.GONE
        del self.entries[entry.name]

    # ------------------------------------------------------------ uses and pins
    def acquire(self, name: str) -> None:
        entry = self.live(name)
        if entry is None:
            raise AdapterError("not_found", f"adapter {name!r} does not exist")
        entry.uses += 1

    def release(self, name: str) -> AdapterEntry | None:
        """One request let go; returns the entry if that was the last use of a DELETING adapter (now GONE)."""
        entry = self.entries[name]
        assert entry.uses > entry.pins, f"release of {name!r} without a matching acquire"
        entry.uses -= 1
        if entry.uses == 0 and entry.phase is Phase.DELETING:
            self._gone(entry)
            return entry
        return None

    def pin(self, name: str) -> None:
        entry = self.entries[name]
        assert entry.tier is Tier.SLOT and entry.pins < entry.uses, f"pin of {name!r} out of order"
        entry.pins += 1

    def unpin(self, name: str) -> None:
        entry = self.entries[name]
        assert entry.pins > 0, f"unpin of {name!r} without a pin"
        entry.pins -= 1

    # ------------------------------------------------------------ tiers
    def hold_in_cpu(self, entry: AdapterEntry, weights: LoraAdapter) -> None:
        """DISK → CPU; the least recently used CPU-tier adapters beyond the bound drop to DISK."""
        assert entry.tier is Tier.DISK and entry.phase is not Phase.GONE
        entry.weights, entry.tier = weights, Tier.CPU
        entry.touch()
        self._enforce_cpu_bound()

    def _enforce_cpu_bound(self) -> None:
        at_cpu = sorted((e for e in self.entries.values() if e.tier is Tier.CPU and not e.in_memory),
                        key=lambda e: e.last_used)
        for entry in at_cpu[:max(0, len(at_cpu) - self.max_cpu)]:  # the oldest: never the one just touched
            self.evict_cpu(entry)

    def evict_cpu(self, entry: AdapterEntry) -> None:
        """CPU → DISK: drop the CPU copy (the next page-in reads the files again)."""
        assert entry.tier is Tier.CPU and not entry.in_memory
        entry.weights, entry.tier = None, Tier.DISK
        self.stats.cpu_evictions += 1

    def load_slot(self, entry: AdapterEntry) -> None:
        """CPU → SLOT; needs a free slot. The pool gives the slot back if the copy fails."""
        assert entry.tier is Tier.CPU
        self.pool.load(entry.name, entry.weights)
        entry.tier = Tier.SLOT
        entry.touch()

    def slot_victim(self, keep: frozenset[str]) -> AdapterEntry | None:
        """The least recently used unpinned adapter in a slot, other than those in `keep`."""
        candidates = [e for e in self.entries.values() if e.tier is Tier.SLOT and not e.pins and e.name not in keep]
        return min(candidates, key=lambda e: e.last_used, default=None)

    def evict_slot(self, entry: AdapterEntry) -> None:
        """SLOT → CPU (the CPU copy was kept)."""
        assert entry.tier is Tier.SLOT and not entry.pins
        self.pool.unload(entry.name)
        entry.tier = Tier.CPU
        self._enforce_cpu_bound()

    # ------------------------------------------------------------ invariants
    def check(self) -> None:
        """Assert every invariant of the module docstring."""
        for name, e in self.entries.items():
            assert e.name == name and e.phase is not Phase.GONE, name
            assert 0 <= e.pins <= e.uses, (name, e.pins, e.uses)
            assert not e.pins or e.tier is Tier.SLOT, name
            assert (e.tier is Tier.SLOT) == (name in self.pool), name
            assert (e.tier >= Tier.CPU) == (e.weights is not None), name
            assert e.phase is not Phase.DELETING or e.uses, name
            assert not e.in_memory or e.tier >= Tier.CPU, name
        assert set(self.pool.slot_of) <= set(self.entries)
        assert sum(e.tier is Tier.CPU and not e.in_memory for e in self.entries.values()) <= self.max_cpu
