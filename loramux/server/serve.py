"""Run the app under uvicorn with a shutdown that ends open streams cleanly."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from loramux.config import ServerConfig

# uvicorn cancels what is still open this long after our grace period: by then every request has been
# ended with an error event, so the cancel is only a backstop.
UVICORN_BACKSTOP_SECONDS = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that starts the app's grace period as soon as it stops accepting connections."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app_state = app.state.loramux

    async def shutdown(self, sockets=None) -> None:
        self.app_state.begin_shutdown()
        await super().shutdown(sockets)


def serve(app: FastAPI, config: ServerConfig, log_level: str) -> None:
    """Serve until SIGTERM/SIGINT; open requests then get --graceful-shutdown-seconds to finish."""
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=config.graceful_shutdown_seconds + UVICORN_BACKSTOP_SECONDS)
    GracefulServer(uvicorn_config, app).run()
