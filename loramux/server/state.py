"""What every route of one server shares: the engine, its async front, settings, metrics and API keys."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from loramux.config import ServerConfig
from loramux.engine import Engine
from loramux.engine.async_engine import AsyncEngine
from loramux.router import Router
from loramux.server.errors import APIError
from loramux.server.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    metrics: ServerMetrics
    router: Router | None = None  # None: model 'auto' and the `router` field are refused
    async_engine: AsyncEngine | None = None  # set while the app runs (lifespan)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def user_keys(self) -> list[str]:
        return [k for k in (self.config.api_key, self.config.admin_api_key) if k]

    @property
    def admin_keys(self) -> list[str]:
        return [self.config.admin_api_key] if self.config.admin_api_key else self.user_keys

    def running_engine(self) -> AsyncEngine:
        if self.async_engine is None:
            raise APIError(503, "the server is not ready or is shutting down", None, "not_ready",
                           {"Retry-After": "5"})
        return self.async_engine


def check_key(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not token or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key")
