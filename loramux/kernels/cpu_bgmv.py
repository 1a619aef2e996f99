"""The CPU backend for bfloat16 models: a C++ BGMV kernel (AVX512-BF16) for decode levels, torch's ops otherwise.

At decode, LoRA on the CPU is bound by reading each row's slot tensors; torch's
bfloat16 batched GEMMs at those shapes (1-2 rows per slot, rank 16) run slower
than float32 ones, so the torch backend keeps the slots in float32 and reads
twice the bytes. `cpu_bgmv.cpp` streams bfloat16 slots once with float32 sums,
so with it the slots stay in the model's dtype (`LoraBackend.float32_slots_on_cpu`).
Prefill levels of many segments take the kernel too (torch's ops cost ~100 us of
launches per segment and projection); levels whose segments average
TORCH_MIN_AVG_ROWS rows or more (a long prompt alone) run torch's segment GEMMs,
which are faster per row.

The kernel is built with the machine's compiler (and ninja) on first use, into
torch's extension cache (`~/.cache/torch_extensions`, or $TORCH_EXTENSIONS_DIR),
under a name holding the source's hash: later processes load the built library,
and checkouts with different sources do not rebuild over each other. Only CPUs with AVX512-BF16 get it: elsewhere
`--dtype auto` serves float32, where the torch ops are the fast ones.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from loramux.engine.cpu_features import cpu_flags
from loramux.kernels import CPU_KERNEL_RANKS, torch_ref
from loramux.kernels.plan import LoraPlanLevel

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # /proc/cpuinfo names of what the kernel uses
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
# From about this many rows per segment torch's GEMMs beat the kernel (loadtest/bench_lora_ops.py, prefill
# 1 x 2048 vs 32 x 128 tokens, one thread, SmolLM2's projections: even at roughly 400-900 rows).
TORCH_MIN_AVG_ROWS = 512


@functools.cache
def load_kernel() -> bool:
    """Build (once per machine) and load the kernel's ops; False, with the reason logged, where the CPU lacks
    AVX512-BF16 or the build fails (no compiler): the torch ops serve then."""
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        logger.info("LoRA CPU kernel: the CPU lacks %s; using torch's ops", ", ".join(missing))
        return False
    from torch.utils import cpp_extension

    venv_ninja = Path(sys.executable).parent / "ninja"
    if shutil.which("ninja") is None and venv_ninja.is_file():  # pip's ninja, in a venv that is not activated
        os.environ["PATH"] = os.pathsep.join([str(venv_ninja.parent), os.environ.get("PATH", "")])
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS + [torch.__version__]).encode()
                            ).hexdigest()[:12]
    name = f"loramux_cpu_bgmv_{digest}"
    _remove_stale_lock(Path(cpp_extension.get_default_build_root()) / name / "lock")
    logger.info("LoRA CPU kernel: loading %s (a machine's first use builds it, about 20 s)", name)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except Exception as exc:  # an optional speed-up: no compiler or ninja, a failed build, a broken toolchain
        logger.warning("LoRA CPU kernel could not be built (%s); using torch's ops with float32 slots", exc)
        return False
    return True


STALE_LOCK_SECONDS = 600  # a build takes about 20 s; a lock this old was left by a build that was killed


def _remove_stale_lock(lock: Path) -> None:
    """torch's build waits without a time limit on the lock file of a build in progress; a build killed
    mid-way leaves it behind, and every later start would hang."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("LoRA CPU kernel: removing %s, left by a build that did not finish", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


def runs_level(activations: torch.Tensor, slots: torch.Tensor, r_max: int, level: LoraPlanLevel) -> bool:
    """The kernel takes this level: bfloat16 activations and slot tensors on the CPU, a compiled r_max, and
    segments shorter than TORCH_MIN_AVG_ROWS on average. The shrink and the expand decide alike (h is the
    kernel's own layout)."""
    return (activations.device.type == "cpu" and activations.dtype == slots.dtype == torch.bfloat16
            and r_max in CPU_KERNEL_RANKS and level.num_rows < TORCH_MIN_AVG_ROWS * len(level.segments))


def _scaling(pool: torch.Tensor | None, level: LoraPlanLevel) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (pool, scale_idx) the kernel reads for a level with scaled rows (MoR experts), else (None, None)."""
    return (pool, level.scale_idx) if pool is not None and level.scale_idx is not None else (None, None)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_active: torch.Tensor, level: LoraPlanLevel,
                num_subs: int = 1, rank_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`torch_ref.lora_shrink`'s semantics; on a kernel level h is [N, num_subs * r_max], one row per plan row."""
    if not runs_level(x, lora_a, lora_a.shape[1] // num_subs, level):
        return torch_ref.lora_shrink(x, lora_a, slot_active, level, num_subs, rank_scale)
    return torch.ops.loramux_cpu_bgmv.shrink(x.contiguous(), lora_a, slot_active, level.slot_idx, level.token_idx,
                                             level.coeff, level.rank_lo, level.rank_hi, num_subs,
                                             *_scaling(rank_scale, level))


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, h: torch.Tensor, slot_active: torch.Tensor,
                level: LoraPlanLevel, sub_starts: tuple[int, ...] = (0,), out_scale: torch.Tensor | None = None
                ) -> None:
    """`torch_ref.lora_expand`'s semantics, on h from this module's `lora_shrink` on the same level."""
    if not runs_level(y, lora_b, lora_b.shape[2], level):
        torch_ref.lora_expand(y, lora_b, h, slot_active, level, sub_starts, out_scale)
        return
    torch.ops.loramux_cpu_bgmv.expand(y, lora_b, h, slot_active, level.slot_idx, level.token_idx, list(sub_starts),
                                      *_scaling(out_scale, level))
