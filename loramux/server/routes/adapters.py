"""Adapter management: list, describe, upload, load from a server path, delete (keys: middleware.ApiKeyAuth).

Uploads and loads do their slow part (parse, validate, sha256, cast, write
and fsync) on a worker thread; the engine thread only checks the name and
installs the finished record (`AdapterStore.prepare_*` / `install`, and
`CompositeRegistry.prepare_upload` / `install` for composite experts).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request

from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.composites.format import COMPOSITE_WEIGHTS_FILE
from loramux.engine import Engine
from loramux.server.errors import APIError
from loramux.server.schemas import LoadAdapterRequest
from loramux.server.state import ServerState


def describe(e: Engine, name: str) -> dict:
    if name in e.composites:
        return e.composites.get(name).to_json() | {"running_requests": e.composites.uses(name)}
    record = e.store.get(name)
    return record.to_json() | {"tier": e.store.tier(name), "running_requests": e.store.pinned(name)}


async def routable(state: ServerState) -> None:
    """Wait until the router has re-keyed the adapters changed so far (it embeds on its own worker)."""
    if state.router is not None:
        await asyncio.to_thread(state.router.wait_for_updates)


def adapters_router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config

    @api.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": await state.running_engine().call(
            lambda e: [describe(e, name) for name in sorted([*e.store.records, *e.composites.records])])}

    @api.get("/v1/adapters/{name}")
    async def get_adapter(name: str):
        return await state.running_engine().call(lambda e: describe(e, name))

    @api.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await state.running_engine().call(lambda e: e.remove_adapter(name))
        await routable(state)
        return {"id": name, "object": "adapter", "deleted": True}

    @api.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: Request):
        upload = await read_adapter_upload(request)
        engine = state.running_engine()
        if upload.composite:
            registry = state.engine.composites
            await engine.call(lambda e: e.composites.check_new_name(upload.name, upload.replace))
            prepared = await asyncio.to_thread(registry.prepare_upload, upload.name, upload.config_bytes,
                                               upload.weights_bytes, upload.replace)
            return await engine.call(lambda e: describe(e, e.composites.install(prepared).name))
        await engine.call(lambda e: e.store.check_new_name(upload.name, upload.replace))  # refuse early
        prepared = await asyncio.to_thread(state.engine.store.prepare_upload, upload.name, upload.config_bytes,
                                           upload.weights_bytes, upload.metadata, upload.replace)
        described = await engine.call(lambda e: describe(e, e.store.install(prepared).name))
        await routable(state)
        return described

    @api.post("/v1/adapters/load", status_code=201)
    async def load_adapter(body: LoadAdapterRequest):
        if config.adapter_load_root is None:
            raise APIError(400, "loading adapters from server paths is disabled (start with --adapter-load-root)",
                           "path", "load_disabled")
        root = Path(config.adapter_load_root).resolve()
        path = (root / body.path).resolve()
        if not path.is_relative_to(root):
            raise APIError(400, f"path must lie under the allowed root {str(root)!r}", "path", "path_not_allowed")
        metadata = {"description": body.description, "examples": body.examples}
        engine = state.running_engine()
        if (path / COMPOSITE_CONFIG_FILE).is_file():  # a composite expert (its card is in its JSON)
            await engine.call(lambda e: e.composites.check_new_name(body.name, body.replace))
            prepared = await asyncio.to_thread(state.engine.composites.prepare_path, body.name, path, body.replace)
            return await engine.call(lambda e: describe(e, e.composites.install(prepared).name))
        await engine.call(lambda e: e.store.check_new_name(body.name, body.replace))
        prepared = await asyncio.to_thread(state.engine.store.prepare_path, body.name, path, metadata, body.replace)
        described = await engine.call(lambda e: describe(e, e.store.install(prepared).name))
        await routable(state)
        return described

    return api


@dataclass
class AdapterUpload:
    """The multipart upload form of a PEFT adapter, or of a composite expert (its card lives in its JSON)."""

    name: str
    composite: bool  # loramux_composite.json + composite.safetensors, else adapter_config.json + its weights
    config_bytes: bytes
    weights_bytes: bytes
    metadata: dict  # the card: description and examples
    replace: bool


async def read_adapter_upload(request: Request) -> AdapterUpload:
    form = await request.form(max_files=2, max_fields=16)
    try:
        name = form.get("name")
        composite = form.get(COMPOSITE_CONFIG_FILE) is not None
        keys = (COMPOSITE_CONFIG_FILE, COMPOSITE_WEIGHTS_FILE) if composite else \
            ("adapter_config.json", "adapter_model.safetensors")
        files = {key: form.get(key) for key in keys}
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form field 'name' is required", "name")
        for key, upload in files.items():
            if upload is None or isinstance(upload, str):
                raise APIError(400, f"the file field {key!r} is required", key)
        config_bytes = await files[keys[0]].read()
        weights_bytes = await files[keys[1]].read()
        metadata = {"description": form.get("description") or "", "examples": _form_examples(form)}
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes")
    finally:
        await form.close()
    return AdapterUpload(name, composite, config_bytes, weights_bytes, metadata, replace)


def _form_examples(form) -> list:
    """`examples` as repeated form fields, or one field holding a JSON list."""
    values = [v for v in form.getlist("examples") if isinstance(v, str)]
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise APIError(400, f"examples is not a valid JSON list: {exc}", "examples") from exc
        return parsed
    return values
