"""Admin use cases for API keys: issue, list, revoke, rotate."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.persistence import IntegrityError

from fila.domain.apikey import SECRET_PREFIX, ApiKey
from fila.domain.errors import Conflict, InvalidRequest, NotFound
from fila.projections.registry import KeyRecord, Registry


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def parse_id(value: str, what: str = "id") -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidRequest(f"{what} {value!r} is not a valid id", param=what) from None


class KeyService:
    def __init__(self, batcher: Any, registry: Registry, clock: Callable[[], datetime] | None = None) -> None:
        self.batcher = batcher
        self.registry = registry
        self.clock = clock or (lambda: datetime.now(UTC))

    async def refresh(self) -> None:
        await self.batcher.run(self.registry.catch_up)

    async def create(self, name: str, owner: str | None = None) -> tuple[KeyRecord, str]:
        name = _label(name, "name")
        owner = name if owner is None or not owner.strip() else _label(owner, "owner")
        secret = new_secret()
        key = ApiKey.issue(uuid4(), name, owner, secret, self.clock())
        await self.batcher.commit(key)
        await self.refresh()
        return self.registry.keys[str(key.id)], secret

    def get(self, key_id: str) -> KeyRecord:
        record = self.registry.keys.get(str(parse_id(key_id)))
        if record is None:
            raise NotFound(f"no API key with id {key_id}", param="id")
        return record

    def list(self) -> list[KeyRecord]:
        return sorted(self.registry.keys.values(), key=lambda k: (k.issued_at, k.id))

    async def _change(self, key_id: str, change: Callable[[ApiKey], None]) -> KeyRecord:
        self.get(key_id)
        key = await self.batcher.run(self.batcher.store.repository.get, parse_id(key_id))
        change(key)
        try:
            await self.batcher.commit(key)
        except IntegrityError:
            raise Conflict("the key changed meanwhile; retry", code="concurrent_change") from None
        await self.refresh()
        return self.registry.keys[key_id]

    async def revoke(self, key_id: str, reason: str = "revoked by an admin") -> KeyRecord:
        return await self._change(key_id, lambda key: key.revoke(reason, self.clock()))

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        secret = new_secret()
        record = await self._change(key_id, lambda key: key.rotate(secret, self.clock()))
        return record, secret


def _label(value: str, field: str) -> str:
    """A key's name or owner: 1-200 printable characters (shown in lists, logs and reports)."""
    value = value.strip()
    if not value:
        raise InvalidRequest(f"'{field}' must not be empty", param=field)
    if len(value) > 200 or not value.isprintable():
        raise InvalidRequest(f"'{field}' must be at most 200 printable characters (no control characters)",
                             param=field)
    return value
