"""Adapter management: list, describe, upload, load from a server path, delete."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request

from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.composites.format import COMPOSITE_WEIGHTS_FILE
from loramux.engine import Engine
from loramux.server.errors import APIError
from loramux.server.schemas import LoadAdapterRequest
from loramux.server.state import ServerState, check_key


def describe(e: Engine, name: str) -> dict:
    if name in e.composites:
        return e.composites.get(name).to_json() | {"running_requests": e.composites.uses(name)}
    record = e.store.get(name)
    return record.to_json() | {"tier": e.store.tier(name), "running_requests": e.store.pinned(name)}


def adapters_router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config

    @api.get("/v1/adapters")
    async def list_adapters(request: Request):
        check_key(request, state.user_keys)
        return {"object": "list", "data": await state.running_engine().call(
            lambda e: [describe(e, name) for name in sorted([*e.store.records, *e.composites.records])])}

    @api.get("/v1/adapters/{name}")
    async def get_adapter(name: str, request: Request):
        check_key(request, state.user_keys)
        return await state.running_engine().call(lambda e: describe(e, name))

    @api.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        check_key(request, state.admin_keys)
        await state.running_engine().call(lambda e: e.remove_adapter(name))
        return {"id": name, "object": "adapter", "deleted": True}

    @api.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: Request):
        check_key(request, state.admin_keys)
        form = await request.form(max_files=2, max_fields=16)
        try:
            name = form.get("name")
            # A PEFT adapter, or a composite expert (its card lives in its JSON).
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
        if composite:
            await state.running_engine().call(
                lambda e: e.composites.register_from_files(name, config_bytes, weights_bytes, replace=replace))
        else:
            await state.running_engine().call(
                lambda e: e.store.register_from_files(name, config_bytes, weights_bytes, metadata, replace=replace))
        return await state.running_engine().call(lambda e: describe(e, name))

    @api.post("/v1/adapters/load", status_code=201)
    async def load_adapter(body: LoadAdapterRequest, request: Request):
        check_key(request, state.admin_keys)
        if config.adapter_load_root is None:
            raise APIError(400, "loading adapters from server paths is disabled (start with --adapter-load-root)",
                           "path", "load_disabled")
        root = Path(config.adapter_load_root).resolve()
        path = (root / body.path).resolve()
        if not path.is_relative_to(root):
            raise APIError(400, f"path must lie under the allowed root {str(root)!r}", "path", "path_not_allowed")
        metadata = {"description": body.description, "examples": body.examples}
        await state.running_engine().call(lambda e: e.add_adapter(body.name, str(path), metadata, body.replace))
        return await state.running_engine().call(lambda e: describe(e, body.name))

    return api


def _form_examples(form) -> list:
    """`examples` as repeated form fields, or one field holding a JSON list."""
    values = [v for v in form.getlist("examples") if isinstance(v, str)]
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise APIError(400, f"examples is not a valid JSON list: {exc}", "examples") from exc
        return parsed
    return values
