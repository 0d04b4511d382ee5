"""API keys: issued with a name and owner, revoked, rotated.

Only a SHA-256 hash of the secret is stored; the secret itself is shown once, when it is
issued or rotated. Secrets are 256-bit random tokens, so a fast hash is the right tool (a
slow password hash would only cost the hot path): the lookup is by hash, the final check
compares hashes in constant time.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from fila.domain.errors import Conflict
from fila.domain.time import iso

SECRET_PREFIX = "fila-sk-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """What admins see of a key: its first characters, enough to tell keys apart."""
    return secret[: len(SECRET_PREFIX) + 6]


class ApiKey(Aggregate):
    TOPIC = "fila:ApiKey"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:ApiKey.Created"

    @event("Issued", topic="fila:ApiKey.Issued")
    def __init__(self, id: UUID, name: str, owner: str, secret_hash: str, prefix: str,
                 issued_at: str) -> None:
        self.name = name
        self.owner = owner
        self.secret_hash = secret_hash
        self.prefix = prefix
        self.issued_at = issued_at
        self.revoked_at: str | None = None
        self.revoked_reason: str | None = None
        self.rotated_at: str | None = None

    @classmethod
    def issue(cls, key_id: UUID, name: str, owner: str, secret: str, at: datetime) -> ApiKey:
        return cls(id=key_id, name=name, owner=owner, secret_hash=hash_secret(secret),
                   prefix=display_prefix(secret), issued_at=iso(at))

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoke(self, reason: str, at: datetime) -> None:
        if self.revoked_at is not None:
            raise Conflict("the API key is already revoked", code="already_revoked")
        self._revoked(reason=reason, at=iso(at))

    @event("Revoked", topic="fila:ApiKey.Revoked")
    def _revoked(self, reason: str, at: str) -> None:
        self.revoked_at = at
        self.revoked_reason = reason

    def rotate(self, new_secret: str, at: datetime) -> None:
        if self.revoked_at is not None:
            raise Conflict("a revoked API key cannot be rotated", code="revoked")
        self._rotated(secret_hash=hash_secret(new_secret), prefix=display_prefix(new_secret), at=iso(at))

    @event("Rotated", topic="fila:ApiKey.Rotated")
    def _rotated(self, secret_hash: str, prefix: str, at: str) -> None:
        self.secret_hash = secret_hash
        self.prefix = prefix
        self.rotated_at = at
