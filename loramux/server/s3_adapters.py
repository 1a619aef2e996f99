"""Serve adapters from an S3 adapter store: uploads and deletes go to the bucket, a mirror follows it.

Keys are checked by the app's middleware (admin paths) before these routes run.

`attach_s3_store(app, store, poll_seconds)` puts two routes in front of the
app's own (`POST /v1/adapters`, `DELETE /v1/adapters/{name}`; same bodies, and
like them they answer once the router has re-keyed the change) and runs an
`S3AdapterMirror` for the app's lifetime, so every server on the bucket sees
every upload and delete within `poll_seconds`.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request

from loramux.adapters_store.s3_mirror import S3AdapterMirror
from loramux.adapters_store.s3_store import S3AdapterStore
from loramux.server.errors import APIError
from loramux.server.routes.adapters import describe, read_adapter_upload, routable


def attach_s3_store(app: FastAPI, store: S3AdapterStore, poll_seconds: float) -> None:
    state = app.state.loramux
    serve_app_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI):
        async with serve_app_lifespan(app_):
            mirror = S3AdapterMirror(store, state.running_engine().call, poll_seconds)
            app.state.s3_mirror = mirror
            await mirror.start()
            task = asyncio.create_task(mirror.run())
            try:
                yield
            finally:
                task.cancel()

    router = APIRouter()

    @router.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: Request):
        upload = await read_adapter_upload(request)
        if upload.composite:
            raise APIError(400, "composite experts are not stored in S3; upload them to a server with a local "
                                "--adapter-store", "loramux_composite.json", "unsupported_parameter")
        await app.state.s3_mirror.upload(upload.name, upload.config_bytes, upload.weights_bytes, upload.metadata,
                                         upload.replace)
        described = await state.running_engine().call(lambda e: describe(e, upload.name))
        await routable(state)
        return described

    @router.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await app.state.s3_mirror.delete(name)
        await routable(state)
        return {"id": name, "object": "adapter", "deleted": True}

    app.router.lifespan_context = lifespan
    own_routes = list(app.router.routes)
    app.include_router(router)
    # Starlette matches routes in order: these take over the app's local-directory versions.
    app.router.routes[:] = [r for r in app.router.routes if r not in own_routes] + own_routes
