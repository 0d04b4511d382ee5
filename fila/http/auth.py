"""Bearer authentication: client API keys for /v1, the admin token for /admin."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar import Request

from fila.domain.errors import Unauthenticated
from fila.projections.registry import KeyRecord


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def client_key(request: Request, container: Any) -> KeyRecord:
    token = bearer(request)
    if token is None:
        raise Unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    digest = hashlib.sha256(token.encode()).hexdigest()
    record = await container.registry.authenticate_fresh(digest, container.batcher.run)
    if record is None or not hmac.compare_digest(record.secret_hash, digest):
        raise Unauthenticated("Incorrect API key provided, or the key has been revoked.")
    return record


def require_admin(request: Request, admin_token: str | None) -> None:
    token = bearer(request)
    if admin_token is None:
        raise Unauthenticated("the admin API is disabled: set FILA_ADMIN_TOKEN", code="admin_disabled")
    if token is None or not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthenticated("a valid admin token is required (Authorization: Bearer $FILA_ADMIN_TOKEN)",
                              code="invalid_admin_token")
