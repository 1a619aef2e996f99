"""From a validated request body to a response: sampling, adapter mix or routing, submission, streaming or collecting."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from loramux.engine import Engine, RequestOutput, SamplingParams
from loramux.engine.async_engine import EngineDeadError, RequestFailedError, RequestStream
from loramux.engine.sequence import LoraMix
from loramux.router import RoutingDecision
from loramux.server.errors import STATUS_TYPE, APIError, OrjsonResponse
from loramux.server.openai_format import SSE_DONE, ResponseContext, adapters_header, display_mix, sse
from loramux.server.schemas import SamplingFields
from loramux.server.state import Admission, ServerState

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class RequestRecord:
    """What one request did: client-visible latencies, tokens and final status, observed into metrics at its end."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    status: str = "aborted"

    def saw(self, out: RequestOutput) -> None:
        if out.new_token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens += len(out.new_token_ids)
        self.prompt_tokens = out.num_prompt_tokens


@dataclass
class Prompt:
    """A request's prompt before tokenisation; both callables run on the tokenizer thread after admission."""

    chars: int  # its text's length, for the size check before any tokenising (0 for token ids)
    token_ids: Callable[[], list[int]]
    router_text: Callable[[], str]  # what the router reads; called only for routed requests
    param: str = "prompt"


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends, even when its body was never iterated."""

    def __init__(self, content, on_close: Callable, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


class Generation:
    """The generation path shared by /v1/completions and /v1/chat/completions."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        self.config = state.config
        self.metrics = state.metrics
        self.max_prompt_tokens = min(state.config.max_prompt_tokens or state.engine.max_model_len,
                                     state.engine.max_model_len)
        # No token spans more characters than the longest vocabulary entry (+1 for a decoded word marker):
        # a prompt longer than max_prompt_tokens such tokens is refused without tokenising it.
        self.max_token_chars = max(map(len, state.engine.tokenizer.get_vocab())) + 1
        # One thread: the tokenizer is not safe to share between threads, and tokenising never blocks the loop.
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-tokenize")

    def check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the prompt limit, before spending time on tokenising it."""
        if chars > self.max_prompt_tokens * self.max_token_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than {self.max_prompt_tokens} tokens "
                                "(this server's prompt limit) can hold", param, "context_length_exceeded")

    async def off_loop(self, fn: Callable, *args):
        """Run tokenizer work (encoding, chat templates) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)

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
        composite = options.get("composite")
        if composite is not None and composite not in self.engine.composites:
            raise APIError(404, f"the composite {composite!r} does not exist", "router.composite", "model_not_found")
        try:
            decision = await asyncio.to_thread(router.route, text, **options)
        except ValueError as exc:
            raise APIError(400, str(exc), "router.composite", "invalid_value") from exc
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

    def finish_request(self, record: RequestRecord, mix: LoraMix) -> None:
        metrics = self.metrics
        metrics.requests.labels(status=record.status).inc()
        if record.status != "success":
            return
        end = time.monotonic()
        metrics.e2e.observe(end - record.start)
        metrics.prompt_tokens.inc(record.prompt_tokens)
        metrics.generation_tokens.inc(record.tokens)
        if record.first_token is not None:
            metrics.ttft.observe(record.first_token - record.start)
            if record.tokens > 1:
                metrics.tpot.observe((end - record.first_token) / (record.tokens - 1))
        if metrics.adapter_requests is not None:
            for name, *_ in mix:
                metrics.adapter_requests.labels(adapter=name).inc()

    async def generate(self, request: Request, body: SamplingFields, prompt: Prompt, chat: bool,
                       max_tokens: int | None, logprobs: int | None):
        """Check cheaply, admit, tokenise (off the event loop), route or name the mix, submit, stream or collect."""
        record = RequestRecord()  # from arrival: routing counts towards time to first token
        sampling = self.build_sampling(body, max_tokens, logprobs)
        self.state.running_engine()
        self.check_prompt_size(prompt.chars, prompt.param)
        admission = self.state.admit()
        try:
            return await self._admitted(request, body, prompt, chat, sampling, logprobs, record, admission)
        except BaseException:
            admission.release()
            raise

    async def _admitted(self, request: Request, body: SamplingFields, prompt: Prompt, chat: bool,
                        sampling: SamplingParams, logprobs: int | None, record: RequestRecord, admission: Admission):
        engine = self.engine
        prompt_ids = await self.off_loop(prompt.token_ids)
        if len(prompt_ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}", prompt.param, "context_length_exceeded")
        decision = None
        if body.model == "auto" or body.router is not None:
            decision = await self.route(body, await self.off_loop(prompt.router_text))

            def mix(e: Engine) -> LoraMix:  # on the engine thread as the request is added: a fusion is held at once
                return decision.lora_mix(e.store)
        else:
            mix = self.named_mix(body)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = await self.state.running_engine().submit(request_id, prompt_ids, sampling, mix)
        except Exception:
            self.metrics.requests.labels(status="rejected").inc()
            raise
        mix = display_mix(stream.lora_mix)

        closed = False

        async def close() -> None:  # however the response ends: abort what runs, count it, free the place
            nonlocal closed
            if not closed:
                closed = True
                await stream.aclose()
                admission.release()
                self.finish_request(record, mix)

        ctx = ResponseContext(request_id, body.model, chat, mix, engine.tokenizer, logprobs is not None,
                              decision.to_json() if decision else None)
        headers = {"x-loramux-adapters": adapters_header(mix), "x-request-id": request_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return ClosingStreamingResponse(self.stream_events(stream, ctx, record, include_usage), close,
                                            media_type="text/event-stream", headers=headers)
        try:
            return await self.collect(request, stream, ctx, record, headers)
        finally:
            await close()

    def observe(self, out: RequestOutput, record: RequestRecord) -> None:
        record.saw(out)
        if out.queue_seconds is not None:
            self.metrics.queue_wait.observe(out.queue_seconds)
        if out.composite is not None:
            self.metrics.observe_composite(out.composite)

    async def stream_events(self, stream: RequestStream, ctx: ResponseContext, record: RequestRecord,
                            include_usage: bool):
        """SSE chunks, then [DONE]; an engine failure or the end of the shutdown grace period becomes an
        OpenAI-format error event followed by [DONE]. Clean-up is the response's `on_close`.

        The outputs queued by the time this runs go out in one write, each still its own event: a client (or
        event loop) that fell behind the engine catches up without a send per token.
        """
        tokens: dict[int, int] = {}  # output tokens so far, by completion index
        chars: dict[int, int] = {}  # text characters sent so far, by completion index (legacy text_offset)
        try:
            async for batch in stream.batches():
                events = []
                for out in batch:
                    self.observe(out, record)
                    first, offset = out.index not in tokens, chars.get(out.index, 0)
                    tokens[out.index], chars[out.index] = out.num_output_tokens, offset + len(out.new_text)
                    if out.new_text or out.finished or out.logprobs or first:
                        events.append(ctx.chunk(out.index, out.new_text, out.finish_reason, out.logprobs, offset,
                                                first, out.composite))
                if events:
                    yield b"".join(events)
            usage = ctx.usage_chunk(record.prompt_tokens, sum(tokens.values())) if include_usage else b""
            yield usage + SSE_DONE
            record.status = "success"
        except RequestFailedError as exc:
            record.status = "error"
            yield sse({"error": {"message": str(exc), "type": STATUS_TYPE[exc.status], "param": None,
                                 "code": exc.code}}) + SSE_DONE

    async def collect(self, request: Request, stream: RequestStream, ctx: ResponseContext, record: RequestRecord,
                      headers: dict):
        choices: dict[int, RequestOutput] = {}

        async def drain() -> None:
            async for out in stream:
                self.observe(out, record)
                choices.setdefault(out.index, RequestOutput.accumulator(out)).merge(out)

        task = asyncio.ensure_future(drain())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
        try:
            task.result()
        except RequestFailedError as exc:
            record.status = "error"
            retry = {"Retry-After": "5"} if isinstance(exc, EngineDeadError) else None
            raise APIError(exc.status, str(exc), None, exc.code, retry) from exc
        record.status = "success"
        body = ctx.full_body([choices[i] for i in sorted(choices)], record.prompt_tokens)
        return OrjsonResponse(body, headers=headers)
