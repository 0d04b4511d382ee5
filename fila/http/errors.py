"""The one error mapper: FILA's errors (and the framework's) to HTTP answers.

``/v1`` answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so the
official SDK raises the right exception class; ``/admin`` answers
``{"error": {"code", "message", "field"}}``. Anything unexpected is logged with its traceback
and answered 500 in the same shape, without internals.
"""

from __future__ import annotations

import math

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException

from fila.domain.errors import FilaError, RateLimited, UpstreamClientError, UpstreamUnavailable

log = structlog.get_logger("fila.http")
_encode = msgspec.json.Encoder().encode

# status -> OpenAI error type, for errors that did not say
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 429: "requests", 500: "server_error", 502: "server_error",
          503: "server_error", 504: "server_error"}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 401: "invalid_api_key",
          400: "invalid_value"}


def error_response(request: Request, status: int, message: str, *, type_: str | None = None,
                   code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    if request.url.path.startswith("/admin"):
        body = {"error": {"code": code or _CODES.get(status, "error"), "message": message, "field": param}}
    else:
        body = {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    return Response(_encode(body), status_code=status, media_type="application/json",
                    headers=_with_request_id(request, headers))


def _with_request_id(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """The id the chat handler gave the request (and logged), so an error can be found in the log."""
    request_id = request.state.get("request_id")
    return headers if request_id is None else {**(headers or {}), "x-request-id": request_id}


def fila_error(request: Request, error: FilaError) -> Response:
    if isinstance(error, UpstreamClientError):
        return Response(error.body or b"{}", status_code=error.status, media_type="application/json",
                        headers=_with_request_id(request, error.headers))
    headers: dict[str, str] = {}
    if isinstance(error, (RateLimited, UpstreamUnavailable)):
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, RateLimited):
        # the limiter's own "Retry-After" would be a second header line ("13, 13" to a client)
        headers.update({k: v for k, v in error.headers.items() if k.lower() != "retry-after"})
    return error_response(request, error.status, error.message, type_=error.type, code=error.code,
                          param=error.param, headers=headers)


def http_error(request: Request, error: HTTPException) -> Response:
    status = error.status_code
    message = error.detail or "error"
    param = None
    if isinstance(error, ValidationException):
        extra = error.extra if isinstance(error.extra, list) else []
        fields = [str(item.get("key")) for item in extra if isinstance(item, dict) and item.get("key")]
        param = fields[0] if fields else None
        details = "; ".join(f"{item.get('key')}: {item.get('message')}" for item in extra if isinstance(item, dict))
        message = f"{message}: {details}" if details else message
    if status == 413:
        message = "the request body is too large"
    if isinstance(error, NotAuthorizedException):
        return error_response(request, 401, message, code="invalid_api_key")
    return error_response(request, status, message, param=param, headers=getattr(error, "headers", None))


def unexpected_error(request: Request, error: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path, error=type(error).__name__)
    return error_response(request, 500, "internal error; it has been logged", code="internal_error")


EXCEPTION_HANDLERS = {FilaError: fila_error, HTTPException: http_error, Exception: unexpected_error}
