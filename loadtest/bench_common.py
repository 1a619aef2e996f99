"""What every benchmark script prints and how it times (imported by the scripts beside it)."""

from __future__ import annotations

import atexit
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def machine_description(device: str) -> str:
    """Host, processor, threads, torch version, and the GPU when there is one."""
    text = f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script exits, error or not (the random adapters of one run
    take hundreds of MB, and left behind they fill /tmp run after run)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
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
