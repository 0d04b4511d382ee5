"""The in-process registry: keys (and whatever else registers a handler) kept in memory.

The hot path must not touch Postgres to authenticate a key or find its plan. Each FILA
process keeps this small read model of the control events (keys, plans, assignments,
contexts), built from the event log by topic and kept fresh by polling the log every
``interval`` seconds; a process that writes a control event refreshes at once, so it reads
its own writes. Another process sees a revocation within one interval.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode

MISS_REFRESH_S = 0.05

Handler = Callable[[str, dict[str, Any], int], None]   # (originator_id, state, version)


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    owner: str
    prefix: str
    secret_hash: str
    issued_at: str
    revoked_at: str | None = None
    revoked_reason: str | None = None
    rotated_at: str | None = None
    version: int = 1

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "owner": self.owner, "prefix": self.prefix,
                "status": "active" if self.active else "revoked", "created_at": self.issued_at,
                "revoked_at": self.revoked_at, "revoked_reason": self.revoked_reason,
                "rotated_at": self.rotated_at}


@dataclass
class Registry:
    recorder: Any
    interval: float = 0.5
    position: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    by_hash: dict[str, KeyRecord] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _refresh: asyncio.Future | None = None
    _last_refresh: float = 0.0

    def __post_init__(self) -> None:
        self.handlers.update({
            "fila:ApiKey.Issued": self._key_issued,
            "fila:ApiKey.Revoked": self._key_revoked,
            "fila:ApiKey.Rotated": self._key_rotated,
        })

    def register(self, topic: str, handler: Handler) -> None:
        self.handlers[topic] = handler

    # -- reading the log (synchronous: runs on the store's reader thread) --------------------

    def catch_up(self, page: int = 1000) -> int:
        """Apply every control event after ``position``; returns the new position."""
        with self._lock:
            topics = list(self.handlers)
            while True:
                notes = self.recorder.select_notifications(
                    start=self.position, limit=page, topics=topics, inclusive_of_start=False)
                for note in notes:
                    self.handlers[note.topic](str(note.originator_id), _decode(note.state),
                                              note.originator_version)
                    self.position = note.id
                if len(notes) < page:
                    return self.position

    async def follow(self, run: Callable[..., Any], stop: asyncio.Event) -> None:
        """Poll the log until ``stop`` is set (``run`` executes the sync read off the loop)."""
        while not stop.is_set():
            try:
                await run(self.catch_up)
            except Exception as error:  # the store may be briefly down; keep serving what we know
                import structlog
                structlog.get_logger("fila.registry").warning("registry_poll_failed", error=type(error).__name__)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                pass

    # -- keys ----------------------------------------------------------------------------------

    def authenticate(self, secret_hash: str) -> KeyRecord | None:
        return self.by_hash.get(secret_hash)

    async def authenticate_fresh(self, secret_hash: str, run: Callable[..., Any]) -> KeyRecord | None:
        """Like ``authenticate``, but an unknown secret first refreshes from the log, so a key
        issued by another process a moment ago works at once. One refresh runs at a time, and
        at most one every ``MISS_REFRESH_S`` (a flood of wrong keys costs one read per interval)."""
        record = self.by_hash.get(secret_hash)
        if record is not None:
            return record
        await self.refresh(run)
        return self.by_hash.get(secret_hash)

    async def refresh(self, run: Callable[..., Any]) -> None:
        """Read the log now, for something another process may have written a moment ago (an
        unknown key, a key without an assignment yet). One refresh runs at a time, and at most
        one every ``MISS_REFRESH_S``: a flood of misses costs one read per interval."""
        if self._refresh is None:
            now = time.monotonic()
            if now - self._last_refresh < MISS_REFRESH_S:
                return
            self._last_refresh = now
            self._refresh = asyncio.ensure_future(run(self.catch_up))
            try:
                await self._refresh
            finally:
                self._refresh = None
        else:
            await asyncio.shield(self._refresh)

    def _key_issued(self, key_id: str, state: dict[str, Any], version: int) -> None:
        record = KeyRecord(id=key_id, name=state["name"], owner=state["owner"], prefix=state["prefix"],
                           secret_hash=state["secret_hash"], issued_at=state["issued_at"], version=version)
        self.keys[key_id] = record
        self.by_hash[record.secret_hash] = record

    def _key_revoked(self, key_id: str, state: dict[str, Any], version: int) -> None:
        record = self.keys[key_id]
        record.revoked_at = state["at"]
        record.revoked_reason = state["reason"]
        record.version = version
        self.by_hash.pop(record.secret_hash, None)

    def _key_rotated(self, key_id: str, state: dict[str, Any], version: int) -> None:
        record = self.keys[key_id]
        self.by_hash.pop(record.secret_hash, None)
        record.secret_hash = state["secret_hash"]
        record.prefix = state["prefix"]
        record.rotated_at = state["at"]
        record.version = version
        if record.active:
            self.by_hash[record.secret_hash] = record
