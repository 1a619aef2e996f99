"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the matching status."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.adapters_store import AdapterError
from loramux.engine import RequestError

logger = logging.getLogger(__name__)

ADAPTER_ERROR_STATUS = {"not_found": 404, "already_exists": 409, "in_use": 409, "invalid_name": 400,
                        "too_large": 413, "no_store": 400, "store_unavailable": 503}
STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error", 500: "internal_server_error"}


class OrjsonResponse(JSONResponse):
    """JSON bodies serialised with orjson."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def _printable(text: str | None) -> str | None:
    """Unpaired surrogates echoed from a request (an unknown field "\\ud800") escaped: orjson refuses them."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> OrjsonResponse:
    message, param = _printable(message), _printable(param)
    body = {"error": {"message": message, "type": STATUS_TYPE.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return OrjsonResponse(body, status_code=status, headers=headers)


def api_error_from(exc: Exception) -> APIError:
    """Map engine and store errors to API errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterError):
        return APIError(ADAPTER_ERROR_STATUS.get(exc.code, 422), str(exc), "adapter", exc.code)
    if isinstance(exc, RequestError):
        status = 404 if exc.code == "adapter_not_found" else 400
        return APIError(status, str(exc), exc.param, exc.code)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), None, "invalid_value")
    raise exc


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if param is None:
        return "the request body must be a JSON object (send Content-Type: application/json)", None, "invalid_json"
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param, "unknown_field"
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(AdapterError)
    @app.exception_handler(RequestError)
    async def _engine_error(request: Request, exc: Exception):
        err = api_error_from(exc)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", None, "internal_error")
