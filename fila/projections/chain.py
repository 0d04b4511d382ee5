"""The audit hash chain: one link per stored event, over every topic of the log.

Each stored event gets two hashes (hex SHA-256)::

    event_hash_i = sha256(b"<notification_id>\\x1f<originator_id>\\x1f<originator_version>\\x1f<topic>\\x1f"
                          + sha256(state_i))
    link_hash_i  = sha256(link_hash_{i-1} + event_hash_i)        # both as 32 raw bytes
    link_hash_0  = sha256(b"fila-audit-chain-v1")                # genesis, before the first event

so the link of an event commits to it and to every event chained before it. ``originator_id`` is
the canonical UUID text (lower case, hyphens) on both backends; ``state`` is the stored bytes as
the recorder returns them, never a decoded and re-encoded form.

Notification ids can have gaps (a rolled-back insert consumes a sequence number), so the chain
is keyed by notification id and links events in id order, never assuming contiguity. The table
keeps the originator id, version and topic too, so a deleted event can be named afterwards.

:func:`chain_head` is the last link: billing records it in each cycle's ``Closed`` event, and
``fila.services.audit.verify`` walks the stored events and this table in step to find any event
altered or deleted after it was chained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

from fila.projections.db import Database, Tx
from fila.projections.runner import Note, Run, Step, View

TABLE = "audit_chain"
GENESIS = hashlib.sha256(b"fila-audit-chain-v1").hexdigest()
COLUMNS = ("notification_id", "link_hash", "event_hash", "originator_id", "originator_version", "topic")

_sha256 = hashlib.sha256
_LINKED = attrgetter("id", "originator_id", "version", "topic", "state")   # a Note as chain_rows takes it


def event_hash(notification_id: int, originator_id: Any, originator_version: int, topic: str,
               state: bytes) -> str:
    """The hash of one stored event: its position, identity, topic and stored state bytes."""
    head = f"{notification_id}\x1f{originator_id}\x1f{originator_version}\x1f{topic}\x1f".encode()
    if isinstance(state, str):   # SQLite hands back TEXT if someone stored text in the BLOB column
        state = state.encode()
    return _sha256(head + _sha256(state).digest()).hexdigest()


def link_hash(previous_link: str, event_hash_hex: str) -> str:
    return _sha256(bytes.fromhex(previous_link) + bytes.fromhex(event_hash_hex)).hexdigest()


def chain_rows(previous_link: str, events: Iterable[tuple[int, Any, int, str, bytes]]) -> list[tuple]:
    """Rows (``COLUMNS`` order) linking ``events`` (id, originator id, version, topic, state), in order.

    The same hashes as :func:`event_hash` and :func:`link_hash`, kept as raw digests from one link to
    the next (hex only for the row): the chain view hashes every event of the log."""
    rows = []
    append = rows.append
    link = bytes.fromhex(previous_link)
    for nid, originator_id, version, topic, state in events:
        originator = str(originator_id)
        if isinstance(state, str):
            state = state.encode()
        digest = _sha256(f"{nid}\x1f{originator}\x1f{version}\x1f{topic}\x1f".encode()
                         + _sha256(state).digest()).digest()
        link = _sha256(link + digest).digest()
        append((nid, link.hex(), digest.hex(), originator, version, topic))
    return rows


class AuditChain(View):
    """``audit_chain``: a link per stored event, every topic, states hashed as stored."""

    name = "audit_chain"
    topics = None          # every topic of the log
    raw = True             # Note.state is the stored bytes, undecoded
    tables = (TABLE,)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {TABLE}{suffix} (notification_id BIGINT PRIMARY KEY, "
                "link_hash TEXT NOT NULL, event_hash TEXT NOT NULL, originator_id TEXT NOT NULL, "
                "originator_version BIGINT NOT NULL, topic TEXT NOT NULL)"]

    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        self.stage(notes, suffix, Run(tx.fetchall))(tx)

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        table = f"{TABLE}{suffix}"
        previous = run.state.get("link")     # the last link of the run's previous page
        if previous is None:
            # the link just before this page, as committed (a repeated page links from the same
            # place, and then inserts nothing: ON CONFLICT DO NOTHING)
            found = run.read(f"SELECT link_hash FROM {table} WHERE notification_id < ? "
                             "ORDER BY notification_id DESC LIMIT 1", (notes[0].id,))
            previous = found[0][0] if found else GENESIS
        rows = chain_rows(previous, map(_LINKED, notes))
        run.state["link"] = rows[-1][1]
        return lambda tx: tx.insert_many(table, COLUMNS, rows, key=("notification_id",))


def views() -> list[View]:
    return [AuditChain()]


def chain_head(db: Database, tx: Tx | None = None) -> dict[str, Any] | None:
    """The last link: ``{"position": notification id, "link_hash": hex}``, or None (nothing chained).

    ``position`` is the last *chained* event; events after it are not yet chained (the view lags).
    Pass ``tx`` to read it inside an open transaction.
    """
    if not db.table_exists(TABLE, tx):
        return None
    sql = f"SELECT notification_id, link_hash FROM {TABLE} ORDER BY notification_id DESC LIMIT 1"
    rows = tx.fetchall(sql) if tx is not None else db.read(sql)
    return {"position": int(rows[0][0]), "link_hash": rows[0][1]} if rows else None


def chain_rows_after(db: Database, after: int, limit: int) -> list[tuple]:
    """Chain rows (``COLUMNS`` order) with ``notification_id > after``, in id order, at most ``limit``."""
    return db.read(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE notification_id > ? "
                   "ORDER BY notification_id LIMIT ?", (after, limit))


def link_at(db: Database, position: int) -> str | None:
    """The link hash of the chained event at ``position`` (None when not chained)."""
    rows = db.read(f"SELECT link_hash FROM {TABLE} WHERE notification_id = ?", (position,))
    return rows[0][0] if rows else None
