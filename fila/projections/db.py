"""A tiny dialect layer for the projections: PostgreSQL (psycopg 3) or SQLite (sqlite3, WAL).

Views write SQL once, with ``?`` placeholders (translated to ``%s`` for psycopg), and run it
inside ``with db.transaction() as tx:``. Everything a view writes in one page and the page's
tracking position commit together, or not at all.

``tx.insert_many`` is the one bulk-write primitive: rows go in with ``ON CONFLICT DO NOTHING``
(``add=()``) or ``ON CONFLICT DO UPDATE SET c = c + excluded.c`` for the ``add`` columns.
On Postgres a large ``DO NOTHING`` batch is ``COPY``-ed straight into the table under a
savepoint, in the binary format when the column types allow (a known key fails the COPY, and
the batch then takes the next path); a large upsert
is ``COPY``-ed into a per-session temp table and merged with one set-based ``INSERT ... SELECT``;
a small batch goes through ``executemany`` (pipelined by psycopg). On SQLite it is ``executemany``. Rows given with ``add`` must have unique keys within the batch
(aggregate first), as a Postgres upsert may not touch one row twice in a statement.

URLs are the event store's: ``postgresql://user@host:5432/db?schema=NAME`` (``schema`` becomes
the ``search_path``, so view tables sit next to the events) or ``sqlite:///path/to/file.db``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from fila.config import sqlite_path

POSTGRES = "postgres"
SQLITE = "sqlite"

COPY_THRESHOLD = 500          # rows: below this an executemany beats COPY + merge
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def ident(name: str) -> str:
    """Refuse anything but a plain identifier (table and column names are interpolated)."""
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


class Tx(ABC):
    """One open transaction. ``execute`` returns the row count; ``fetchall`` the rows as tuples."""

    dialect: str

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Each dialect implements this."""

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run ``sql`` for each row (on Postgres in one round trip); the total row count."""

    @abstractmethod
    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Each dialect implements this."""

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                    key: Sequence[str], add: Sequence[str] = ()) -> None:
        """Each dialect implements this."""

    def _upsert_sql(self, table: str, columns: Sequence[str], key: Sequence[str], add: Sequence[str],
                    source: str) -> str:
        ident(table)
        cols = ", ".join(ident(c) for c in columns)
        conflict = f"ON CONFLICT ({', '.join(ident(k) for k in key)}) "
        if add:
            conflict += "DO UPDATE SET " + ", ".join(
                f"{ident(c)} = {table}.{c} + excluded.{c}" for c in add)
        else:
            conflict += "DO NOTHING"
        return f"INSERT INTO {table} ({cols}) {source} {conflict}"


class Database(ABC):
    """A connection source for one dialect. Thread-safe: each transaction has its own connection."""

    dialect: str
    url: str

    @abstractmethod
    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        """``durable=False``: the commit may be lost in a database crash (never half of it).
        Right for projection pages: their rows and their position would be lost together."""

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one read-only query, in a short transaction of its own."""
        with self.transaction() as tx:
            return tx.fetchall(sql, params)

    @abstractmethod
    def table_exists(self, name: str, tx: Tx | None = None) -> bool:
        """Each dialect implements this."""

    @abstractmethod
    def indexes(self, tx: Tx, table: str) -> list[tuple[str, str | None]]:
        """(name, CREATE statement or None) of each index of ``table``."""

    @abstractmethod
    def rename_index(self, tx: Tx, table: str, old: str, new: str, sql: str | None) -> None:
        """Each dialect implements this."""

    @abstractmethod
    def secondary_indexes(self, tx: Tx, table: str) -> list[tuple[str, str]]:
        """(name, CREATE statement) of each non-unique index of ``table``: a bulk load drops them
        and builds them once at the end (unique ones stay: ``ON CONFLICT`` needs them)."""

    def listener(self, channel: str | None) -> Listener:
        return Listener()

    @abstractmethod
    def close(self) -> None:
        """Each dialect implements this."""


class Listener:
    """Wakes a follower when the log may have grown. The base class never does (followers poll)."""

    notifying = False

    def __init__(self) -> None:
        self._stop = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken by a notification."""
        self._stop.wait(timeout)
        return False

    def close(self) -> None:
        self._stop.set()


# -- PostgreSQL --------------------------------------------------------------------------------


class _PgTx(Tx):
    dialect = POSTGRES

    def __init__(self, conn: Any, column_types: dict[str, dict[str, int]] | None = None) -> None:
        self.conn = conn
        self.cur = conn.cursor()
        self._staged: set[str] = set()
        self._column_types = {} if column_types is None else column_types   # table -> column -> type oid

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.cur.execute(self._sql(sql), params or None)
        return self.cur.rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        self.cur.executemany(self._sql(sql), rows)
        return self.cur.rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        self.cur.execute(self._sql(sql), params or None)
        return self.cur.fetchall()

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                    key: Sequence[str], add: Sequence[str] = ()) -> None:
        if not rows:
            return
        if len(rows) < COPY_THRESHOLD:
            values = "VALUES (" + ", ".join(["%s"] * len(columns)) + ")"
            self.cur.executemany(self._upsert_sql(table, columns, key, add, values), rows)
            return
        if not add and self._copy_direct(table, columns, rows):
            return
        stage = ident(f"_stage_{table}")
        cols = ", ".join(ident(c) for c in columns)
        if stage in self._staged:       # used before in this transaction
            self.cur.execute(f"TRUNCATE {stage}")
        else:                           # once per session; emptied by every commit or rollback
            self.cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {ident(table)}) ON COMMIT DELETE ROWS")
            self._staged.add(stage)
        with self.cur.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        self.cur.execute(self._upsert_sql(table, columns, key, add, f"SELECT {cols} FROM {stage}"))

    def _copy_direct(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bool:
        """``DO NOTHING`` the fast way: COPY straight in under a savepoint. A key that is already
        there (a replayed page) fails the COPY; then the caller merges through the stage table.

        The COPY is binary when every column is of a type in ``_BINARY_TYPES`` (less work on both
        sides than text: no escaping, no parsing of numbers and UUIDs); a value the binary
        format will not take for its column (an int for a text column ...) falls back to text."""
        import psycopg

        types = self._binary_types(table, columns)
        try:
            if types is not None:
                try:
                    self._copy(table, columns, rows, types)
                    return True
                except (TypeError, ValueError, OverflowError, psycopg.DataError):
                    # a value binary will not take (text takes it, or says what is wrong), or the
                    # table was made again with other types: read them again next time
                    self._column_types.pop(table, None)
            self._copy(table, columns, rows, None)
        except psycopg.errors.UniqueViolation:
            return False
        return True

    def _copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], types: list[int] | None) -> None:
        """COPY ``rows`` into ``table`` under a savepoint; binary with the column ``types`` if given."""
        cols = ", ".join(ident(c) for c in columns)
        with self.conn.transaction():
            with self.cur.copy(f"COPY {ident(table)} ({cols}) FROM STDIN"
                               + ("" if types is None else " (FORMAT BINARY)")) as copy:
                if types is not None:
                    copy.set_types(types)
                for row in rows:
                    copy.write_row(row)

    def _binary_types(self, table: str, columns: Sequence[str]) -> list[int] | None:
        """The type oids of ``columns`` if a binary COPY can write them all, else None (read once per
        table and database; a COPY refused for its types forgets them)."""
        if table not in self._column_types:
            self.cur.execute("SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass "
                             "AND attnum > 0 AND NOT attisdropped", (table,))
            self._column_types[table] = dict(self.cur.fetchall())
        known = self._column_types[table]
        types = [known.get(c) for c in columns]
        return types if all(t in _BINARY_TYPES for t in types) else None  # type: ignore[misc]


# types whose binary COPY format psycopg writes from the Python values views give them
# (int2, int4, int8, float8, bool, text, varchar, bytea, uuid; a uuid from its text too)
_BINARY_TYPES = frozenset({21, 23, 20, 701, 16, 25, 1043, 17, 2950})
_UUID_OID = 2950


def _uuid_text_dumper() -> type:
    """A binary dumper for uuid columns that takes the UUID's text (as views hold originator ids)
    or a ``uuid.UUID``; registered by oid only, so it serves COPY with ``set_types`` alone."""
    from uuid import UUID

    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class UuidTextBinaryDumper(Dumper):
        format = Format.BINARY
        oid = _UUID_OID

        def dump(self, obj: Any) -> bytes:
            if isinstance(obj, str):
                if len(obj) == 36 and obj[8] == obj[13] == obj[18] == obj[23] == "-":   # canonical form
                    return bytes.fromhex(obj.replace("-", ""))
                return UUID(obj).bytes
            return obj.bytes if isinstance(obj, UUID) else UUID(str(obj)).bytes

    return UuidTextBinaryDumper


class PostgresDatabase(Database):
    dialect = POSTGRES

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.schema = ident(query.pop("schema", ["public"])[0])
        self.conninfo = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
        self._column_types: dict[str, dict[str, int]] = {}
        dumper = _uuid_text_dumper()
        self._pool = ConnectionPool(self.conninfo, min_size=1, max_size=max_size, open=True,
                                    kwargs={"autocommit": True, "options": f"-c search_path={self.schema}"},
                                    configure=lambda conn: conn.adapters.register_dumper(None, dumper),
                                    name="fila-projections")
        with self._pool.connection() as conn:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        with self._pool.connection() as conn, conn.transaction():
            tx = _PgTx(conn, self._column_types)
            if not durable:
                tx.cur.execute("SET LOCAL synchronous_commit = off")
            try:
                yield tx
            finally:
                tx.cur.close()

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute(_PgTx._sql(sql), params or None)
            return cur.fetchall()

    def select_events(self, schema: str, table: str, start: int, stop: int, limit: int,
                      topics: Sequence[str] | None) -> list[tuple[int, str, int, str, bytes]]:
        """The event store recorder's ``select_notifications`` query (same table, filter, order and
        limit), read with a binary cursor into plain tuples ``(id, originator_id, version, topic,
        state)``: about 3x faster than the recorder's dict rows, UUID objects and Notifications."""
        from psycopg import sql

        by_topic = "" if topics is None else "AND topic = ANY(%s) "
        query = sql.SQL("SELECT notification_id, originator_id::text, originator_version, topic, state "
                        "FROM {}.{} WHERE notification_id > %s AND notification_id <= %s " + by_topic +
                        "ORDER BY notification_id LIMIT %s").format(sql.Identifier(schema), sql.Identifier(table))
        params = (start, stop, limit) if topics is None else (start, stop, list(topics), limit)
        with self._pool.connection() as conn, conn.cursor(binary=True) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def analyze_if_stale(self, schema: str, table: str) -> bool:
        """ANALYZE ``table`` if it never was, or has changed more than its size since.

        A log written in bulk and read before autovacuum's next round has no statistics; the
        planner then sorts every row after the page start instead of walking the id index
        (3x the database CPU per page). ANALYZE samples, takes no lock readers or writers feel,
        and changes no data."""
        from psycopg import sql

        rows = self.read("SELECT n_live_tup, n_mod_since_analyze, last_analyze, last_autoanalyze "
                         "FROM pg_stat_user_tables WHERE schemaname = ? AND relname = ?", (schema, table))
        if not rows:
            return False
        live, modified, analyzed, autoanalyzed = rows[0]
        if (analyzed or autoanalyzed) and modified <= max(100_000, live):
            return False
        with self._pool.connection() as conn:
            conn.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
        return True

    def table_exists(self, name: str, tx: Tx | None = None) -> bool:
        sql, params = "SELECT 1 FROM pg_tables WHERE schemaname = ? AND tablename = ?", (self.schema, name)
        return bool(tx.fetchall(sql, params) if tx is not None else self.read(sql, params))

    def indexes(self, tx: Tx, table: str) -> list[tuple[str, str | None]]:
        return tx.fetchall("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = ? AND tablename = ?",
                           (self.schema, table))

    def secondary_indexes(self, tx: Tx, table: str) -> list[tuple[str, str]]:
        return tx.fetchall("SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
                           "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
                           "JOIN pg_namespace n ON n.oid = t.relnamespace "
                           "WHERE n.nspname = ? AND t.relname = ? AND NOT x.indisunique", (self.schema, table))

    def rename_index(self, tx: Tx, table: str, old: str, new: str, sql: str | None) -> None:
        # renaming the index behind a primary key renames the constraint too
        tx.execute(f"ALTER INDEX {ident(old)} RENAME TO {ident(new)}")

    def listener(self, channel: str | None) -> Listener:
        if not channel:
            return Listener()
        return _PgListener(self.conninfo, channel)

    def close(self) -> None:
        self._pool.close()


class _PgListener(Listener):
    """LISTEN on the event store's channel: its recorder NOTIFYs it in every insert transaction.

    Channels are per database, not per schema, so writes to other schemas wake us too; the
    follower then finds nothing new, which is harmless. A broken connection falls back to
    polling until it reconnects.
    """

    notifying = True

    def __init__(self, conninfo: str, channel: str) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._channel = ident(channel)
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        import psycopg

        try:
            self._conn = psycopg.connect(self._conninfo, autocommit=True)
            self._conn.execute(f"LISTEN {self._channel}")
        except psycopg.OperationalError:
            self._conn = None

    def wait(self, timeout: float) -> bool:
        import psycopg

        if self._stop.is_set():
            return False
        if self._conn is None:
            self._stop.wait(timeout)
            self._connect()
            return False
        try:
            woken = False
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                woken = True
            return woken
        except psycopg.OperationalError:
            self._conn = None
            return False

    def close(self) -> None:
        super().close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- SQLite ------------------------------------------------------------------------------------


class _SqliteTx(Tx):
    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self.conn.executemany(sql, rows).rowcount if rows else 0

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                    key: Sequence[str], add: Sequence[str] = ()) -> None:
        if rows:
            values = "VALUES (" + ", ".join(["?"] * len(columns)) + ")"
            self.conn.executemany(self._upsert_sql(table, columns, key, add, values), rows)


class SqliteDatabase(Database):
    """One connection per thread, WAL, ``BEGIN IMMEDIATE`` for writes (no upgrade deadlocks)."""

    dialect = SQLITE

    def __init__(self, url: str, *, lock_timeout: float = 10.0) -> None:
        self.url = url
        self.path = sqlite_path(url)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._timeout = lock_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        conn = self._conn()     # WAL with synchronous=NORMAL: commits are not fsynced anyway
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn().execute(sql, params).fetchall()

    def table_exists(self, name: str, tx: Tx | None = None) -> bool:
        sql, params = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        return bool(tx.fetchall(sql, params) if tx is not None else self.read(sql, params))

    def indexes(self, tx: Tx, table: str) -> list[tuple[str, str | None]]:
        return tx.fetchall("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,))

    def secondary_indexes(self, tx: Tx, table: str) -> list[tuple[str, str]]:
        rows = tx.fetchall("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                           "AND sql IS NOT NULL", (table,))
        return [(name, sql) for name, sql in rows if not re.match(r"\s*CREATE\s+UNIQUE\b", sql, re.I)]

    def rename_index(self, tx: Tx, table: str, old: str, new: str, sql: str | None) -> None:
        # SQLite cannot rename an index: drop it and create it again under the new name
        if sql is None:       # an automatic index (PRIMARY KEY / UNIQUE): it follows its table
            return
        tx.execute(f"DROP INDEX {ident(old)}")
        tx.execute(re.sub(rf"\b{re.escape(old)}\b", new, sql, count=1))

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def open_database(url: str) -> Database:
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    if scheme == "sqlite":
        return SqliteDatabase(url)
    raise ValueError(f"unsupported database URL {url!r}")
