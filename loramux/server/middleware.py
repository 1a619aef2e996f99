"""ASGI middleware: request body size limits, answered with 413 before the body is read whole."""

from __future__ import annotations

from loramux.server.errors import error_response


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over `limit` bytes (`upload_limit` on the upload path), by header or while streaming."""

    def __init__(self, app, limit: int, upload_limit: int, upload_path: str = "/v1/adapters"):
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_path = upload_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == self.upload_path else self.limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, limit)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope, receive, send, limit: int):
        response = error_response(413, f"request body exceeds the limit of {limit} bytes", None, "body_too_large")
        await response(scope, receive, send)
