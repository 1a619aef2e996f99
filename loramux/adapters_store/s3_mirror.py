"""Keep one engine's adapters equal to an S3 adapter store's: poll, fetch, register, remove.

The mirror changes the engine only through its adapter store: the slow part
of a registration (read, sha256, validate, cast) runs on a worker thread
(`prepare_path`), the engine thread only installs the result (`install`, run
by `call`, i.e. `AsyncEngine.call`); downloads and S3 requests run on worker
threads too. Every `poll_seconds` it lists the manifests: a new or changed
version is fetched into the local cache (checksums verified) and registered,
a vanished one is removed. A refused version (corrupt, invalid, name taken)
is not fetched again until its manifest names another version; one refused
because the old version is in use is retried at every poll. Polls, uploads
and deletes run one at a time (`_lock`). So a server sees another server's upload or delete within
`poll_seconds` plus one download. While the store is unreachable the engine
keeps what it has; at start-up, the newest cached versions serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

from loramux.adapters_store.peft_format import AdapterError
from loramux.adapters_store.s3_store import AdapterManifest, AdapterStoreUnavailable, S3AdapterStore

logger = logging.getLogger(__name__)

EngineCall = Callable[[Callable], Awaitable]  # runs fn(engine) on the engine thread, returns its result
DEFAULT_POLL_SECONDS = 5.0


class S3AdapterMirror:
    def __init__(self, store: S3AdapterStore, call: EngineCall, poll_seconds: float = DEFAULT_POLL_SECONDS):
        self.store = store
        self.call = call
        self.poll_seconds = poll_seconds
        self.served: dict[str, str] = {}  # adapter name -> version registered in the engine
        self.errors: dict[str, AdapterError] = {}  # adapter name -> why its current version is refused
        self.refused: dict[str, str] = {}  # adapter name -> refused version, skipped until the manifest changes
        self._lock = asyncio.Lock()  # one sync, upload or delete at a time (each reads and changes `served`)
        self.last_sync: float | None = None  # time.time() of the last complete sync
        self.last_error: str | None = None  # the store's error while it is unreachable

    # ------------------------------------------------------------ syncing
    async def start(self) -> None:
        """First sync; if the store is unreachable, serve the cached versions instead."""
        async with self._lock:
            try:
                await self._sync()
                for name in set(self.store.cached()) - set(self.served):  # deleted while this server was down
                    self.store.drop_cached(name)
            except AdapterStoreUnavailable as exc:
                self.last_error = str(exc)
                logger.warning("%s; serving the %d adapters cached in %s", exc, len(self.store.cached()),
                               self.store.cache_dir)
                for name, folder in self.store.cached().items():
                    if self.served.get(name) != folder.name:
                        await self._register_or_refuse(name, folder)

    async def run(self) -> None:
        """Poll forever (cancel to stop); outages are logged once and retried."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync_once()
            except AdapterStoreUnavailable as exc:
                if self.last_error is None:
                    logger.warning("%s; adapters already served stay served", exc)
                self.last_error = str(exc)
            except Exception:  # one bad poll must not end the mirror
                logger.exception("adapter store sync failed")

    async def sync_once(self) -> None:
        """Make the engine serve exactly the bucket's current versions. Raises AdapterStoreUnavailable."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        manifests = await asyncio.to_thread(self.store.manifests)
        for name, manifest in sorted(manifests.items()):
            await self._install(manifest)
        for name in sorted(set(self.served) - set(manifests)):
            await self._remove(name)
        for name in set(self.refused) - set(manifests):
            del self.refused[name]
            self.errors.pop(name, None)
        self.last_sync, self.last_error = time.time(), None

    async def _install(self, manifest: AdapterManifest) -> None:
        """Fetch and register `manifest`'s version unless it is served or was refused already."""
        name = manifest.name
        if manifest.version in (self.served.get(name), self.refused.get(name)):
            return
        try:
            folder = await asyncio.to_thread(self.store.fetch, manifest)
        except AdapterStoreUnavailable:
            raise
        except AdapterError as exc:
            self._refuse(name, manifest.version, exc)
            return
        await self._register_or_refuse(name, folder)

    async def _register_or_refuse(self, name: str, folder: Path) -> None:
        try:
            await self._register(name, folder)
        except AdapterError as exc:
            self._refuse(name, folder.name, exc)

    async def _register(self, name: str, folder: Path) -> None:
        replace = name in self.served
        await self.call(lambda e: e.store.check_new_name(name, replace))  # refuse early, before the slow part
        engine_store = await self.call(lambda e: e.store)
        prepared = await asyncio.to_thread(engine_store.prepare_path, name, folder, None, replace)
        record = await self.call(lambda e: e.store.install(prepared))
        logger.info("adapter %s version %s: rank %d, targets %s", name, folder.name, record.rank,
                    ",".join(record.target_modules))
        self.served[name] = folder.name
        self.errors.pop(name, None)
        self.refused.pop(name, None)
        self.store.drop_cached(name, keep=folder.name)

    def _refuse(self, name: str, version: str, exc: AdapterError) -> None:
        if str(self.errors.get(name)) != str(exc):
            logger.error("adapter %s version %s refused: %s", name, version, exc)
        self.errors[name] = exc
        if exc.code != "in_use":  # an adapter in use is replaced at a later poll, once it is free
            self.refused[name] = version
            self.store.drop_cached(name, keep=self.served.get(name))

    async def _remove(self, name: str) -> None:
        try:
            await self.call(lambda e: e.remove_adapter(name))
        except AdapterError as exc:
            if exc.code != "not_found":
                raise
        del self.served[name]
        self.errors.pop(name, None)
        # The files stay until the next start: requests still running on the adapter may page it in again.

    # ------------------------------------------------------------ changes from this server
    async def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, metadata: dict,
                     replace: bool) -> None:
        """Check the name and validate against this engine, publish to the bucket, and serve it here at once.

        Nothing is written to the bucket for a refused adapter. A name this mirror serves may be replaced
        by the bucket's rules (the bucket refuses it without `replace`).
        """
        async with self._lock:
            await self.call(lambda e: e.store.check_new_name(name, replace or name in self.served))
            engine_store = await self.call(lambda e: e.store)
            await asyncio.to_thread(engine_store.validate, config_bytes, weights_bytes)  # off the engine thread
            manifest = await asyncio.to_thread(self.store.upload, name, config_bytes, weights_bytes, metadata,
                                               replace)
            await self._install(manifest)
            if name in self.errors:  # published, but this engine could not take it (e.g. the old one is in use)
                raise self.errors[name]

    async def delete(self, name: str) -> None:
        """Unpublish from the bucket and stop serving here at once."""
        async with self._lock:
            await asyncio.to_thread(self.store.delete, name)
            if name in self.served:
                await self._remove(name)
            self.refused.pop(name, None)
            self.errors.pop(name, None)
