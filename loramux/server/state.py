"""What every route of one server shares: the engine, its async front, settings, metrics, admission and shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field

from loramux.config import ServerConfig
from loramux.engine import Engine
from loramux.engine.async_engine import AsyncEngine, ServerStoppingError
from loramux.router import Router
from loramux.server.errors import APIError
from loramux.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class Admission:
    """One admitted request's place under --max-concurrent-requests; `release` is idempotent."""

    def __init__(self, state: ServerState):
        self._state = state
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.admitted -= 1
            self._state.metrics.admitted.dec()


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    metrics: ServerMetrics
    router: Router | None = None  # None: model 'auto' and the `router` field are refused
    async_engine: AsyncEngine | None = None  # set while the app runs (lifespan)
    started: int = field(default_factory=lambda: int(time.time()))
    admitted: int = 0  # requests between admission and their response's end
    grace_over: asyncio.Event = field(default_factory=asyncio.Event)  # set when the shutdown grace period ends

    @property
    def user_keys(self) -> list[str]:
        return [k for k in (self.config.api_key, self.config.admin_api_key) if k]

    @property
    def admin_keys(self) -> list[str]:
        return [self.config.admin_api_key] if self.config.admin_api_key else self.user_keys

    @property
    def admin_locked(self) -> bool:
        """Adapter writes refused: reachable beyond loopback, no key guards them, and no explicit opt-out."""
        return not (self.admin_keys or is_loopback(self.config.host) or self.config.allow_unauthenticated_admin)

    def running_engine(self) -> AsyncEngine:
        if self.async_engine is None or self.grace_over.is_set():
            raise APIError(503, "the server is not ready or is shutting down", None, "not_ready",
                           {"Retry-After": "5"})
        return self.async_engine

    def admit(self) -> Admission:
        """Take a place under the concurrency limit or answer 429; no await between the check and the count."""
        if self.admitted >= self.config.max_concurrent_requests:
            raise APIError(429, f"the server is at its limit of {self.config.max_concurrent_requests} concurrent "
                                "requests; retry shortly", None, "overloaded", {"Retry-After": "1"})
        self.admitted += 1
        self.metrics.admitted.inc()
        return Admission(self)

    def begin_shutdown(self) -> None:
        """Called once the server stops accepting connections: open requests get the grace period to finish."""
        grace = self.config.graceful_shutdown_seconds
        logger.info("shutting down: %d request(s) open, %.0f s to finish", self.admitted, grace)
        asyncio.get_running_loop().call_later(grace, lambda: asyncio.ensure_future(self._end_grace()))

    async def _end_grace(self) -> None:
        self.grace_over.set()
        if self.async_engine is not None and self.admitted:
            logger.warning("grace period over: ending %d open request(s) with an error", self.admitted)
            await self.async_engine.abort_all(ServerStoppingError("the server is shutting down; retry the request"))
