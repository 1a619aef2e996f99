"""Building the C++ CPU kernels (`loramux.kernels.cpu_extension`): what happens where they cannot be built."""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path

import torch

from loramux.engine.attention import select_attention_backend
from loramux.engine.layer_ops import select_layer_ops
from loramux.kernels import cpu_extension, select_lora_backend


def test_a_failed_build_leaves_the_torch_ops_with_float32_slots(monkeypatch, tmp_path, caplog):
    """No compiler, or one that refuses the flags: a warning, and the bfloat16 CPU model keeps torch's ops:
float32 slots for LoRA, sdpa attention, torch's layer ops."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # not the machine's cache of good builds
    monkeypatch.setenv("PATH", os.environ["PATH"])  # load may add the venv's bin folder for ninja
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: frozenset(cpu_extension.REQUIRED_FLAGS))
    monkeypatch.setattr(cpu_extension, "COMPILE_FLAGS", ["-mno-such-instruction-set"])
    cpu_extension.load.cache_clear()
    try:
        assert not cpu_extension.load()
        assert "could not be built" in caplog.text
        assert select_lora_backend("auto", torch.device("cpu"), torch.bfloat16).float32_slots_on_cpu
        assert select_attention_backend("auto", 3, 64, 16, None, torch.device("cpu"), torch.bfloat16).name == "sdpa"
        assert select_layer_ops(torch.device("cpu"), torch.bfloat16).name == "torch"
        monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
        cpu_extension.load.cache_clear()
        assert not cpu_extension.load()  # a CPU without AVX512-BF16 builds nothing
    finally:
        cpu_extension.load.cache_clear()


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits on a build's lock file without a time limit: one left by a killed build would hang every start."""
    stale, fresh = tmp_path / "stale" / "lock", tmp_path / "fresh" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = stale.stat().st_mtime - cpu_extension.STALE_LOCK_SECONDS - 1
    os.utime(stale, (old, old))
    cpu_extension._remove_stale_lock(stale)
    cpu_extension._remove_stale_lock(fresh)
    cpu_extension._remove_stale_lock(tmp_path / "never-built" / "lock")
    assert not stale.exists() and fresh.exists()


def test_an_installed_package_ships_the_kernel_sources():
    """The kernels are built from source where they run: a wheel without the .cpp / .h files could not."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["loramux.kernels"]
    for source in cpu_extension.SOURCES + cpu_extension.HEADERS:
        assert any(fnmatch.fnmatch(source.name, pattern) for pattern in patterns), source.name


def test_missing_sources_leave_the_torch_ops(monkeypatch, caplog):
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: frozenset(cpu_extension.REQUIRED_FLAGS))
    monkeypatch.setattr(cpu_extension, "SOURCES", (cpu_extension.HERE / "no_such_kernel.cpp",))
    cpu_extension.load.cache_clear()
    try:
        assert not cpu_extension.load()
        assert "could not be built" in caplog.text and "no_such_kernel.cpp" in caplog.text
    finally:
        cpu_extension.load.cache_clear()
