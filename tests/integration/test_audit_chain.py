"""The audit hash chain and ``fila audit verify``, on SQLite and on PostgreSQL.

Events are saved through the store, chained by the ``audit_chain`` view, then tampered with
directly in the event table (as an attacker with database access would) and checked through
the CLI (``fila.cli.main``), which must exit non-zero and name the notification id.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from fila.adapters.eventstore import FilaStore, open_store
from fila.cli import main
from fila.domain.ledger import LedgerEntry
from fila.projections.chain import GENESIS, TABLE, AuditChain, chain_head, chain_rows
from fila.projections.db import Database, open_database
from fila.projections.runner import Projector
from fila.services.audit import verify


def entry(n: int) -> LedgerEntry:
    return LedgerEntry(id=uuid4(), api_key_id="k-audit", at=f"2026-01-15T12:00:{n % 60:02d}+00:00",
                       outcome="ok", status=200, model="gpt-4.1-nano", prompt_tokens=n, completion_tokens=2 * n,
                       total_tokens=3 * n)


class Log:
    """A store, its projections database and raw SQL on its event table, for one backend."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: FilaStore = open_store(url)
        self.db: Database = open_database(url)
        self.table = self.store.recorder.events_table_name
        self.postgres = url.startswith("postgresql")

    def save(self, count: int) -> list[int]:
        ids = []
        for start in range(0, count, 50):
            recordings = self.store.save(*(entry(n) for n in range(start, min(count, start + 50))))
            ids.extend(r.notification.id for r in recordings)
        return ids

    def chain(self, page: int = 10_000) -> None:
        projector = Projector(self.db, self.store.recorder, [AuditChain()], page=page)
        try:
            projector.catch_up()
        finally:
            projector.close()

    def sql(self, statement: str, params: tuple = ()) -> None:
        """Run one statement against the event store's own tables (bypassing the application)."""
        if self.postgres:
            base, schema = self.url.split("?schema=")
            with psycopg.connect(base, autocommit=True, options=f"-c search_path={schema}") as conn:
                conn.execute(statement.replace("?", "%s").replace("notification_id_col", "notification_id"), params)
        else:
            with sqlite3.connect(self.db.path) as conn:
                conn.execute(statement.replace("notification_id_col", "rowid"), params)

    def tamper(self, notification_id: int) -> None:
        state = b'{"api_key_id":"k-audit","at":"2026-01-15T12:00:00+00:00","outcome":"ok","status":200,' \
                b'"model":"gpt-4.1-nano","prompt_tokens":1,"completion_tokens":0,"total_tokens":1}'
        self.sql(f"UPDATE {self.table} SET state = ? WHERE notification_id_col = ?", (state, notification_id))

    def delete(self, notification_id: int) -> None:
        self.sql(f"DELETE FROM {self.table} WHERE notification_id_col = ?", (notification_id,))

    def close(self) -> None:
        self.db.close()
        self.store.close()


@pytest.fixture
def log(database_url: str) -> Iterator[Log]:
    opened = Log(database_url)
    yield opened
    opened.close()


def run_cli(monkeypatch: Any, capsys: Any, url: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("FILA_DATABASE_URL", url)
    capsys.readouterr()                  # only the command's own output
    code = main(["audit", *argv])
    return code, capsys.readouterr().out


def test_untouched_log_verifies(log: Log, monkeypatch: Any, capsys: Any) -> None:
    log.save(120)
    log.chain(page=17)      # several pages: each page links from the last row of the one before
    code, out = run_cli(monkeypatch, capsys, log.url, "verify")
    assert code == 0, out
    assert "stored events: 120  chained: 120  verified: 120" in out
    assert "OK" in out


def test_chain_links_every_event_in_id_order_from_genesis(log: Log) -> None:
    log.save(30)
    log.chain(page=7)
    stored = log.store.recorder.select_notifications(start=1, limit=100)
    expected = chain_rows(GENESIS, ((n.id, n.originator_id, n.originator_version, n.topic, n.state)
                                    for n in stored))
    assert log.db.read(f"SELECT * FROM {TABLE} ORDER BY notification_id") == [tuple(r) for r in expected]
    assert chain_head(log.db) == {"position": stored[-1].id, "link_hash": expected[-1][1]}


def test_altered_event_is_named(log: Log, monkeypatch: Any, capsys: Any) -> None:
    ids = log.save(40)
    log.chain()
    victim = ids[17]
    log.tamper(victim)
    code, out = run_cli(monkeypatch, capsys, log.url, "verify")
    assert code == 1
    assert f"ALTERED: notification {victim} fila:LedgerEntry.Recorded" in out
    assert "DELETED" not in out and "BROKEN" not in out
    assert "1 altered" in out


def test_deleted_event_is_named(log: Log, monkeypatch: Any, capsys: Any) -> None:
    ids = log.save(40)
    log.chain()
    victim = ids[5]
    log.delete(victim)
    code, out = run_cli(monkeypatch, capsys, log.url, "verify", "--json")
    assert code == 1
    import msgspec

    report = msgspec.json.decode(out)
    assert report["ok"] is False
    assert report["counts"]["deleted"] == 1 and report["counts"]["altered"] == 0
    [problem] = report["problems"]
    assert problem["kind"] == "deleted" and problem["notification_id"] == victim
    assert problem["topic"] == "fila:LedgerEntry.Recorded" and problem["originator_id"]


def test_deleting_the_last_chained_event_is_noticed(log: Log) -> None:
    ids = log.save(10)
    log.chain()
    log.delete(ids[-1])
    report = verify(log.db, log.store.recorder)
    assert [(p.kind, p.notification_id) for p in report.problems] == [("deleted", ids[-1])]


def test_events_after_the_head_are_not_yet_chained(log: Log, monkeypatch: Any, capsys: Any) -> None:
    log.save(10)
    log.chain()
    log.save(5)
    code, out = run_cli(monkeypatch, capsys, log.url, "verify", "--no-chain")
    assert code == 0, out
    assert "not yet chained: 5" in out
    code, out = run_cli(monkeypatch, capsys, log.url, "verify")      # chains them first
    assert code == 0 and "chained: 15" in out and "not yet chained: 0" in out


def test_rewriting_the_chain_to_hide_an_alteration_breaks_the_link(log: Log) -> None:
    ids = log.save(20)
    log.chain()
    victim = ids[8]
    log.tamper(victim)
    # the attacker also rewrites that event's hash in the chain, but cannot forge the links after it
    [stored] = log.store.recorder.select_notifications(start=victim, limit=1)
    [row] = chain_rows(GENESIS, [(stored.id, stored.originator_id, stored.originator_version, stored.topic,
                                  stored.state)])
    with log.db.transaction() as tx:
        tx.execute(f"UPDATE {TABLE} SET event_hash = ? WHERE notification_id = ?", (row[2], victim))
    report = verify(log.db, log.store.recorder)
    assert not report.ok
    assert [(p.kind, p.notification_id) for p in report.problems] == [("broken_link", victim)]


def test_rebuilt_chain_is_identical(log: Log) -> None:
    log.save(50)
    log.chain(page=9)
    before = chain_head(log.db)
    projector = Projector(log.db, log.store.recorder, [AuditChain()], page=13)
    try:
        projector.rebuild()
    finally:
        projector.close()
    assert chain_head(log.db) == before


def test_gaps_in_notification_ids_are_not_deletions(pg_url: str) -> None:
    log = Log(pg_url)
    try:
        log.save(5)
        schema = pg_url.split("?schema=")[1]
        base = pg_url.split("?")[0]
        with psycopg.connect(base, autocommit=True) as conn:   # a rolled-back insert consumes ids
            conn.execute(f"SELECT nextval(pg_get_serial_sequence('\"{schema}\".{log.table}', 'notification_id')) "
                         "FROM generate_series(1, 3)")
        log.save(5)
        ids = [n.id for n in log.store.recorder.select_notifications(start=1, limit=100)]
        assert ids[5] - ids[4] == 4       # the gap is real
        log.chain(page=3)
        report = verify(log.db, log.store.recorder, page=4)
        assert report.ok, report.problems
        assert report.verified_events == 10
    finally:
        log.close()


def test_removing_a_chain_row_is_noticed(log: Log) -> None:
    ids = log.save(12)
    log.chain()
    with log.db.transaction() as tx:
        tx.execute(f"DELETE FROM {TABLE} WHERE notification_id = ?", (ids[4],))
    report = verify(log.db, log.store.recorder)
    assert [(p.kind, p.notification_id) for p in report.problems] == [("unchained", ids[4]),
                                                                      ("broken_link", ids[5])]


def test_a_closed_cycle_pins_the_chain_head(log: Log, monkeypatch: Any, capsys: Any) -> None:
    from datetime import UTC, datetime

    from fila.domain.billing_cycle import BillingCycle

    log.save(8)
    log.chain()
    head = chain_head(log.db)
    assert head is not None
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    honest = BillingCycle.close("a-1", "k-audit", 0, start, end, by="fila", now=end, chain_head=head)
    forged = BillingCycle.close("a-2", "k-audit", 0, start, end, by="fila", now=end,
                                chain_head={"position": head["position"], "link_hash": "0" * 64})
    log.store.save(honest, forged)
    code, out = run_cli(monkeypatch, capsys, log.url, "verify")
    assert code == 1
    assert "cycle heads checked: 2" in out
    assert out.count("HEAD_MISMATCH") == 1 and f"cycle {forged.id}" in out


def test_the_command_as_a_process_prints_clean_json(pg_url: str) -> None:
    import os
    import subprocess
    import sys

    import msgspec

    log = Log(pg_url)
    try:
        ids = log.save(6)
        log.chain()
        log.tamper(ids[2])
        env = dict(os.environ, FILA_DATABASE_URL=pg_url, FILA_LOG_FORMAT="json")
        done = subprocess.run([sys.executable, "-m", "fila.cli", "audit", "verify", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        report = msgspec.json.decode(done.stdout)       # logs went to stderr, the report alone to stdout
        assert [(p["kind"], p["notification_id"]) for p in report["problems"]] == [("altered", ids[2])]
    finally:
        log.close()
