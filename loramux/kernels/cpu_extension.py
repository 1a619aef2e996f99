"""The C++ CPU kernels (bfloat16, AVX512-BF16), built on first use into one library.

`cpu_bgmv.cpp` holds the LoRA shrink and expand (`loramux.kernels.cpu_bgmv`),
`cpu_attention.cpp` the paged decode attention (`loramux.engine.attention`),
`cpu_layers.cpp` a decoder layer's element-wise ops (`loramux.engine.layer_ops`),
`cpu_simd.h` what they share. They are built with the machine's compiler (and
ninja) on first use, into torch's extension cache (`~/.cache/torch_extensions`,
or $TORCH_EXTENSIONS_DIR), under a name holding a hash of the sources, flags
and torch version: later processes load the built library, and checkouts with
different sources do not rebuild over each other. Only CPUs with AVX512-BF16
get them: elsewhere `--dtype auto` serves float32, where torch's ops are the fast ones.
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

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_bgmv.cpp", HERE / "cpu_attention.cpp", HERE / "cpu_layers.cpp")
HEADERS = (HERE / "cpu_simd.h",)
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # /proc/cpuinfo names of what the kernels use
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
STALE_LOCK_SECONDS = 600  # a build takes about 20 s; a lock this old was left by a build that was killed


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the kernels' ops; False, with the reason logged, where the CPU lacks
    AVX512-BF16 or the build fails (no compiler): torch's ops serve then."""
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        logger.info("CPU kernels: the CPU lacks %s; using torch's ops", ", ".join(missing))
        return False
    from torch.utils import cpp_extension

    venv_ninja = Path(sys.executable).parent / "ninja"
    if shutil.which("ninja") is None and venv_ninja.is_file():  # pip's ninja, in a venv that is not activated
        os.environ["PATH"] = os.pathsep.join([str(venv_ninja.parent), os.environ.get("PATH", "")])
    try:
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)
                                + " ".join(COMPILE_FLAGS + [torch.__version__]).encode()).hexdigest()[:12]
        name = f"loramux_cpu_kernels_{digest}"
        _remove_stale_lock(Path(cpp_extension.get_default_build_root()) / name / "lock")
        logger.info("CPU kernels: loading %s (a machine's first use builds it, about 20 s)", name)
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=COMPILE_FLAGS,
                           extra_include_paths=[str(HERE)], extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # an optional speed-up: no sources, compiler or ninja, a failed build
        logger.warning("CPU kernels could not be built (%s); using torch's ops", exc)
        return False
    return True


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels serve this model: bfloat16 on a CPU where they build (loads them on first use)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and load()


def _remove_stale_lock(lock: Path) -> None:
    """torch's build waits without a time limit on the lock file of a build in progress; a build killed
    mid-way leaves it behind, and every later start would hang."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("CPU kernels: removing %s, left by a build that did not finish", lock)
            lock.unlink()
    except FileNotFoundError:
        pass
