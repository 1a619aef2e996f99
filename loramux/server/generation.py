"""From a validated request body to a response: sampling, adapter mix or routing, submission, streaming or collecting."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from loramux.engine import Engine, RequestOutput, SamplingParams
from loramux.engine.async_engine import EngineDeadError, RequestStream
from loramux.engine.sequence import LoraMix
from loramux.router import RoutingDecision
from loramux.server.errors import APIError, OrjsonResponse
from loramux.server.openai_format import SSE_DONE, ResponseContext, adapters_header, display_mix, sse
from loramux.server.schemas import SamplingFields
from loramux.server.state import ServerState

DISCONNECT_POLL_SECONDS = 0.25


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


class Generation:
    """The generation path shared by /v1/completions and /v1/chat/completions."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        self.config = state.config
        self.metrics = state.metrics

    def named_mix(self, body: SamplingFields) -> LoraMix:
        engine = self.engine
        entries = [(a, 1.0, 0, None) if isinstance(a, str) else
                   {"name": a.name, **a.options()} if a.options() else (a.name, float(a.weight), a.rank_lo, a.rank_hi)
                   for a in body.adapters or []]
        if body.model != engine.model_id:
            if body.adapters:
                raise APIError(400, f"'adapters' needs 'model' to be the base model {engine.model_id!r}", "adapters")
            if body.model not in engine.store and body.model not in engine.composites:
                raise APIError(404, f"the model {body.model!r} does not exist", "model", "model_not_found")
            entries = [{"name": body.model, **(body.composite.options() if body.composite else {})}]
        elif body.composite is not None:
            raise APIError(400, "'composite' needs 'model' to name a composite expert; in 'adapters' put the "
                                "options in the composite's entry", "composite")
        return tuple(entries)

    async def route(self, body: SamplingFields, text: str) -> RoutingDecision:
        router = self.state.router
        if router is None:
            raise APIError(400, "routing (model 'auto' or the 'router' field) is disabled on this server "
                                "(started with --no-router); name an adapter or use 'adapters'", "model",
                           "router_unavailable")
        if body.model not in ("auto", self.engine.model_id):
            raise APIError(400, "the 'router' field needs model 'auto'", "router")
        if body.adapters:
            raise APIError(400, "'adapters' cannot be combined with routing (model 'auto')", "adapters")
        options = body.router.model_dump(exclude_none=True) if body.router else {}
        decision = await asyncio.to_thread(router.route, text, **options)
        self.metrics.observe_routing(decision)
        return decision

    def build_sampling(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        config = self.config
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

    def finish_request(self, timer: RequestTimer, status: str, prompt_tokens: int, mix: LoraMix) -> None:
        metrics = self.metrics
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

    async def generate(self, request: Request, body: SamplingFields, prompt, chat: bool, max_tokens: int | None,
                       logprobs: int | None, text_for_router: str):
        engine, config = self.engine, self.config
        timer = RequestTimer()  # from arrival: routing counts towards time to first token
        sampling = self.build_sampling(body, max_tokens, logprobs)
        async_engine = self.state.running_engine()
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
            decision = await self.route(body, text_for_router)

            def mix(e: Engine) -> LoraMix:  # on the engine thread as the request is added: a fusion is held at once
                return decision.lora_mix(e.store)
        else:
            mix = self.named_mix(body)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = await async_engine.submit(request_id, prompt_ids, sampling, mix)
        except Exception:
            self.metrics.requests.labels(status="rejected").inc()
            raise
        mix = display_mix(stream.lora_mix)
        ctx = ResponseContext(request_id, body.model, chat, mix, engine.tokenizer, logprobs is not None,
                              decision.to_json() if decision else None)
        headers = {"x-loramux-adapters": adapters_header(mix), "x-request-id": request_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream_events(stream, ctx, timer, include_usage, mix),
                                     media_type="text/event-stream", headers=headers)
        return await self.collect(request, stream, ctx, timer, mix, headers)

    def observe(self, out, timer: RequestTimer) -> None:
        timer.saw(len(out.new_token_ids))
        if out.queue_seconds is not None:
            self.metrics.queue_wait.observe(out.queue_seconds)
        if out.composite is not None:
            self.metrics.observe_composite(out.composite)

    async def stream_events(self, stream: RequestStream, ctx: ResponseContext, timer: RequestTimer,
                            include_usage: bool, mix: LoraMix):
        choices: dict[int, RequestOutput] = {}
        prompt_tokens, status = 0, "aborted"
        try:
            async for out in stream:
                self.observe(out, timer)
                prompt_tokens = out.num_prompt_tokens
                choice = choices.setdefault(out.index, RequestOutput.accumulator(out))
                first, offset = choice.num_output_tokens == 0, len(choice.new_text)
                choice.merge(out)
                if out.new_text or out.finished or out.logprobs or first:
                    yield ctx.chunk(out.index, out.new_text, out.finish_reason, out.logprobs, offset, first,
                                    out.composite)
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
            self.finish_request(timer, status, prompt_tokens, mix)

    async def collect(self, request: Request, stream: RequestStream, ctx: ResponseContext, timer: RequestTimer,
                      mix: LoraMix, headers: dict):
        choices: dict[int, RequestOutput] = {}
        prompt_tokens = 0

        async def drain() -> None:
            nonlocal prompt_tokens
            async for out in stream:
                self.observe(out, timer)
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
            self.finish_request(timer, status, prompt_tokens, mix)
