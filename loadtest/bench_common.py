"""What every benchmark script prints and how it times (imported by the scripts beside it)."""

from __future__ import annotations

import atexit
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def machine_description(device: str) -> str:
    """Host, processor, threads, torch version, and the GPU when there is one."""
    text = f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


_failed = False  # the script ended in an uncaught exception


def _note_failure(kind, value, traceback) -> None:
    global _failed
    _failed = True
    sys.__excepthook__(kind, value, traceback)


def _remove_unless_failed(folder: Path) -> None:
    if _failed:
        logger.error("kept %s for its logs (the run failed); remove it when done", folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script exits (the random adapters of one run take hundreds of MB,
    and left behind they fill /tmp run after run). After an uncaught exception it is kept and named in the
    log, since the servers' logs in it say why; a killed process (SIGKILL) leaves it behind."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    sys.excepthook = _note_failure
    atexit.register(_remove_unless_failed, folder)
    return folder


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: int = 3) -> float:
    """Seconds per call: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat
