"""Send planned requests over HTTP (OpenAI streaming API) and time them from the client's side."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import httpx

from loadtest.traffic import PlannedRequest


@dataclass
class RequestResult:
    adapters: tuple[str, ...]
    start: float  # seconds since the run began
    ttft: float | None = None  # time to first token
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None
    cold: bool = False  # the first request in this run to name its adapter(s)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send(client: httpx.AsyncClient, planned: PlannedRequest, t0: float) -> RequestResult:
    """One streaming completion; never raises (errors are part of the result)."""
    result = RequestResult(planned.adapters, time.monotonic() - t0)
    sent = time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=planned.body) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "stream error")
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    if result.ttft is None:
                        result.ttft = time.monotonic() - sent
        result.e2e = time.monotonic() - sent
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def send_openai(client, planned: PlannedRequest, t0: float) -> RequestResult:
    """The same request through the official openai client, timed the same way: an independent check of `send`."""
    import openai

    result = RequestResult(planned.adapters, time.monotonic() - t0)
    body = dict(planned.body)
    known = {k: body.pop(k) for k in ("model", "prompt", "max_tokens", "temperature", "stream", "stream_options")}
    sent = time.monotonic()
    try:
        stream = await client.completions.create(**known, extra_body=body)
        async for chunk in stream:
            if chunk.usage is not None:
                result.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text and result.ttft is None:
                result.ttft = time.monotonic() - sent
        result.e2e = time.monotonic() - sent
    except openai.OpenAIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


Sender = Callable[[object, PlannedRequest, float], Awaitable[RequestResult]]


async def run_open_loop(sender: Sender, client, planned: list[PlannedRequest], send_times: list[float],
                        deadline: float, on_done: Callable[[], None]) -> list[RequestResult]:
    """Send each request at its time (Poisson arrivals), regardless of answers; stop sending at the deadline."""
    t0 = time.monotonic()

    async def one(request: PlannedRequest, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        result = await sender(client, request, t0)
        on_done()
        return result

    tasks = [one(r, at) for r, at in zip(planned, send_times) if at < deadline]
    return list(await asyncio.gather(*tasks))


async def run_closed_loop(sender: Sender, client, planned: list[PlannedRequest], users: int, deadline: float,
                          on_done: Callable[[], None]) -> list[RequestResult]:
    """`users` clients, each sending its next request when the last one ends, until the plan or the deadline runs out."""
    t0 = time.monotonic()
    queue = list(reversed(planned))
    results: list[RequestResult] = []

    async def user() -> None:
        while queue and time.monotonic() - t0 < deadline:
            results.append(await sender(client, queue.pop(), t0))
            on_done()

    await asyncio.gather(*(user() for _ in range(users)))
    return results


def mark_cold(results: list[RequestResult]) -> None:
    """Flag each adapter's first request of the run (in start order): it may have waited for a page-in."""
    seen: set[str] = set()
    for result in sorted(results, key=lambda r: r.start):
        result.cold = bool(result.adapters) and not set(result.adapters) <= seen
        seen.update(result.adapters)
