"""Which CPU features the serving dtype depends on, read from /proc/cpuinfo.

torch has no public API that says whether the CPU multiplies bfloat16
natively; without it (avx512_bf16 or AMX) oneDNN emulates bfloat16 and runs
slower than float32, so `--dtype auto` asks the CPU's flags.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of bfloat16 dot-product instructions


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first processor listed; empty where there is no such file (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16_flag(flags: frozenset[str]) -> str | None:
    """The first flag in NATIVE_BF16_FLAGS the CPU has, or None."""
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)
