"""Settings, read from the environment in one place.

Every variable is documented in the README's configuration table. A bad value stops
start-up with a :class:`ConfigError` that names the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import msgspec


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    database_url: str = "sqlite:///fila.db"
    redis_url: str | None = None
    upstream_base_url: str | None = None
    openai_api_key: str | None = None
    default_model: str = "gpt-4.1-nano"
    fallback_model: str | None = None
    fallback_base_url: str | None = None
    admin_token: str | None = None
    default_plan: str = "free"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    upstream_timeout_s: float = 60.0
    upstream_connect_timeout_s: float = 5.0
    max_body_bytes: int = 1_048_576
    batch_max_size: int = 200
    batch_max_wait_ms: float = 2.0
    batch_express: bool = True
    breaker_failure_threshold: int = 5
    breaker_error_rate: float = 0.5
    breaker_window_s: float = 30.0
    breaker_min_calls: int = 20
    breaker_open_s: float = 10.0
    cache_memory_mb: int = 64
    rate_limit_reserve: int = 64
    log_format: str = "auto"
    log_level: str = "info"
    embedded_projector: bool = True

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def uses_fake_upstream(self) -> bool:
        """No key and no upstream configured: serve the built-in fake (the offline demo)."""
        return self.openai_api_key is None and self.upstream_base_url is None


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:`` URL, SQLAlchemy's way: ``sqlite:///rel.db``, ``sqlite:////abs.db``."""
    path = unquote(urlsplit(url).path)
    return path[1:] if path.startswith("/") else path


# name of the environment variable -> (field, parser)
def _int(name: str, raw: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _float(name: str, raw: str, minimum: float = 0.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {raw}")
    return value


def _fraction(name: str, raw: str) -> float:
    value = _float(name, raw)
    if value > 1:
        raise ConfigError(f"{name} must be between 0 and 1, got {raw}")
    return value


def _split(name: str, raw: str):
    parts = urlsplit(raw)
    try:
        parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise ConfigError(f"{name} has an invalid port, got {raw!r}") from None
    return parts


def _database_url(name: str, raw: str) -> str:
    parts = _split(name, raw)
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError(f"{name} must look like postgresql://user@host:5432/dbname, got {raw!r}")
        return raw
    if parts.scheme == "sqlite":
        if not parts.path or parts.path == "/":
            raise ConfigError(f"{name} must look like sqlite:///path/to/file.db, got {raw!r}")
        return raw
    raise ConfigError(f"{name} must start with postgresql:// or sqlite:///, got {raw!r}")


def _redis_url(name: str, raw: str) -> str:
    if _split(name, raw).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name} must start with redis://, rediss:// or unix://, got {raw!r}")
    return raw


def _http_url(name: str, raw: str) -> str:
    parts = _split(name, raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL such as http://127.0.0.1:8081/v1, got {raw!r}")
    return raw.rstrip("/")


def _nonempty(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} must not be empty")
    return raw.strip()


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(*choices: str):
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    return parse


ENVIRONMENT = {
    "FILA_DATABASE_URL": ("database_url", _database_url),
    "FILA_REDIS_URL": ("redis_url", _redis_url),
    "FILA_UPSTREAM_BASE_URL": ("upstream_base_url", _http_url),
    "OPENAI_API_KEY": ("openai_api_key", _nonempty),
    "FILA_DEFAULT_MODEL": ("default_model", _nonempty),
    "FILA_FALLBACK_MODEL": ("fallback_model", _nonempty),
    "FILA_FALLBACK_BASE_URL": ("fallback_base_url", _http_url),
    "FILA_ADMIN_TOKEN": ("admin_token", _nonempty),
    "FILA_DEFAULT_PLAN": ("default_plan", _nonempty),
    "FILA_HOST": ("host", _nonempty),
    "FILA_PORT": ("port", lambda n, r: _int(n, r, 1, 65535)),
    "FILA_WORKERS": ("workers", lambda n, r: _int(n, r, 1)),
    "FILA_UPSTREAM_TIMEOUT_S": ("upstream_timeout_s", lambda n, r: _float(n, r, 0.1)),
    "FILA_UPSTREAM_CONNECT_TIMEOUT_S": ("upstream_connect_timeout_s", lambda n, r: _float(n, r, 0.1)),
    "FILA_MAX_BODY_BYTES": ("max_body_bytes", lambda n, r: _int(n, r, 1024)),
    "FILA_BATCH_MAX_SIZE": ("batch_max_size", lambda n, r: _int(n, r, 1)),
    "FILA_BATCH_MAX_WAIT_MS": ("batch_max_wait_ms", _float),
    "FILA_BATCH_EXPRESS": ("batch_express", _bool),
    "FILA_BREAKER_FAILURE_THRESHOLD": ("breaker_failure_threshold", lambda n, r: _int(n, r, 1)),
    "FILA_BREAKER_ERROR_RATE": ("breaker_error_rate", _fraction),
    "FILA_BREAKER_WINDOW_S": ("breaker_window_s", lambda n, r: _float(n, r, 1.0)),
    "FILA_BREAKER_MIN_CALLS": ("breaker_min_calls", lambda n, r: _int(n, r, 1)),
    "FILA_BREAKER_OPEN_S": ("breaker_open_s", lambda n, r: _float(n, r, 0.01)),
    "FILA_CACHE_MEMORY_MB": ("cache_memory_mb", lambda n, r: _int(n, r, 0)),
    "FILA_RATE_LIMIT_RESERVE": ("rate_limit_reserve", lambda n, r: _int(n, r, 0, 10_000)),
    "FILA_LOG_FORMAT": ("log_format", _choice("auto", "json", "console")),
    "FILA_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "FILA_EMBEDDED_PROJECTOR": ("embedded_projector", _bool),
}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from ``environ`` (default ``os.environ``); ``overrides`` win (tests, CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for variable, (field, parse) in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw is not None and raw != "":
            values[field] = parse(variable, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
