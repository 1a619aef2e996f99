"""One background thread that applies the router's index updates in order, off the engine thread."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class UpdateWorker:
    """Runs submitted jobs one at a time, in submission order; `wait` blocks until every job submitted
    before the call has run, so a reader sees all changes made before it asked."""

    def __init__(self, name: str = "router-updates"):
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._submitted += 1
        self._jobs.put(job)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the jobs submitted so far have run; False if `timeout` seconds passed first."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return self._submitted - self._done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # one bad card must not stop the updates behind it
                logger.exception("router update failed")
            with self._cond:
                self._done += 1
                self._cond.notify_all()
