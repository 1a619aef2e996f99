"""ASGI middleware that answers before the body is read: API keys (401/403) and body size limits (413)."""

from __future__ import annotations

import hmac

from loramux.server.errors import error_response

ADMIN_PATH = "/v1/adapters"  # its writes (upload, load, delete) need the admin key; reads the user key


class ApiKeyAuth:
    """Check the API key from the headers alone, so that a keyless request gets 401 whatever its body.

    Paths under /v1 need a user key (or the admin key); writes under /v1/adapters need the admin key.
    With `admin_locked`, those writes are refused outright (403): the server listens beyond loopback
    with no admin key and was not started with --allow-unauthenticated-admin.
    """

    def __init__(self, app, user_keys: list[str], admin_keys: list[str], admin_locked: bool):
        self.app = app
        self.user_keys = [k.encode() for k in user_keys]
        self.admin_keys = [k.encode() for k in admin_keys]
        self.admin_locked = admin_locked

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            admin = scope["path"].startswith(ADMIN_PATH) and scope["method"] not in ("GET", "HEAD")
            if admin and self.admin_locked:
                return await error_response(
                    403, "adapter management is disabled: the server listens on a non-loopback address without "
                         "an admin key (set --admin-api-key or LORAMUX_ADMIN_API_KEY, or start with "
                         "--allow-unauthenticated-admin)", None, "admin_disabled")(scope, receive, send)
            keys = self.admin_keys if admin else self.user_keys
            if keys and not _has_key(dict(scope["headers"]), keys):
                return await error_response(
                    401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None,
                    "invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


def _has_key(headers: dict[bytes, bytes], keys: list[bytes]) -> bool:
    header = headers.get(b"authorization", b"")
    token = header[7:].strip() if header[:7].lower() == b"bearer " else headers.get(b"x-api-key")
    return bool(token) and any(hmac.compare_digest(token, k) for k in keys)


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over `limit` bytes (`upload_limit` on the upload path), by header or while streaming.

    A chunked body (no Content-Length) is counted as it arrives; once over the limit, whatever the app
    answers (FastAPI turns the read error into a 400) is replaced by the 413.
    """

    def __init__(self, app, limit: int, upload_limit: int, upload_path: str = ADMIN_PATH):
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
        started = exceeded = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # the app's answer to the failed read; the 413 goes out instead
                if not started:
                    started = True
                    await self._refuse(scope, receive, send, limit)
                return
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
