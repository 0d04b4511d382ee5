"""Test support: real databases, a real FILA server on a free port, a fake clock."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Iterator

import psycopg

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_TEST_DB = "fila_test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def ensure_test_database() -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_TEST_DB,)).fetchone()
        if not exists:
            try:
                conn.execute(f'CREATE DATABASE "{PG_TEST_DB}"')
            except psycopg.errors.DuplicateDatabase:
                pass


CREATED_SCHEMAS: list[str] = []


def new_pg_url() -> str:
    """A fresh schema in the test database: each test gets its own tables."""
    ensure_test_database()
    schema = "t_" + uuid.uuid4().hex[:16]
    url = f"postgresql://postgres@127.0.0.1:5432/{PG_TEST_DB}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    CREATED_SCHEMAS.append(schema)
    return f"{url}?schema={schema}"


def drop_created_schemas() -> None:
    """At the end of a session: drop the schemas it made."""
    if not CREATED_SCHEMAS:
        return
    url = f"postgresql://postgres@127.0.0.1:5432/{PG_TEST_DB}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '2s'")     # a schema still in use is left, not waited for
        for schema in CREATED_SCHEMAS:
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except psycopg.errors.LockNotAvailable:
                pass
    CREATED_SCHEMAS.clear()


def new_sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/fila-{uuid.uuid4().hex[:8]}.db"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeClock:
    """A wall clock you advance by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class ServerHandle:
    def __init__(self, base_url: str, container: Any, server: Any, thread: threading.Thread) -> None:
        self.base_url = base_url
        self.container = container
        self._server = server
        self._thread = thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


@contextmanager
def running_fila(settings: Any, container: Any = None) -> Iterator[ServerHandle]:
    """A real FILA (uvicorn + Litestar) on a free port, in a thread of its own."""
    import uvicorn

    from fila.bootstrap import build_container
    from fila.http.app import create_app

    container = container or build_container(settings)
    app = create_app(container)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            loop="asyncio", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("FILA did not start")
        time.sleep(0.02)
    handle = ServerHandle(f"http://127.0.0.1:{port}", container, server, thread)
    try:
        yield handle
    finally:
        handle.stop()


def ledger_events(server: ServerHandle, topic: str, limit: int = 100_000) -> list[dict[str, Any]]:
    """Every event of ``topic`` in the server's store, decoded, with its aggregate id as ``id``."""
    import msgspec

    notes = server.container.store.recorder.select_notifications(
        start=0, limit=limit, topics=[topic], inclusive_of_start=False)
    return [dict(msgspec.json.decode(n.state), id=str(n.originator_id)) for n in notes]


def wait_for(probe: Any, timeout: float = 5.0, what: str = "the condition") -> Any:
    """Poll ``probe`` until it returns something truthy (bounded, never a fixed sleep); return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
