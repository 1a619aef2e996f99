"""Servers as real processes on free loopback ports: for the API tests and the side-by-side benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`loramux serve ARGS` on a free port; returns once /ready answers."""

    def __init__(self, args: list[str], log_path: Path, startup_timeout: float = 120.0, cwd: Path | None = None):
        """`cwd`: run there, so that the `loramux` package found there is the one served (another checkout)."""
        self.launch(lambda port: [sys.executable, "-m", "loramux", "--log-level", "WARNING", "serve",
                                  "--port", str(port), *args], log_path, "/ready", startup_timeout, cwd)

    def launch(self, command: Callable[[int], list[str]], log_path: Path, ready_path: str,
               startup_timeout: float = 120.0, cwd: Path | None = None) -> None:
        """Start command(port) in `cwd` and wait until GET ready_path answers 200."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command(self.port), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready; see {log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
