"""The FastAPI app: OpenAI completions and chat (streaming too), models, adapter management, health, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramux.config import ServerConfig
from loramux.engine import Engine, RequestOutput, SamplingParams
from loramux.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from loramux.engine.sequence import LoraMix
from loramux.router import Router, RoutingDecision
from loramux.server.errors import APIError, OrjsonResponse, install_error_handlers
from loramux.server.metrics import ServerMetrics
from loramux.server.middleware import BodySizeLimit
from loramux.server.openai_format import SSE_DONE, ResponseContext, adapters_header, sse
from loramux.server.schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, SamplingFields

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    metrics: ServerMetrics
    async_engine: AsyncEngine | None = None
    started: int = field(default_factory=lambda: int(time.time()))


@dataclass
class RequestTimer:
    """Client-visible latencies of one request, observed into the histograms when it ends."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0

    def saw(self, new_tokens: int) -> None:
        if new_tokens and self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens += new_tokens


def check_key(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not token or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key")


def api_keys(config: ServerConfig) -> tuple[list[str], list[str]]:
    """(keys for the API, keys for adapter management); empty: no key needed."""
    user_keys = [k for k in (config.api_key, config.admin_api_key) if k]
    return user_keys, [config.admin_api_key] if config.admin_api_key else user_keys


def create_app(engine: Engine, config: ServerConfig, router: Router | None = None) -> FastAPI:
    """The HTTP app over `engine`; without a `router`, model 'auto' and the `router` field are refused."""
    metrics = ServerMetrics(engine, lambda: engine.last_step_num_tokens, config.metrics_per_adapter)
    state = ServerState(engine=engine, config=config, metrics=metrics)

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

    user_keys, admin_keys = api_keys(config)

    def running_engine() -> AsyncEngine:
        if state.async_engine is None:
            raise APIError(503, "the server is not ready or is shutting down", None, "not_ready",
                           {"Retry-After": "5"})
        return state.async_engine

    # ------------------------------------------------------------------ health
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        running_engine()
        return {"status": "ready", "model": engine.model_id}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ models
    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, user_keys)
        records = await running_engine().call(lambda e: list(e.store.records.values()))
        base = {"id": engine.model_id, "object": "model", "created": state.started, "owned_by": "loramux",
                "root": engine.model_id, "parent": None, "max_model_len": engine.max_model_len}
        adapters = [{"id": r.name, "object": "model", "created": int(r.created), "owned_by": "loramux",
                     "root": r.name, "parent": engine.model_id} for r in records]
        return {"object": "list", "data": [base] + adapters}

    # -------------------------------------------------------------- generation
    def named_mix(body: SamplingFields) -> LoraMix:
        entries = [(a, 1.0, 0, None) if isinstance(a, str) else (a.name, float(a.weight), a.rank_lo, a.rank_hi)
                   for a in body.adapters or []]
        if body.model != engine.model_id:
            if body.adapters:
                raise APIError(400, f"'adapters' needs 'model' to be the base model {engine.model_id!r}", "adapters")
            if body.model not in engine.store:
                raise APIError(404, f"the model {body.model!r} does not exist", "model", "model_not_found")
            entries = [(body.model, 1.0, 0, None)]
        return tuple(entries)

    async def route(body: SamplingFields, text: str) -> RoutingDecision:
        if router is None:
            raise APIError(400, "routing (model 'auto' or the 'router' field) is disabled on this server "
                                "(started with --no-router); name an adapter or use 'adapters'", "model",
                           "router_unavailable")
        if body.model not in ("auto", engine.model_id):
            raise APIError(400, "the 'router' field needs model 'auto'", "router")
        if body.adapters:
            raise APIError(400, "'adapters' cannot be combined with routing (model 'auto')", "adapters")
        options = body.router.model_dump(exclude_none=True) if body.router else {}
        decision = await asyncio.to_thread(router.route, text, **options)
        metrics.observe_routing(decision)
        return decision

    def build_sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported yet", name, "unsupported_parameter")
        if max_tokens is not None and max_tokens > config.max_completion_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                f"{config.max_completion_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens or config.default_max_tokens, temperature=float(body.temperature),
                top_p=float(body.top_p), top_k=body.top_k, min_p=float(body.min_p), seed=body.seed, n=body.n,
                stop=stop, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                logprobs=logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc), None, "invalid_value") from exc

    def finish_request(timer: RequestTimer, status: str, prompt_tokens: int, mix: LoraMix) -> None:
        metrics.requests.labels(status=status).inc()
        if status != "success":
            return
        end = time.monotonic()
        metrics.e2e.observe(end - timer.start)
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.generation_tokens.inc(timer.tokens)
        if timer.first_token is not None:
            metrics.ttft.observe(timer.first_token - timer.start)
            if timer.tokens > 1:
                metrics.tpot.observe((end - timer.first_token) / (timer.tokens - 1))
        if metrics.adapter_requests is not None:
            for name, *_ in mix:
                metrics.adapter_requests.labels(adapter=name).inc()

    async def generate(request: Request, body: SamplingFields, prompt, chat: bool, max_tokens: int | None,
                       logprobs: int | None, text_for_router: str):
        timer = RequestTimer()  # from arrival: routing counts towards time to first token
        sampling = build_sampling(body, max_tokens, logprobs)
        async_engine = running_engine()
        # Tokenize here, not on the engine thread, and hold prompts to the server's limit.
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        if config.max_prompt_tokens is not None and len(prompt_ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                                f"{config.max_prompt_tokens}", "prompt", "context_length_exceeded")
        # Counted by the engine's live streams: a stream that no client reads still ends with its request.
        if async_engine.num_requests >= config.max_concurrent_requests:
            raise APIError(429, f"the server is at its limit of {config.max_concurrent_requests} concurrent "
                                "requests; retry shortly", None, "overloaded", {"Retry-After": "1"})
        decision = None
        if body.model == "auto" or body.router is not None:
            decision = await route(body, text_for_router)

            def mix(e: Engine) -> LoraMix:  # on the engine thread as the request is added: a fusion is held at once
                return decision.lora_mix(e.store)
        else:
            mix = named_mix(body)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = await async_engine.submit(request_id, prompt_ids, sampling, mix)
        except Exception:
            metrics.requests.labels(status="rejected").inc()
            raise
        mix = stream.lora_mix
        ctx = ResponseContext(request_id, body.model, chat, mix, engine.tokenizer, logprobs is not None,
                              decision.to_json() if decision else None)
        headers = {"x-loramux-adapters": adapters_header(mix), "x-request-id": request_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(stream, ctx, timer, include_usage, mix),
                                     media_type="text/event-stream", headers=headers)
        return await collect(request, stream, ctx, timer, mix, headers)

    def observe(out, timer: RequestTimer) -> None:
        timer.saw(len(out.new_token_ids))
        if out.queue_seconds is not None:
            metrics.queue_wait.observe(out.queue_seconds)

    async def stream_events(stream: RequestStream, ctx: ResponseContext, timer: RequestTimer,
                            include_usage: bool, mix: LoraMix):
        choices: dict[int, RequestOutput] = {}
        prompt_tokens, status = 0, "aborted"
        try:
            async for out in stream:
                observe(out, timer)
                prompt_tokens = out.num_prompt_tokens
                choice = choices.setdefault(out.index, RequestOutput.accumulator(out))
                first, offset = choice.num_output_tokens == 0, len(choice.new_text)
                choice.merge(out)
                if out.new_text or out.finished or out.logprobs or first:
                    yield ctx.chunk(out.index, out.new_text, out.finish_reason, out.logprobs, offset, first)
            if include_usage:
                yield ctx.usage_chunk(prompt_tokens, sum(c.num_output_tokens for c in choices.values()))
            yield SSE_DONE
            status = "success"
        except EngineDeadError as exc:
            status = "error"
            yield sse({"error": {"message": str(exc), "type": "service_unavailable_error", "param": None,
                                 "code": "engine_unavailable"}})
            yield SSE_DONE
        finally:
            await stream.aclose()
            finish_request(timer, status, prompt_tokens, mix)

    async def collect(request: Request, stream: RequestStream, ctx: ResponseContext, timer: RequestTimer,
                      mix: LoraMix, headers: dict):
        choices: dict[int, RequestOutput] = {}
        prompt_tokens = 0

        async def drain() -> None:
            nonlocal prompt_tokens
            async for out in stream:
                observe(out, timer)
                prompt_tokens = out.num_prompt_tokens
                choices.setdefault(out.index, RequestOutput.accumulator(out)).merge(out)

        task = asyncio.ensure_future(drain())
        status = "aborted"
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
            try:
                task.result()
            except EngineDeadError as exc:
                status = "error"
                raise APIError(503, str(exc), None, "engine_unavailable", {"Retry-After": "5"}) from exc
            status = "success"
            body = ctx.full_body([choices[i] for i in sorted(choices)], prompt_tokens)
            return OrjsonResponse(body, headers=headers)
        finally:
            await stream.aclose()
            finish_request(timer, status, prompt_tokens, mix)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_key(request, user_keys)
        if body.echo or body.suffix is not None:
            raise APIError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix",
                           "unsupported_parameter")
        text = body.prompt
        if not isinstance(text, str):  # token ids: the router reads their text; bad ids are refused later
            text = engine.tokenizer.decode([t for t in body.prompt if 0 <= t < engine.shape.vocab_size])
        return await generate(request, body, body.prompt, False, body.max_tokens, body.logprobs, text)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_key(request, user_keys)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                    raise APIError(400, "only text content parts are supported", f"messages.{i}.content")
                content = "".join(part["text"] for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own errors (e.g. role order) are the client's to fix
            raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        text = "\n".join(m["content"] for m in messages if m["role"] == "user")
        return await generate(request, body, prompt, True, body.max_completion_tokens or body.max_tokens, logprobs,
                              text)

    # ---------------------------------------------------------------- adapters
    def describe(e: Engine, name: str) -> dict:
        record = e.store.get(name)
        return record.to_json() | {"tier": e.store.tier(name), "running_requests": e.store.pinned(name)}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        check_key(request, user_keys)
        return {"object": "list", "data": await running_engine().call(
            lambda e: [describe(e, name) for name in sorted(e.store.records)])}

    @app.get("/v1/adapters/{name}")
    async def get_adapter(name: str, request: Request):
        check_key(request, user_keys)
        return await running_engine().call(lambda e: describe(e, name))

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        check_key(request, admin_keys)
        await running_engine().call(lambda e: e.remove_adapter(name))
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: Request):
        check_key(request, admin_keys)
        name, config_bytes, weights_bytes, metadata, replace = await read_adapter_upload(request)
        await running_engine().call(
            lambda e: e.store.register_from_files(name, config_bytes, weights_bytes, metadata, replace=replace))
        return await running_engine().call(lambda e: describe(e, name))

    @app.post("/v1/adapters/load", status_code=201)
    async def load_adapter(body: LoadAdapterRequest, request: Request):
        check_key(request, admin_keys)
        if config.adapter_load_root is None:
            raise APIError(400, "loading adapters from server paths is disabled (start with --adapter-load-root)",
                           "path", "load_disabled")
        root = Path(config.adapter_load_root).resolve()
        path = (root / body.path).resolve()
        if not path.is_relative_to(root):
            raise APIError(400, f"path must lie under the allowed root {str(root)!r}", "path", "path_not_allowed")
        metadata = {"description": body.description, "examples": body.examples}
        await running_engine().call(lambda e: e.add_adapter(body.name, str(path), metadata, body.replace))
        return await running_engine().call(lambda e: describe(e, body.name))

    return app


async def read_adapter_upload(request: Request) -> tuple[str, bytes, bytes, dict, bool]:
    """The multipart upload form: (name, config bytes, weights bytes, card metadata, replace)."""
    form = await request.form(max_files=2, max_fields=16)
    try:
        name = form.get("name")
        files = {key: form.get(key) for key in ("adapter_config.json", "adapter_model.safetensors")}
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form field 'name' is required", "name")
        for key, upload in files.items():
            if upload is None or isinstance(upload, str):
                raise APIError(400, f"the file field {key!r} is required", key)
        config_bytes = await files["adapter_config.json"].read()
        weights_bytes = await files["adapter_model.safetensors"].read()
        metadata = {"description": form.get("description") or "", "examples": _form_examples(form)}
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes")
    finally:
        await form.close()
    return name, config_bytes, weights_bytes, metadata, replace


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
