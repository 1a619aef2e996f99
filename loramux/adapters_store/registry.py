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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name) or name.startswith("."):
        raise AdapterError("invalid_name", f"adapter name {name!r} must match [A-Za-z0-9._-]{{1,64}} "
                                           "and must not start with a dot")


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
    checksum: str  # sha256 of adapter_model.safetensors
    created: float = field(default_factory=time.time)
    description: str = ""
    examples: list[str] = field(default_factory=list)
    uploaded: bool = False  # lives in the store directory (deleting it removes the files)
    fused_from: list[str] = field(default_factory=list)  # a fusion built by the store: its experts

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


def make_record(name: str, folder: Path, adapter: LoraAdapter, weights: bytes, metadata: dict,
                uploaded: bool) -> AdapterRecord:
    description, examples = check_metadata(metadata)
    return AdapterRecord(
        name=name, path=str(folder), base_model=adapter.base_model, rank=adapter.rank, alpha=adapter.alpha,
        target_modules=list(adapter.target_modules), size_bytes=len(weights),
        checksum=hashlib.sha256(weights).hexdigest(), description=description, examples=examples,
        uploaded=uploaded)


def write_adapter_dir(store_dir: Path, name: str, config_bytes: bytes, weights_bytes: bytes, metadata: dict,
                      replace: bool) -> Path:
    """Write a PEFT folder under store_dir/name atomically (see `write_folder`)."""
    return write_folder(store_dir, name, {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes,
                                          CARD_FILE: json.dumps(metadata).encode()}, replace)


def write_folder(store_dir: Path, name: str, files: dict[str, bytes], replace: bool) -> Path:
    """Write `files` into store_dir/name atomically: a hidden temp folder, fsync, then rename.

    A crash leaves at most a `.tmp-*` folder, which `clean_partial_uploads` removes at start-up.
    """
    check_name(name)
    target = store_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=store_dir))
    try:
        for filename, data in files.items():
            with open(tmp / filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if target.exists():
            if not replace:
                raise AdapterError("already_exists", f"adapter {name!r} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=store_dir))
            os.replace(target, old / name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def clean_partial_uploads(store_dir: Path) -> list[Path]:
    """Remove what interrupted uploads left behind; returns the removed paths."""
    removed = []
    for leftover in store_dir.glob(".*"):
        if leftover.is_dir() and leftover.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed
