"""Run one HTTP request through an ASGI app in the same process, streaming the response.

A replica serves the very app `loramux serve` serves (validation, errors,
streaming, metrics), so the cluster adds no second implementation of the
API; the ingress forwards the request's method, path, headers and body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass
class ResponseHead:
    """The start of a response: status and headers (as (name, value) strings)."""

    status: int
    headers: list[tuple[str, str]]
    replica: str = ""


async def asgi_request(app, method: str, path: str, query: str, headers: list[tuple[str, str]],
                       body: bytes) -> AsyncIterator[ResponseHead | bytes]:
    """Yields a ResponseHead, then the body in the chunks the app sends them.

    Leaving the iteration early tells the app that the client went away (an
    aborted stream aborts its request in the engine).
    """
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    sent: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"], [(k.decode(), v.decode()) for k, v in message["headers"]])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)
            task.cancel()
