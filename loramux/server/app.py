"""The FastAPI app: state, lifespan, middleware and error handlers around the routers in `routes/`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramux.config import ServerConfig
from loramux.engine import Engine
from loramux.engine.async_engine import AsyncEngine
from loramux.router import Router
from loramux.server.errors import OrjsonResponse, install_error_handlers
from loramux.server.metrics import ServerMetrics
from loramux.server.middleware import ApiKeyAuth, BodySizeLimit
from loramux.server.routes.adapters import adapters_router
from loramux.server.routes.health import health_router
from loramux.server.routes.inference import inference_router
from loramux.server.state import ServerState

logger = logging.getLogger(__name__)


def create_app(engine: Engine, config: ServerConfig, router: Router | None = None,
               async_engine: AsyncEngine | None = None) -> FastAPI:
    """The HTTP app over `engine`; without a `router`, model 'auto' and the `router` field are refused.

    `async_engine`, a loop already running over `engine` (`loramux serve` builds the engine on that loop's
    thread, see AsyncEngine), serves the app's first start; otherwise each start runs a new loop.
    """
    metrics = ServerMetrics(engine, lambda: engine.last_step_num_tokens, config.metrics_per_adapter)
    state = ServerState(engine=engine, config=config, metrics=metrics, router=router)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal async_engine
        state.async_engine, async_engine = async_engine or AsyncEngine(engine), None
        state.async_engine.step_listeners.append(metrics.step.observe)
        yield
        running, state.async_engine = state.async_engine, None
        running.shutdown()

    app = FastAPI(title="loramux", version="0.1.0", default_response_class=OrjsonResponse, lifespan=lifespan)
    app.state.loramux = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes,
                       upload_limit=engine.config.store.max_adapter_bytes + 2**20)
    # Added last, so it runs first: a request without a valid key is refused before its body is read.
    app.add_middleware(ApiKeyAuth, user_keys=state.user_keys, admin_keys=state.admin_keys,
                       admin_locked=state.admin_locked)
    if state.admin_locked:
        logger.warning("adapter uploads, loads and deletes are refused: %s is not a loopback address and no admin "
                       "key is set (--admin-api-key, or --allow-unauthenticated-admin)", config.host)
    for api in (health_router(state), inference_router(state), adapters_router(state)):
        app.include_router(api)
    return app
