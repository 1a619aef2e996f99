"""The FastAPI app: state, lifespan, middleware and error handlers around the routers in `routes/`."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramux.config import ServerConfig
from loramux.engine import Engine
from loramux.engine.async_engine import AsyncEngine
from loramux.router import Router
from loramux.server.errors import OrjsonResponse, install_error_handlers
from loramux.server.metrics import ServerMetrics
from loramux.server.middleware import BodySizeLimit
from loramux.server.routes.adapters import adapters_router
from loramux.server.routes.health import health_router
from loramux.server.routes.inference import inference_router
from loramux.server.state import ServerState


def create_app(engine: Engine, config: ServerConfig, router: Router | None = None) -> FastAPI:
    """The HTTP app over `engine`; without a `router`, model 'auto' and the `router` field are refused."""
    metrics = ServerMetrics(engine, lambda: engine.last_step_num_tokens, config.metrics_per_adapter)
    state = ServerState(engine=engine, config=config, metrics=metrics, router=router)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.async_engine = AsyncEngine(engine)
        state.async_engine.step_listeners.append(metrics.step.observe)
        yield
        async_engine, state.async_engine = state.async_engine, None
        async_engine.shutdown()

    app = FastAPI(title="loramux", version="0.1.0", default_response_class=OrjsonResponse, lifespan=lifespan)
    app.state.loramux = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes,
                       upload_limit=engine.config.store.max_adapter_bytes + 2**20)
    for api in (health_router(state), inference_router(state), adapters_router(state)):
        app.include_router(api)
    return app
