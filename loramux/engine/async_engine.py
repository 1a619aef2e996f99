"""An asyncio front for the engine: one background thread runs the step loop.

The engine is not thread-safe, so every call that touches it (adding,
aborting, adapter changes) is queued as a command and run by the loop thread
between steps; results come back through futures and per-request queues.

Given a function that builds the engine, the loop thread builds it too, so
one thread does all of the engine's torch work: libgomp gives each thread
that runs a parallel region its own team of worker threads, and once the
process holds more of them than there are CPUs its workers sleep between
regions instead of spinning (thousands of futex waits a step on CPU).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable, TypeVar

import torch

from loramux.config import EngineConfig
from loramux.engine.engine import Engine, RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RequestFailedError(RuntimeError):
    """This request failed in the engine; the others go on. `code` names why, `status` is the HTTP status."""

    STATUS = {"adapter_unavailable": 503, "engine_error": 500, "engine_unavailable": 503, "server_shutting_down": 503}

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code
        self.status = self.STATUS.get(code, 500)


class EngineDeadError(RequestFailedError):
    """The step loop failed outside any request, or the server is shutting down; every request ends."""

    def __init__(self, message: str, code: str = "engine_unavailable"):
        super().__init__(message, code)


class ServerStoppingError(EngineDeadError):
    """The server's shutdown grace period ended before the request did."""

    def __init__(self, message: str):
        super().__init__(message, "server_shutting_down")


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine]):
        """Start the loop thread over `engine`, or over the engine that `engine()` builds on that thread
        (this waits for the build and raises its error)."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.step_listeners: list[Callable[[float], None]] = []  # called with each step's seconds (engine thread)
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="loramux-engine", daemon=True)
        self._thread.start()
        self.engine: Engine = built.result()

    @classmethod
    def for_serving(cls, config: EngineConfig) -> "AsyncEngine":
        """The server's engine, built on the loop thread that steps it; every thread that starts torch work
        after this (the router's embedder and update worker, upload checks) runs it on one thread, so the
        engine thread's OpenMP team stays the process's only one. torch fixes a thread's count at its first
        parallel op, so the engine thread keeps the count it had."""
        async_engine = cls(lambda: Engine(config))
        torch.set_num_threads(1)
        return async_engine

    # ------------------------------------------------------------ public API
    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def submit(self, request_id: str, prompt, sampling, lora_mix=()) -> "RequestStream":
        """Queue a request; raises the engine's error at once if it is refused.

        `lora_mix` may also be a function of the engine that returns the mix:
        it runs on the engine thread right before the request is added (a
        fusion built there cannot be evicted before the request holds it).
        Iterate the returned stream for outputs; closing it early aborts the request.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, sampling.n)

        def add(engine: Engine):
            mix = lora_mix(engine) if callable(lora_mix) else lora_mix
            engine.add_request(request_id, prompt, sampling, mix)
            self._streams[request_id] = (loop, stream)
            return mix

        stream.lora_mix = tuple(await self.call(add))
        return stream

    def abort(self, request_id: str) -> None:
        def run(engine: Engine) -> None:
            self._streams.pop(request_id, None)
            engine.abort(request_id)

        self._commands.put((run, None))
        self._wake.set()

    async def abort_all(self, error: Exception) -> None:
        """End every open request: its stream raises `error`."""
        await self.call(lambda engine: self._fail_all(error))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop the loop thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # --------------------------------------------------------- engine thread
    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(self.engine)
            except Exception as exc:  # reported to the caller, the loop goes on
                if future is not None:
                    future.set_exception(exc)
                continue
            if future is not None:
                future.set_result(result)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand (request id, output or error) pairs to their streams: one wake-up of each event loop per call.

        A wake-up per item would cost a self-pipe write and a loop iteration per token (32 a step at batch 32).
        """
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = {}
        for request_id, item in items:
            loop, stream = self._streams[request_id]
            batches.setdefault(loop, []).append((stream, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _run(self, engine: Engine | Callable[[], Engine], built: concurrent.futures.Future) -> None:
        try:
            self.engine = engine() if callable(engine) else engine
            # fixes this thread's torch thread count now, before anyone may lower the default (for_serving)
            logger.info("engine thread runs torch on %d threads", torch.get_num_threads())
        except BaseException as exc:  # raised by __init__ in the thread that asked for the engine
            built.set_exception(exc)
            return
        built.set_result(self.engine)
        self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            start = time.perf_counter()
            try:
                with self.engine.model_lock:  # the base router embedder runs the model on other threads
                    outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed outside any request's forward pass; aborting in-flight requests")
                self._fail_all(EngineDeadError("the engine failed while running this request"))
                continue
            seconds = time.perf_counter() - start
            for listener in self.step_listeners:
                listener(seconds)
            self._deliver([(out.request_id, out if out.error is None else RequestFailedError(out.error, out.error_code))
                           for out in outputs if out.request_id in self._streams])
            # Only after the whole step: n > 1 completions may all finish in the same step.
            for request_id in {out.request_id for out in outputs if out.finished}:
                if not self.engine.is_request_active(request_id):
                    self._streams.pop(request_id, None)
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        self._deliver([(request_id, error) for request_id in self._streams])
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        self._streams.clear()


def _put_all(batch: list[tuple[RequestStream, object]]) -> None:
    for stream, item in batch:
        stream._put(item)


class RequestStream:
    """Outputs of one request as an async iterator (or in `batches`); `aclose` (or leaving early) aborts it.

    Outputs and the request's error (an exception) are queued on the event loop by the engine thread.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, num_completions: int, lora_mix: tuple = ()):
        self.engine = engine
        self.request_id = request_id
        self.lora_mix = lora_mix  # as submitted (names, weights)
        self._items: deque[RequestOutput | Exception] = deque()
        self._waiter: asyncio.Future | None = None  # set while the consumer waits for an item
        self._remaining = num_completions

    def _put(self, item: RequestOutput | Exception) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> RequestOutput:
        item = self._items.popleft()
        if isinstance(item, Exception):
            self._remaining = 0
            raise item
        self._remaining -= item.finished
        return item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._remaining:
            raise StopAsyncIteration
        await self._wait()
        return self._take()

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """The same outputs in order, each batch every output queued by then (at least one): a consumer that
        fell behind the engine catches up in one go. The request's error is raised after the outputs before it."""
        while self._remaining:
            await self._wait()
            batch = []
            while self._items and self._remaining and not isinstance(self._items[0], Exception):
                batch.append(self._take())
            if not batch:
                self._take()  # raises the error
            yield batch

    async def aclose(self) -> None:
        if self._remaining:
            self._remaining = 0
            self.engine.abort(self.request_id)
