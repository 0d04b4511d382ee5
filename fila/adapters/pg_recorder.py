"""The PostgreSQL recorder with a one-round-trip write.

``eventsourcing``'s ``PostgresApplicationRecorder`` writes a batch of events through a psycopg
pipeline: borrow a pooled connection, then BEGIN, ``SET LOCAL lock_timeout``, ``LOCK TABLE ...
IN EXCLUSIVE MODE``, NOTIFY, the INSERT, a mid-pipeline sync (so a uniqueness violation surfaces
as an IntegrityError), the id fetch and COMMIT. On this machine that is ~2.4 ms p50 per save at
light load, of which a bare durable INSERT is ~0.95 ms: the rest is waits between the client and
the server and the pool's bookkeeping.

This subclass keeps every statement and its order (so the table lock still makes commit order
equal id order, and readers of the log never skip an event) but sends them as one simple-query
message on a connection of its own, held by whichever thread writes (in the gateway, the
batcher's one writer thread): one round trip per save, ~1.5 ms p50. A simple query carries no
parameters, so values are written into the text: UUIDs and ints as themselves, states as hex
digits, other text quoted by libpq. Everything else (reads, subscriptions, table creation) is
the library's.

The batcher's express lane (a lone request at light load, committed from the event loop with
no hand-off to the writer thread) sends the same statement on an asyncio connection of its own:
``insert_events_async``.

Selected with ``APPLICATION_RECORDER_TOPIC`` (see ``eventstore.store_env``); stays off the
library's database functions (``POSTGRES_ENABLE_DB_FUNCTIONS``), as the brief requires.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing import persistence
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.pq import Escaping, TransactionStatus
from psycopg.sql import SQL, Composed, Identifier

ATTEMPTS = 10          # a lost connection is retried as the library's recorder does (its @retry)
RETRY_WAIT_S = 0.2

# psycopg's error classes, most specific first, and the store's classes the library raises for them
_ERRORS = [(getattr(psycopg, name), getattr(persistence, name)) for name in (
    "InterfaceError", "OperationalError", "DataError", "IntegrityError", "InternalError",
    "ProgrammingError", "NotSupportedError", "DatabaseError")]


def _translate(error: psycopg.Error) -> Exception:
    for theirs, ours in _ERRORS:
        if isinstance(error, theirs):
            return ours(str(error))
    return persistence.PersistenceError(str(error))


class OneTripRecorder(PostgresApplicationRecorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = SQL("{0}.{1}").format(Identifier(self.datastore.schema), Identifier(self.events_table_name))
        self._head = Composed([
            SQL("BEGIN; SET LOCAL lock_timeout = '{0}s'; LOCK TABLE {1} IN EXCLUSIVE MODE; NOTIFY {2}; ").format(
                self.datastore.lock_timeout, table, Identifier(self.channel_name)),
            SQL("INSERT INTO {0} (originator_id, originator_version, topic, state) VALUES ").format(table),
        ]).as_string(None)
        self._tail = " RETURNING notification_id; COMMIT"
        self._writer: psycopg.Connection[Any] | None = None
        self._writer_lock = threading.Lock()
        self._async_writer: psycopg.AsyncConnection[Any] | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._literals: dict[Any, str] = {}

    def insert_events(self, stored_events: Sequence[StoredEvent], *, after_lost_connection: bool = False,
                      **kwargs: Any) -> Sequence[int] | None:
        """Write ``stored_events`` in one transaction; their notification ids, in order.

        A lost connection is retried, as the library does (up to ``ATTEMPTS`` times, ``RETRY_WAIT_S``
        apart). If the connection died after the server committed but before its reply arrived,
        the retry meets the events already there (a uniqueness violation): when every one of them
        is stored with the same topic and state, the write did happen, and their ids are returned
        instead of an IntegrityError for a request that was in fact recorded.
        ``after_lost_connection``: an earlier try (the express lane's) lost its connection, so
        this one may meet its own events from the start."""
        if not stored_events:
            return None
        lost = after_lost_connection
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._insert_once(stored_events)
            except persistence.IntegrityError:
                ids = self._already_stored(stored_events) if lost else None
                if ids is None:
                    raise
                return ids
            except (persistence.InterfaceError, persistence.OperationalError):
                if attempt == ATTEMPTS:
                    raise
                lost = True
                time.sleep(RETRY_WAIT_S)
        raise AssertionError("unreachable")

    def _already_stored(self, stored_events: Sequence[StoredEvent]) -> list[int] | None:
        """The ids of these events if each is stored exactly as given, else None."""
        keys = [(event.originator_id, event.originator_version) for event in stored_events]
        query = SQL("SELECT originator_id, originator_version, topic, state, notification_id FROM {0}.{1} "
                    "WHERE (originator_id, originator_version) IN (SELECT * FROM unnest(%s::uuid[], %s::bigint[]))"
                    ).format(Identifier(self.datastore.schema), Identifier(self.events_table_name))
        with self._writer_lock:
            conn = self._connection()
            try:
                rows = conn.execute(query, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
                conn.rollback()
            except psycopg.Error as error:
                self._abandon(conn)
                raise _translate(error) from error
        found = {(row[0], row[1]): row for row in rows}
        ids = []
        for event in stored_events:
            row = found.get((event.originator_id, event.originator_version))
            if row is None or row[2] != event.topic or bytes(row[3]) != bytes(event.state):
                return None
            ids.append(row[4])
        return ids

    def _insert_once(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        with self._writer_lock:
            conn = self._connection()
            try:
                query = self._statement(conn, stored_events)
                with conn.cursor() as cursor:
                    cursor.execute(query)     # no parameters: psycopg sends it as one simple query
                    _to_insert(cursor)
                    ids = [row[0] for row in cursor.fetchall()]
            except psycopg.Error as error:
                self._abandon(conn)
                raise _translate(error) from error
        return _checked(ids, stored_events)

    async def insert_events_async(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        """Write ``stored_events`` in one transaction from the running event loop, once: the
        same statement as ``insert_events`` on this loop's own connection. A lost connection is
        raised (``InterfaceError`` / ``OperationalError``), for the caller to retry with
        ``insert_events(..., after_lost_connection=True)``. One caller at a time (the batcher's
        express lane is one lane)."""
        conn = await self._async_connection()
        try:
            query = self._statement(conn, stored_events)
            async with conn.cursor() as cursor:
                await cursor.execute(query)
                _to_insert(cursor)
                ids = [row[0] for row in await cursor.fetchall()]
        except psycopg.Error as error:
            await self._abandon_async(conn)
            raise _translate(error) from error
        except BaseException:
            # cancelled (the request went away): psycopg has asked the server to cancel, and the
            # connection is mid-transaction in a state nobody will finish. Drop it; the next
            # commit opens another (the server rolls back whatever had not committed).
            self._drop_async(conn)
            raise
        return _checked(ids, stored_events)

    def _statement(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], stored_events: Sequence[StoredEvent]) -> str:
        """The whole transaction as text. A UUID and an int print as themselves, the state goes as
        hex digits through ``decode``; any other text is quoted by libpq (``PQescapeLiteral``)."""
        quote = self._quote
        rows = ",".join([
            f"({quote(conn, event.originator_id)},{int(event.originator_version)},{quote(conn, event.topic)},"
            f"decode('{event.state.hex()}','hex'))" for event in stored_events])
        return self._head + rows + self._tail

    def _quote(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], value: Any) -> str:
        if isinstance(value, UUID):
            return f"'{value}'"
        literal = self._literals.get(value)
        if literal is None:
            literal = Escaping(conn.pgconn).escape_literal(str(value).encode()).decode()
            if len(self._literals) < 10_000:      # topics: a handful, remembered
                self._literals[value] = literal
        return literal

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            pool = self.datastore.pool
            try:
                conn = psycopg.Connection.connect(pool.conninfo, **{**pool.kwargs, "row_factory": psycopg.rows.tuple_row})
            except psycopg.Error as error:
                raise _translate(error) from error
            self.datastore.after_connect_func()(conn)
            self._writer = conn
        return conn

    async def _async_connection(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        conn = self._async_writer
        if conn is not None and (self._async_loop is not loop or conn.closed or conn.broken
                                 or conn.info.transaction_status != TransactionStatus.IDLE):
            self._drop_async(conn)    # of a loop that has gone (tests run many loops), or left mid-way
            conn = None
        if conn is None:
            pool = self.datastore.pool
            try:
                conn = await psycopg.AsyncConnection.connect(
                    pool.conninfo, **{**pool.kwargs, "row_factory": psycopg.rows.tuple_row, "autocommit": True})
                await conn.execute(SQL("SET idle_in_transaction_session_timeout = '{0}ms'").format(
                    int(self.datastore.idle_in_transaction_session_timeout * 1000)))
            except psycopg.Error as error:
                raise _translate(error) from error
            self._async_writer, self._async_loop = conn, loop
        return conn

    def _drop_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        conn.pgconn.finish()          # libpq's own close: needs no event loop
        if self._async_writer is conn:
            self._async_writer = None

    async def _abandon_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``_abandon`` for the express lane's connection."""
        try:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                await conn.execute("ROLLBACK")
        except psycopg.Error:
            self._drop_async(conn)

    def _abandon(self, conn: psycopg.Connection[Any]) -> None:
        """After a failed write: roll the transaction back, or drop a connection that cannot."""
        try:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            conn.close()

    def close_writer(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if self._async_writer is not None:   # its loop may be gone
            self._drop_async(self._async_writer)


def _to_insert(cursor: Any) -> None:
    """Move a cursor over the transaction's results to the INSERT's (the one with the ids)."""
    while not (cursor.statusmessage or "").startswith("INSERT"):
        if not cursor.nextset():
            raise persistence.ProgrammingError("the INSERT's result is missing")


def _checked(ids: list[int], stored_events: Sequence[StoredEvent]) -> list[int]:
    if len(ids) != len(stored_events):
        raise persistence.ProgrammingError(f"got {len(ids)} notification ids for {len(stored_events)} events")
    return ids
