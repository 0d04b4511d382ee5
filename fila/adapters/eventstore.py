"""The event store: one ``eventsourcing`` application on PostgreSQL (psycopg 3) or SQLite.

Tables are created on start (idempotent). ``FILA_DATABASE_URL`` picks the backend:
``postgresql://user:pass@host:port/db[?schema=NAME]`` or ``sqlite:///path/to/file.db``.
``POSTGRES_ENABLE_DB_FUNCTIONS`` stays off: with it on, readers of the log skip events.
On PostgreSQL the application recorder is ``pg_recorder.OneTripRecorder``: the library's, with
each save sent in one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from eventsourcing.application import Application
from eventsourcing.persistence import Notification, Recording

from fila.config import sqlite_path

TRANSCODER_TOPIC = "fila.adapters.transcoder:MsgspecTranscoder"
RECORDER_TOPIC = "fila.adapters.pg_recorder:OneTripRecorder"


class FilaStore(Application):
    """All of FILA's aggregates live in one application, so one log orders everything."""

    name = "fila"

    def record(self, events: Sequence[Any], **kwargs: Any) -> list[Recording]:
        """Store these domain events in one transaction: ``save`` for a caller that already holds
        events, not aggregates (the batcher). ``save`` first collects every object through a
        ``ProcessingEvent`` (a runtime protocol check per object) and looks for snapshots and
        followers to notify; FILA takes no snapshots and has no followers, so that was ~9 us
        per event of the batcher's time for nothing."""
        return self.events.put(events, **kwargs)

    @property
    def records_async(self) -> bool:
        """Whether ``record_async`` is there (PostgreSQL: the batcher's express lane)."""
        return hasattr(self.recorder, "insert_events_async")

    async def record_async(self, events: Sequence[Any]) -> list[Recording]:
        """``record`` from the running event loop, one try (see ``OneTripRecorder.insert_events_async``)."""
        if not events:
            return []
        stored = [self.mapper.to_stored_event(event) for event in events]
        ids = await self.recorder.insert_events_async(stored)
        return [Recording(event, Notification(originator_id=s.originator_id, originator_version=s.originator_version,
                                              topic=s.topic, state=s.state, id=n))
                for event, s, n in zip(events, stored, ids, strict=True)]

    def close(self) -> None:
        close_writer = getattr(self.recorder, "close_writer", None)
        if close_writer is not None:
            close_writer()
        super().close()


def store_env(database_url: str) -> dict[str, str]:
    parts = urlsplit(database_url)
    env = {"TRANSCODER_TOPIC": TRANSCODER_TOPIC, "CREATE_TABLE": "y"}
    if parts.scheme in ("postgresql", "postgres"):
        query = parse_qs(parts.query)
        env.update({
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"),
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            "POSTGRES_POOL_SIZE": "4",
            "POSTGRES_MAX_OVERFLOW": "4",
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
        })
        if "schema" in query:
            env["POSTGRES_SCHEMA"] = query["schema"][0]
        return env
    if parts.scheme == "sqlite":
        path = Path(sqlite_path(database_url))
        path.parent.mkdir(parents=True, exist_ok=True)
        env.update({"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path),
                    "SQLITE_LOCK_TIMEOUT": "10"})
        return env
    raise ValueError(f"unsupported database URL {database_url!r}")


def open_store(database_url: str, attempts: int = 5) -> FilaStore:
    """Open the store, creating its tables. Worker processes starting together may race on
    CREATE TABLE IF NOT EXISTS (Postgres can then raise a unique violation on its catalog): retry."""
    for attempt in range(attempts):
        try:
            return FilaStore(env=store_env(database_url))
        except Exception as error:  # psycopg's catalog race surfaces as several error classes
            if attempt == attempts - 1 or "already exists" not in str(error) and "duplicate key" not in str(error):
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")
