"""``fila audit replay`` and ``GET /admin/audit/cycles/{id}``, on SQLite and on PostgreSQL.

Real traffic: a plan and an assignment saved through the store, then ledger entries of that
assignment (``LedgerEntry`` aggregates, as the gateway records them), the billing view built by
the projector. The replay must agree with the view to the cent, and with a bill worked out here
by hand; a corrupted or lagging view must be reported with the events responsible, exit 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import uuid4

import httpx
import msgspec
import pytest

from fila.adapters.eventstore import FilaStore, open_store
from fila.cli import main
from fila.config import load_settings
from fila.domain.billing_cycle import cycle_id_for
from fila.domain.billing_fold import TOPICS, figures, replay as fold_replay
from fila.domain.ledger import LedgerEntry
from fila.domain.plans import Assignment, Plan, assignment_id_for
from fila.domain.time import iso
from fila.projections.billing import BillingView
from fila.projections.db import Database, open_database
from fila.projections.runner import Projector
from fila.services.audit import replay
from tests.support import new_pg_url, running_fila

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TERMS = {"name": "Audit Pro", "monthly_price_minor": 2000, "included_tokens": 500,
         "input_price_per_million": "1.50", "output_price_per_million": "6.00"}


class Traffic:
    """One plan, keys on it, their requests in the log, and the billing view over them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: FilaStore = open_store(url)
        self.db: Database = open_database(url)
        self.plan = Plan.define(f"audit-{uuid4().hex[:8]}", TERMS, T0)
        self.store.save(self.plan)
        self.key, self.assignment_id = self.assign()
        self.cycle_id = str(cycle_id_for(self.assignment_id, 0))

    def assign(self) -> tuple[str, str]:
        key = f"key-{uuid4().hex[:8]}"
        assignment = Assignment.assign(assignment_id_for(key, 0), key, str(self.plan.id), T0, None, T0)
        self.store.save(assignment)
        return key, str(assignment.id)

    def requests(self, hours: range, key: str | None = None, assignment_id: str | None = None) -> list[LedgerEntry]:
        entries = [LedgerEntry(id=uuid4(), api_key_id=key or self.key, at=iso(T0 + timedelta(hours=h)), outcome="ok",
                               status=200, model="gpt-4.1-nano", prompt_tokens=17 + h, completion_tokens=33,
                               total_tokens=50 + h, plan_id=str(self.plan.id), plan_version=1,
                               assignment_id=assignment_id or self.assignment_id) for h in hours]
        self.store.save(*entries)
        return entries

    def project(self) -> None:
        projector = Projector(self.db, self.store.recorder, [BillingView()])
        try:
            projector.catch_up()
        finally:
            projector.close()

    def view(self, column: str) -> Any:
        return self.db.read(f"SELECT {column} FROM billing_cycles WHERE id = ?", (self.cycle_id,))[0][0]

    def corrupt(self, assignment: str) -> None:
        with self.db.transaction() as tx:
            tx.execute(f"UPDATE billing_cycles SET {assignment} WHERE id = ?", (self.cycle_id,))

    def close(self) -> None:
        self.db.close()
        self.store.close()


@pytest.fixture
def traffic(database_url: str) -> Iterator[Traffic]:
    opened = Traffic(database_url)
    yield opened
    opened.close()


def audit(monkeypatch: Any, capsys: Any, url: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("FILA_DATABASE_URL", url)
    capsys.readouterr()                  # only the command's own output
    code = main(["audit", "replay", *argv])
    return code, capsys.readouterr().out


def by_hand(entries: list[LedgerEntry]) -> int:
    """The bill of these requests under TERMS, worked out here: allowance in request order, input
    before output; overage priced per million; each line rounded once, half-up."""
    left = TERMS["included_tokens"]
    over = {"in": 0, "out": 0}
    for e in entries:
        for kind, tokens in (("in", e.prompt_tokens), ("out", e.completion_tokens)):
            included = min(tokens, left)
            left -= included
            over[kind] += tokens - included
    cost = {"in": Decimal(over["in"]) * Decimal("1.50") / 10**6, "out": Decimal(over["out"]) * Decimal("6.00") / 10**6}
    cents = sum(int((c * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for c in cost.values())
    return TERMS["monthly_price_minor"] + cents


def test_replay_agrees_with_the_view_to_the_cent(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    entries = traffic.requests(range(40))
    traffic.project()
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id)
    assert code == 0, out
    assert "AGREES with the billing view" in out
    for entry in entries:                              # every contributing event is listed
        assert str(entry.id) in out
    report = replay(traffic.store.recorder, traffic.db, traffic.cycle_id)
    assert report.agrees and report.compared and not report.differences
    assert report.figures["total_minor"] == traffic.view("total_minor") == by_hand(entries) == 2001
    usage = [c for c in report.contributions if c.kind == "usage"]
    assert [c.entry_id for c in usage] == [str(e.id) for e in entries]
    assert [c.running_requests for c in usage] == list(range(1, 41))
    assert usage[-1].running_total_minor == 2001
    assert sum(c.included_input_tokens + c.included_output_tokens for c in usage) == 500
    assert usage[9].included_input_tokens == 14 and usage[9].overage_output_tokens == 33   # the allowance runs out


def test_corrupted_total_is_reported(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    traffic.requests(range(10))
    traffic.project()
    traffic.corrupt("total_minor = total_minor + 1")
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id, "--json")
    assert code == 1
    report = msgspec.json.decode(out)
    assert report["agrees"] is False
    [difference] = report["differences"]
    assert difference["field"] == "total_minor"
    assert difference["view"] == difference["replay"] + 1
    assert "not the sum of its own amounts" in difference["explanation"]


def test_a_request_missing_from_the_view_is_named(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    entries = traffic.requests(range(12))                # the allowance runs out at the 10th
    traffic.project()
    last = entries[-1]
    traffic.corrupt(f"requests = requests - 1, input_tokens = input_tokens - {last.prompt_tokens}, "
                    "overage_output_tokens = overage_output_tokens - 33")
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id)
    assert code == 1
    assert "requests: view 11, replay 12" in out
    assert f"entry {last.id}" in out                   # the request the view's figures leave out
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id, "--json")
    differences = {d["field"]: d for d in msgspec.json.decode(out)["differences"]}
    assert {"requests", "input_tokens", "overage_output_tokens"} <= set(differences)
    before = entries[-2]
    for field in ("requests", "input_tokens", "overage_output_tokens"):
        difference = differences[field]
        assert [e["entry_id"] for e in difference["events"]] == [str(last.id)], difference
        assert f"(entry {before.id})" in difference["explanation"]      # where the view's value is reached


def test_a_lagging_view_is_reported_with_the_events_it_has_not_applied(traffic: Traffic, monkeypatch: Any,
                                                                      capsys: Any) -> None:
    traffic.requests(range(5))
    traffic.project()
    later = traffic.requests(range(5, 8))
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id)
    assert code == 1
    assert "agrees with the events up to there; 3 later events touch this cycle" in out
    for entry in later:
        assert f"entry {entry.id}" in out
    traffic.project()
    assert audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id)[0] == 0


def test_as_of_leaves_out_later_events(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    entries = traffic.requests(range(30))
    traffic.project()
    as_of = iso(T0 + timedelta(hours=19, minutes=30))
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id, "--as-of", as_of, "--json")
    assert code == 0, out
    report = msgspec.json.decode(out)
    usage = [c for c in report["contributions"] if c["kind"] == "usage"]
    assert [c["entry_id"] for c in usage] == [str(e.id) for e in entries[:20]]
    assert report["figures"]["requests"] == 20 and report["figures"]["total_minor"] == by_hand(entries[:20])
    assert report["events_excluded"] == 10 and report["compared"] is False
    later = iso(T0 + timedelta(days=3))                # nothing left out: compared, and it agrees
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id, "--as-of", later)
    assert code == 0 and "AGREES" in out


def test_an_event_that_cannot_be_decoded_fails_the_replay(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    entries = traffic.requests(range(4))
    traffic.project()
    [victim] = [n.id for n in traffic.store.recorder.select_notifications(start=1, limit=100)
                if n.originator_id == entries[1].id]
    table = traffic.store.recorder.events_table_name
    key = "notification_id" if traffic.url.startswith("postgresql") else "rowid"
    with traffic.db.transaction() as tx:       # the event table, edited behind the application's back
        tx.execute(f"UPDATE {table} SET state = ? WHERE {key} = ?", (b"{not json", victim))
    code, out = audit(monkeypatch, capsys, traffic.url, "--cycle", traffic.cycle_id)
    assert code == 1
    assert "cannot be decoded" in out and f"position {victim} fila:LedgerEntry.Recorded" in out


def test_unknown_cycle_exits_non_zero(traffic: Traffic, monkeypatch: Any, capsys: Any) -> None:
    traffic.requests(range(2))
    monkeypatch.setenv("FILA_DATABASE_URL", traffic.url)
    assert main(["audit", "replay", "--cycle", str(uuid4())]) == 2
    assert "no billing cycle" in capsys.readouterr().err


def test_other_keys_traffic_does_not_change_the_replay(traffic: Traffic) -> None:
    other_key, other_assignment = traffic.assign()
    for hours in (range(0, 6), range(6, 12)):          # interleaved with another key's requests
        traffic.requests(hours)
        traffic.requests(hours, key=other_key, assignment_id=other_assignment)
    traffic.requests(range(40 * 24, 40 * 24 + 2), key=other_key, assignment_id=other_assignment)  # February
    traffic.project()
    report = replay(traffic.store.recorder, traffic.db, traffic.cycle_id)
    assert report.agrees, report.differences
    assert report.figures["close_requested_position"] is not None   # the other key's clock made it due
    # the whole fold over every event as dicts (no shortcut for the other key) gives the same row
    notes = traffic.store.recorder.select_notifications(start=1, limit=10_000, topics=list(TOPICS))
    fold = fold_replay(((n.id, n.topic, n.originator_id, msgspec.json.decode(n.state), n.originator_version)
                        for n in notes), track=lambda cid: cid == traffic.cycle_id)
    whole = figures(fold.cycles[traffic.cycle_id])
    assert whole == {k: report.figures[k] for k in whole}
    assert fold.cycles[traffic.cycle_id].close_requested_position == report.figures["close_requested_position"]


def test_http_replay_and_verify(monkeypatch: Any) -> None:
    url = new_pg_url()
    traffic = Traffic(url)
    try:
        entries = traffic.requests(range(6))
        head = traffic.store.recorder.max_notification_id()
        settings = load_settings({}, database_url=url, admin_token="audit-admin", openai_api_key="sk-x")
        with running_fila(settings) as server:
            assert server.container.projector.wait_for("billing", head, timeout=15)
            assert server.container.projector.wait_for("audit_chain", head, timeout=15)
            auth = {"Authorization": "Bearer audit-admin"}
            with httpx.Client(base_url=server.base_url, timeout=15) as client:
                answer = client.get(f"/admin/audit/cycles/{traffic.cycle_id}", headers=auth)
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["agrees"] is True and body["figures"]["total_minor"] == by_hand(entries)
                assert len([c for c in body["contributions"] if c["kind"] == "usage"]) == 6
                as_of = client.get(f"/admin/audit/cycles/{traffic.cycle_id}",
                                   params={"as_of": iso(T0 + timedelta(hours=2, minutes=1))}, headers=auth).json()
                assert as_of["figures"]["requests"] == 3
                assert client.get(f"/admin/audit/cycles/{traffic.cycle_id}",
                                  params={"as_of": "yesterday"}, headers=auth).status_code == 400
                assert client.get(f"/admin/audit/cycles/{uuid4()}", headers=auth).status_code == 404
                assert client.get(f"/admin/audit/cycles/{traffic.cycle_id}").status_code == 401
                checked = client.get("/admin/audit/verify", headers=auth).json()
                assert checked["ok"] is True and checked["verified_events"] >= head
    finally:
        traffic.close()


def test_a_cycle_id_that_is_not_a_uuid_is_a_400_naming_it(tmp_path):
    """Found by fuzzing the routes: a NUL byte in the id reached PostgreSQL and answered 500."""
    import httpx

    from fila.adapters.fake_upstream import FakeUpstream
    from fila.config import load_settings
    from tests.support import new_pg_url, running_fila

    with FakeUpstream.start_in_thread() as fake:
        settings = load_settings({}, database_url=new_pg_url(), upstream_base_url=fake.base_url,
                                 openai_api_key="x", admin_token="adm")
        with running_fila(settings) as server:
            for bad in ("%00", "not-a-cycle"):
                answer = httpx.get(f"{server.base_url}/admin/audit/cycles/{bad}",
                                   headers={"authorization": "Bearer adm"}, timeout=10)
                assert answer.status_code == 400, answer.text
                assert answer.json()["error"]["field"] == "cycle_id"
