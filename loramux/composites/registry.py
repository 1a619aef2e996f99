"""The registered composite experts, their gate tensors on the device, and how a request uses one.

A composite lives beside the adapter store: its members are store adapters
(named ones the user registered, or members built in memory that the
registry hands to the store with `register_derived`, entries of the store's
lifecycle like any adapter), so paging, pinning and slots work unchanged.
Its gate (MoLE, MoR) takes one of `max_composites` rows of the device tensors
`gate_weight` [C, L, M, hidden] and `gate_inv_temperature` [C, L], where M is
the server's member cap: fixed sizes, filled at registration. A MoR
composite's store member is its shared A/B (one slot); its N experts take N
rows of the LoRA linears' scaling-vector pools (`ScaleRowPool`), and a request
runs N assignments of the shared member, one per expert and pool row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loramux.adapters_store.peft_format import AdapterError
from loramux.adapters_store.registry import (COMPOSITE_CONFIG_FILE, check_name, commit_adapter_dir, stage_folder,
                                             trash_adapter_dir)
from loramux.adapters_store.store import AdapterStore
from loramux.composites.format import COMPOSITE_WEIGHTS_FILE, BaseShape, CompositeSpec, parse_composite
from loramux.composites.scale_pool import ScaleRowPool

logger = logging.getLogger(__name__)


@dataclass
class CompositeRecord:
    """What `/v1/models` and `/v1/adapters` say about a composite."""

    name: str
    type: str
    path: str
    members: list[str]  # what the gate runs over (mor: its experts)
    top_k: int
    tasks: list[str]
    default_task: str | None
    checksum: str  # sha256 of composite.safetensors
    gate_index: int = -1  # row of the gate tensors; -1 for more (no gate)
    member_checksums: dict[str, str] = field(default_factory=dict)  # named members as registered
    task_ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # more: task -> module -> per layer
    shared: str | None = None  # mor: the store member holding the shared A/B
    scale_rows: list[int] = field(default_factory=list)  # mor: each expert's row of the scaling-vector pools
    description: str = ""
    examples: list[str] = field(default_factory=list)
    uploaded: bool = False
    created: float = field(default_factory=time.time)

    @property
    def stored_members(self) -> list[str]:
        """The store's adapters the composite uses: its members, and for mor the shared member instead."""
        return [self.shared] if self.shared else self.members

    def to_json(self) -> dict:
        return asdict(self) | {"object": "composite"}


@dataclass
class PreparedComposite:
    """A validated composite, ready for `CompositeRegistry.install`: a folder registered in place, or an
    upload staged in a hidden folder of the store directory (`staged`)."""

    name: str
    spec: CompositeSpec
    weights_bytes: bytes
    replace: bool
    folder: Path
    uploaded: bool = False  # lives in the store directory (deleting the composite removes it)
    staged: bool = False

    def discard(self) -> None:
        if self.staged:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class CompositeOptions:
    """Per-request settings: MoLE/MoR `mask` (members to drop) and `top_k`; MoRE `task`; per-layer gate report."""

    mask: tuple[str, ...] = ()
    top_k: int | None = None
    task: str | None = None
    per_layer: bool = False


@dataclass
class CompositeUse:
    """One sequence's use of a composite, and the gate weights it saw (summed over its sampled tokens)."""

    name: str
    kind: str
    gate_index: int
    members: tuple[str, ...]
    allowed: tuple[bool, ...]
    top_k: int
    task: str | None
    per_layer: bool
    cache_key: tuple  # what the gate's effect on K/V depends on (content, not names): Sequence.lora_identity
    scale_rows: tuple[int, ...] = ()  # mor: the pool row of each member (expert) of the mix
    gate_sum: torch.Tensor | None = None  # [L, N] float64
    entropy_sum: float = 0.0
    num_tokens: int = 0

    def fresh(self) -> "CompositeUse":
        """The same use with empty statistics (one per completion of a request)."""
        return CompositeUse(self.name, self.kind, self.gate_index, self.members, self.allowed, self.top_k,
                            self.task, self.per_layer, self.cache_key, self.scale_rows)

    def add_gates(self, gates: torch.Tensor) -> None:
        """gates: [L, N] one sampled token's gate weights in every decoder layer."""
        gates = gates.double()
        self.gate_sum = gates if self.gate_sum is None else self.gate_sum + gates
        safe = gates.clamp_min(1e-30)
        self.entropy_sum += float(-(gates * safe.log()).sum(dim=1).mean())
        self.num_tokens += 1

    @property
    def mean_entropy(self) -> float | None:
        return self.entropy_sum / self.num_tokens if self.num_tokens else None

    def summary(self) -> dict:
        """The response's `loramux.composite` field."""
        out = {"name": self.name, "type": self.kind}
        if self.task is not None:
            out["task"] = self.task
        if self.gate_sum is not None:
            mean = self.gate_sum / self.num_tokens
            out["gates"] = {m: round(float(w), 6) for m, w in zip(self.members, mean.mean(dim=0))}
            out["gate_entropy"] = round(self.mean_entropy, 6)
            if self.per_layer:
                out["gates_per_layer"] = [{m: round(float(w), 6) for m, w in zip(self.members, row)} for row in mean]
        return out


class CompositeRegistry:
    def __init__(self, store: AdapterStore, base: BaseShape, max_composites: int, store_dir: Path | None,
                 device: torch.device, scale_pool: ScaleRowPool):
        """scale_pool: the pool MoR experts take rows of."""
        self.store = store
        self.scale_pool = scale_pool
        self.base = base
        self.store_dir = store_dir
        self.records: dict[str, CompositeRecord] = {}
        self.gate_weight = torch.zeros(max_composites, base.num_layers, base.max_members, base.hidden_size,
                                       dtype=torch.float32, device=device)
        self.gate_inv_temperature = torch.ones(max_composites, base.num_layers, dtype=torch.float32, device=device)
        self._free_gates = list(range(max_composites - 1, -1, -1))
        self._uses: Counter[str] = Counter()
        self._deleted: dict[str, list[CompositeRecord]] = {}  # deleted while requests still use them
        # Called on the registering thread with (name, record) after a registration, (name, None) after a deletion.
        self.change_listeners: list[Callable[[str, CompositeRecord | None], None]] = []
        store.name_taken_elsewhere = self._holder_of

    def _holder_of(self, name: str) -> str | None:
        """What holds `name` on this side, for the store's name checks (adapters and composites share names)."""
        if name in self.records:
            return "a composite expert"
        return "a composite expert being deleted" if name in self._deleted else None

    @property
    def max_members(self) -> int:
        return self.base.max_members

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def get(self, name: str) -> CompositeRecord:
        if name not in self.records:
            raise AdapterError("not_found", f"composite {name!r} does not exist")
        return self.records[name]

    # ------------------------------------------------------------ registration
    def register_path(self, name: str, path: str | Path, replace: bool = False, uploaded: bool = False
                      ) -> CompositeRecord:
        """prepare_path then install, in one call (start-up, `Engine.add_adapter` and tests)."""
        self.check_new_name(name, replace)
        return self.install(self.prepare_path(name, path, replace, uploaded))

    def register_from_files(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False
                            ) -> CompositeRecord:
        """prepare_upload then install, in one call (tests and scripts)."""
        self.check_new_name(name, replace)
        return self.install(self.prepare_upload(name, config_bytes, weights_bytes, replace))

    def prepare_path(self, name: str, path: str | Path, replace: bool = False, uploaded: bool = False
                     ) -> PreparedComposite:
        """Read and validate the composite folder at `path`, registered in place; any thread."""
        check_name(name, self.store.reserved_names)
        folder = Path(path).expanduser()
        for filename in (COMPOSITE_CONFIG_FILE, COMPOSITE_WEIGHTS_FILE):
            if not (folder / filename).is_file():
                raise AdapterError("not_found", f"{folder} has no {filename} (expected a composite folder)")
        config_bytes, weights_bytes = ((folder / COMPOSITE_CONFIG_FILE).read_bytes(),
                                       (folder / COMPOSITE_WEIGHTS_FILE).read_bytes())
        spec = parse_composite(name, config_bytes, weights_bytes, self.base, folder)
        return PreparedComposite(name, spec, weights_bytes, replace, folder, uploaded)

    def prepare_upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False
                       ) -> PreparedComposite:
        """Validate uploaded bytes and stage them (fsynced) in the store directory; any thread."""
        if self.store_dir is None:
            raise AdapterError("no_store", "this server has no adapter store directory for uploads")
        check_name(name, self.store.reserved_names)
        spec = parse_composite(name, config_bytes, weights_bytes, self.base)
        staged = stage_folder(self.store_dir, name, {COMPOSITE_CONFIG_FILE: config_bytes,
                                                     COMPOSITE_WEIGHTS_FILE: weights_bytes})
        return PreparedComposite(name, spec, weights_bytes, replace, staged, uploaded=True, staged=True)

    def install(self, prepared: PreparedComposite) -> CompositeRecord:
        """Publish a prepared composite (engine thread): checks against the registry and the store, the
        staged folder's rename for uploads, then registration; on any refusal nothing changes."""
        name, spec, replace, folder = prepared.name, prepared.spec, prepared.replace, prepared.folder
        try:
            self.check_new_name(name, replace)
            self._check_installable(name, spec, replace)
            if prepared.staged:
                folder = commit_adapter_dir(self.store_dir, name, folder)
        except BaseException:
            prepared.discard()
            raise
        return self._install(name, spec, folder, prepared.weights_bytes, prepared.uploaded, replace)

    def check_new_name(self, name: str, replace: bool) -> None:
        check_name(name, self.store.reserved_names)
        if name in self.store or name in self._deleted:
            raise AdapterError("already_exists", f"{name!r} is already the name of an adapter or of a composite "
                                                 "being deleted")
        if name in self.records:
            if not replace:
                raise AdapterError("already_exists", f"composite {name!r} already exists (replacing needs "
                                                     "replace=true)")
            if self._uses[name]:
                raise AdapterError("in_use", f"composite {name!r} is in use by running requests; retry later")

    def _check_installable(self, name: str, spec: CompositeSpec, replace: bool) -> None:
        """Everything `_install` needs, checked before it changes anything."""
        for member, adapter in spec.members:
            owned = replace and name in self.records and member in self.records[name].stored_members
            if adapter is None and member not in self.store:
                raise AdapterError("member_not_found", f"member {member!r} of composite {name!r} is not a "
                                                       "registered adapter")
            if adapter is None and self.store.get(member).in_memory:
                raise AdapterError("member_not_found", f"member {member!r} is a derived adapter; a composite's "
                                                       "members must be registered adapters")
            if adapter is not None and member in self.store and not owned:
                raise AdapterError("already_exists", f"member name {member!r} of composite {name!r} is taken")
        reuses_gate = replace and name in self.records and self.records[name].gate_index >= 0
        if spec.gate_weight is not None and not self._free_gates and not reuses_gate:
            raise AdapterError("too_many_composites", f"this server holds at most {self.gate_weight.shape[0]} "
                                                      "gated composites (--max-composites)")
        if spec.experts:
            returning = len(self.records[name].scale_rows) if replace and name in self.records else 0
            self.scale_pool.check_room(len(spec.experts), returning)

    def _install(self, name: str, spec: CompositeSpec, folder: Path, weights_bytes: bytes, uploaded: bool,
                 replace: bool) -> CompositeRecord:
        self._check_installable(name, spec, replace)
        if replace and name in self.records:
            self._unregister(name, remove_files=False)  # the new files are already in place
        gate_index = -1
        if spec.gate_weight is not None:
            gate_index = self._free_gates.pop()
            n = len(spec.gated)
            self.gate_weight[gate_index].zero_()
            self.gate_weight[gate_index, :, :n].copy_(spec.gate_weight)
            self.gate_inv_temperature[gate_index].copy_(1.0 / spec.gate_temperature)
        scale_rows, derived = [], []
        try:
            if spec.experts:
                scale_rows = self.scale_pool.take(spec.expert_scales, len(spec.experts))
            for member, adapter in spec.members:
                if adapter is not None:
                    self.store.register_derived(member, adapter, name)
                    derived.append(member)
        except BaseException:  # give back what this registration took
            for member in derived:
                self.store.delete_derived(member)
            if scale_rows:
                self.scale_pool.give_back(scale_rows)
            if gate_index >= 0:
                self._free_gates.append(gate_index)
            raise
        record = CompositeRecord(
            name=name, type=spec.kind, path=str(folder), members=spec.gated, top_k=spec.top_k,
            tasks=list(spec.tasks), default_task=spec.default_task,
            checksum=hashlib.sha256(weights_bytes).hexdigest(), gate_index=gate_index,
            member_checksums={m: self.store.get(m).checksum for m, a in spec.members if a is None},
            task_ranks=spec.member_ranks, description=spec.description, examples=spec.examples, uploaded=uploaded,
            shared=spec.members[0][0] if spec.experts else None, scale_rows=scale_rows)
        self.records[name] = record
        logger.info("composite %s: %s over %d members", name, spec.kind, len(spec.gated))
        for listener in self.change_listeners:
            listener(name, record)
        return record

    def register_existing(self, store_dir: Path) -> None:
        """Register the composites uploaded to the store directory in an earlier run."""
        for folder in sorted(p for p in store_dir.iterdir() if (p / COMPOSITE_CONFIG_FILE).is_file()):
            try:
                self.register_path(folder.name, folder, uploaded=True)
            except AdapterError as exc:
                logger.error("skipping composite folder %s: %s", folder, exc)

    # ------------------------------------------------------------ deletion and uses
    def delete(self, name: str) -> None:
        """Unregister now (new requests get not-found); free gate row and files once no request uses it."""
        self._unregister(self.get(name).name, remove_files=True)

    def _unregister(self, name: str, remove_files: bool) -> None:
        record = self.records.pop(name)
        for listener in self.change_listeners:
            listener(name, None)
        record.uploaded = record.uploaded and remove_files
        if record.uploaded:  # out of sight at once (the gate is on the device; nothing reads the files again)
            record.path = str(trash_adapter_dir(self.store_dir, Path(record.path)))
        for member in record.stored_members:
            if member not in record.member_checksums and member in self.store:  # built in memory for it
                self.store.delete_derived(member)
        if self._uses[name]:
            self._deleted.setdefault(name, []).append(record)
        else:
            self._finish_delete(record)

    def _finish_delete(self, record: CompositeRecord) -> None:
        if record.gate_index >= 0:
            self._free_gates.append(record.gate_index)
        if record.scale_rows:
            self.scale_pool.give_back(record.scale_rows)
        if record.uploaded:  # already in its `.del-*` folder
            shutil.rmtree(Path(record.path).parent, ignore_errors=True)

    def uses(self, name: str) -> int:
        """Sequences running (or waiting) with the composite."""
        return self._uses[name]

    def release(self, use: CompositeUse) -> None:
        self._uses[use.name] -= 1
        if not self._uses[use.name]:
            del self._uses[use.name]
            for record in self._deleted.pop(use.name, []):
                self._finish_delete(record)

    def resolve(self, name: str, options: CompositeOptions) -> tuple[tuple, CompositeUse]:
        """The member mix a request for composite `name` runs with, and its use (counted until `release`).

        Raises AdapterError (codes: not_found, member_not_found, invalid_option).
        """
        record = self.get(name)
        for member, checksum in record.member_checksums.items():
            if member not in self.store or self.store.get(member).checksum != checksum:
                raise AdapterError("member_not_found", f"member {member!r} of composite {name!r} was deleted or "
                                                       "replaced; register the composite again")
        task = None
        if record.type == "more":
            if options.mask or options.top_k is not None:
                raise AdapterError("invalid_option", "mask and top_k apply to mole and mor composites only")
            task = options.task or record.default_task
            if task not in record.tasks:
                raise AdapterError("invalid_option", f"composite {name!r} needs a task, one of "
                                                     f"{', '.join(record.tasks)}; got {task!r}")
            member = record.members[record.tasks.index(task)]
            mix = ((member, 1.0, 0, self.store.get(member).rank),)
            allowed, top_k = (True,), 1
        else:
            if options.task is not None:
                raise AdapterError("invalid_option", "task applies to more composites only")
            unknown = set(options.mask) - set(record.members)
            if unknown:
                raise AdapterError("invalid_option", f"mask names {sorted(unknown)}, which are not members of "
                                                     f"{name!r} ({', '.join(record.members)})")
            allowed = tuple(m not in options.mask for m in record.members)
            if not any(allowed):
                raise AdapterError("invalid_option", "the mask drops every member")
            top_k = record.top_k if options.top_k is None else options.top_k
            if not 0 <= top_k <= len(record.members):
                raise AdapterError("invalid_option", f"top_k must be between 1 and {len(record.members)}")
            # mor: every expert is the shared member, scaled by its pool row (`CompositeUse.scale_rows`)
            stored = [record.shared] * len(record.members) if record.shared else record.members
            mix = tuple((m, 1.0, 0, self.store.get(m).rank) for m in stored)
        self._uses[name] += 1
        use = CompositeUse(name=name, kind=record.type, gate_index=record.gate_index, members=tuple(record.members),
                           allowed=allowed, top_k=top_k or len(record.members), task=task,
                           per_layer=options.per_layer,
                           cache_key=(record.checksum, allowed, top_k or len(record.members), task),
                           scale_rows=tuple(record.scale_rows))
        return mix, use

    def acquire_again(self, use: CompositeUse) -> None:
        """One more sequence (completion) of the same request uses the composite."""
        self._uses[use.name] += 1


def gate_entropy_buckets(max_members: int) -> tuple[float, ...]:
    """Histogram buckets for the mean gate entropy (nats), up to log(max_members)."""
    top = math.log(max(max_members, 2))
    return tuple(round(top * i / 10, 4) for i in range(1, 11))
