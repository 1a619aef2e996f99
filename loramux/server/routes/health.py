"""Probes and Prometheus metrics; no API key, so that orchestrators and scrapers need none."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramux.server.state import ServerState


def health_router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    @api.get("/ready")
    async def ready():
        state.running_engine()
        return {"status": "ready", "model": state.engine.model_id}

    @api.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api
