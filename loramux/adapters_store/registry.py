"""What the store knows about every adapter, and the rules for names and files on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loramux.adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter

NAME_RULE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CARD_FILE = "loramux.json"  # description and example inputs beside the PEFT files
COMPOSITE_CONFIG_FILE = "loramux_composite.json"  # marks a composite expert's folder (loramux.composites)


def check_name(name: str, reserved: frozenset[str] = frozenset()) -> None:
    """`reserved`: names that mean something else in requests (`auto`, the base model's id)."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name) or name.startswith("."):
        raise AdapterError("invalid_name", f"adapter name {name!r} must match [A-Za-z0-9._-]{{1,64}} "
                                           "and must not start with a dot")
    if name in reserved:
        raise AdapterError("invalid_name", f"adapter name {name!r} is reserved (it names the router or the "
                                           "base model in requests)")


@dataclass
class AdapterRecord:
    """Registry entry; `path` is the PEFT folder the weights are read from."""

    name: str
    path: str
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    checksum: str  # content_checksum of the PEFT files: what the adapter is, for the prefix cache and fusions
    created: float = field(default_factory=time.time)
    description: str = ""
    examples: list[str] = field(default_factory=list)
    uploaded: bool = False  # lives in the store directory (deleting it removes the files)
    fused_from: list[str] = field(default_factory=list)  # a fusion built by the store: its experts
    member_of: str | None = None  # a composite expert's member built in memory: that composite

    @property
    def in_memory(self) -> bool:
        """Built in memory by the store (a fusion or a composite's member): no files, not a user's adapter."""
        return bool(self.fused_from) or self.member_of is not None

    def to_json(self) -> dict:
        return asdict(self)


def read_card(folder: Path) -> dict:
    card = folder / CARD_FILE
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError("invalid_config", f"{card} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def check_metadata(metadata: dict) -> tuple[str, list[str]]:
    description = metadata.get("description", "")
    examples = metadata.get("examples", [])
    if not isinstance(description, str) or len(description) > 4096:
        raise AdapterError("invalid_metadata", "description must be a string of at most 4096 characters")
    if not (isinstance(examples, list) and len(examples) <= 64
            and all(isinstance(e, str) and len(e) <= 4096 for e in examples)):
        raise AdapterError("invalid_metadata", "examples must be a list of at most 64 strings")
    return description, examples


def content_checksum(config_bytes: bytes, weights_bytes: bytes) -> str:
    """sha256 over both PEFT files: the config sets the scale (alpha, rsLoRA), so a replace that changes
    only the config is a different adapter too."""
    digest = hashlib.sha256(weights_bytes)
    digest.update(config_bytes)
    return digest.hexdigest()


def make_record(name: str, folder: Path, adapter: LoraAdapter, config: bytes, weights: bytes, metadata: dict,
                uploaded: bool) -> AdapterRecord:
    description, examples = check_metadata(metadata)
    return AdapterRecord(
        name=name, path=str(folder), base_model=adapter.base_model, rank=adapter.rank, alpha=adapter.alpha,
        target_modules=list(adapter.target_modules), size_bytes=len(weights),
        checksum=content_checksum(config, weights), description=description, examples=examples,
        uploaded=uploaded)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_adapter_dir(store_dir: Path, name: str, config_bytes: bytes, weights_bytes: bytes,
                      metadata: dict) -> Path:
    """Write a PEFT folder to a hidden `.tmp-*` folder under store_dir (see `stage_folder`)."""
    return stage_folder(store_dir, name, {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes,
                                          CARD_FILE: json.dumps(metadata).encode()})


def stage_folder(store_dir: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write `files` to a hidden `.tmp-*` folder under store_dir, every file fsynced; returns it.

    Slow (disk and fsync): runs off the engine thread. `commit_adapter_dir` makes it visible.
    """
    check_name(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=store_dir))
    try:
        for filename, data in files.items():
            with open(tmp / filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def commit_adapter_dir(store_dir: Path, name: str, staged: Path) -> Path:
    """Rename a staged folder to store_dir/name, setting any older version aside first.

    Crash-safe: the older version is renamed to `.old-NAME`, then the staged one
    to NAME, each rename fsynced. A crash between the two leaves `.old-NAME` and
    no NAME, and `recover_store_dir` renames it back: the last acknowledged
    version is never lost, and a replace is acknowledged only after both.
    """
    target, old = store_dir / name, store_dir / f".old-{name}"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        _fsync_dir(store_dir)
    os.replace(staged, target)
    _fsync_dir(store_dir)
    shutil.rmtree(old, ignore_errors=True)
    return target


def trash_adapter_dir(store_dir: Path, folder: Path) -> Path:
    """Rename an uploaded folder out of sight (`.del-*`) at once; its files are removed later.

    Requests still running may page the adapter in from the returned path.
    """
    trash = Path(tempfile.mkdtemp(prefix=f".del-{folder.name}-", dir=store_dir))
    os.replace(folder, trash / folder.name)
    _fsync_dir(store_dir)
    return trash / folder.name


def recover_store_dir(store_dir: Path) -> list[str]:
    """Undo what a crash left at start-up; returns what was done, one line per folder.

    `.old-NAME` without NAME is a replace cut between its renames: the old
    version comes back. Staged uploads and deleted folders are removed.
    """
    done = []
    for leftover in sorted(store_dir.glob(".*")):
        if not leftover.is_dir():
            continue
        if leftover.name.startswith(".old-") and not (store_dir / leftover.name[5:]).exists():
            os.replace(leftover, store_dir / leftover.name[5:])
            done.append(f"restored {leftover.name[5:]} from an interrupted replace")
        elif leftover.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name}")
    if done:
        _fsync_dir(store_dir)
    return done
