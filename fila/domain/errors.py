"""One error hierarchy. ``fila.http.errors`` maps each class to an HTTP answer in one table."""

from __future__ import annotations


class FilaError(Exception):
    """Base of every error FILA raises on purpose."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(FilaError):
    """The body or a parameter is wrong; ``param`` names the field."""

    status = 400
    code = "invalid_value"


class PayloadTooLarge(FilaError):
    status = 413
    code = "payload_too_large"


class Unauthenticated(FilaError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(FilaError):
    status = 403
    type = "permission_denied"
    code = "no_active_plan"


class NotFound(FilaError):
    status = 404
    code = "not_found"


class Conflict(FilaError):
    status = 409
    code = "conflict"


class RateLimited(FilaError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.headers = headers or {}


class UpstreamError(FilaError):
    """The upstream failed (5xx, timeout, connection); the client gets a 502/504."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time: 504."""

    status = 504
    code = "upstream_timeout"


class UpstreamUnavailable(FilaError):
    """The circuit breaker is open and there is no fallback: fail fast with Retry-After."""

    status = 503
    type = "server_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamClientError(FilaError):
    """The upstream refused the request itself (4xx): passed back to the client as it came."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}
