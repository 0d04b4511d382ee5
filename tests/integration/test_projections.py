"""Projections (fila.projections.runner / usage) on SQLite and on PostgreSQL.

Every test runs on both backends (the ``database_url`` fixture: a temp SQLite file, or a fresh
Postgres schema). Expected figures come from an oracle that sums the saved entries in Python.
"""

from __future__ import annotations

import argparse
import io
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
import structlog

from fila.adapters.eventstore import FilaStore, open_store
from fila.domain.ledger import BILLABLE_OUTCOMES, RECORDED_TOPIC, BreakerTransition, LedgerEntry
from fila.projections import cli as projections_cli
from fila.projections import usage
from fila.projections.billing import BillingRecorded, BillingView
from fila.projections.chain import AuditChain
from fila.projections.db import Database, Tx, open_database
from fila.projections.runner import Note, Projector, View

DAY0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
OUTCOMES = ["ok"] * 6 + ["client_disconnected", "upstream_error", "upstream_rejected", "breaker_open",
                         "rate_limited", "quota_exhausted", "forbidden"]
REFUSALS = {"rate_limited", "quota_exhausted", "forbidden"}
CACHES = ["none", "none", "hit", "miss", "bypass", "refresh"]
ALL_TABLES = ("token_usage_log", "usage_daily", "rate_limit_refusals", "cache_stats_daily")


def make_entry(rng: random.Random, i: int, keys: tuple[str, ...] = ("key-a", "key-b", "key-c"),
               **fields: Any) -> LedgerEntry:
    outcome = fields.pop("outcome", None) or rng.choice(OUTCOMES)
    cache = rng.choice(CACHES) if outcome == "ok" else "none"
    prompt, completion = rng.randint(1, 500), rng.randint(0, 300)
    refused = outcome in REFUSALS
    return LedgerEntry(
        id=uuid4(), api_key_id=rng.choice(keys), at=(DAY0 + timedelta(hours=7 * i)).isoformat(),
        outcome=outcome, status=200 if outcome in BILLABLE_OUTCOMES else 429 if refused else 502,
        model=fields.pop("model", None) or rng.choice(["m-small", "m-large"]), stream=rng.random() < 0.5,
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        latency_us=rng.randint(1000, 90_000), cache=cache,
        cache_layer=rng.choice(["memory", "redis", None]) if cache != "none" else None,
        tokens_saved=prompt + completion if cache == "hit" else 0,
        upstream=fields.pop("upstream", None) or ("primary" if not refused else None), error="boom" if outcome.startswith(("up", "br")) else None,
        plan_id="plan-1", assignment_id="asg-1",
        refusal_rule="rpm:10" if refused else None, refusal_counts={"rpm": 11} if refused else None,
        **fields)


def daily_oracle(entries: list[LedgerEntry]) -> dict[tuple, dict[str, int]]:
    out: dict[tuple, Counter] = {}
    for e in entries:
        c = out.setdefault((e.api_key_id, e.at[:10], e.model), Counter())
        c["requests"] += 1
        c["ok_requests"] += e.outcome == "ok"
        if e.outcome in BILLABLE_OUTCOMES:
            c["prompt_tokens"] += e.prompt_tokens
            c["completion_tokens"] += e.completion_tokens
            c["total_tokens"] += e.total_tokens
        c["refusals"] += e.outcome in REFUSALS
        c["errors"] += e.outcome not in BILLABLE_OUTCOMES and e.outcome not in REFUSALS
        c["cache_hits"] += e.cache == "hit"
        c["tokens_saved"] += e.tokens_saved
        c["latency_us_sum"] += e.latency_us
    return {k: {name: v.get(name, 0) for name in usage.DAILY_SUMS} for k, v in out.items()}


def daily_rows(db: Database) -> dict[tuple, dict[str, int]]:
    rows = db.read(f"SELECT api_key_id, day, model, {', '.join(usage.DAILY_SUMS)} FROM usage_daily")
    return {tuple(r[:3]): dict(zip(usage.DAILY_SUMS, r[3:])) for r in rows}


def snapshot(db: Database, tables: tuple[str, ...] = ALL_TABLES) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order, with values normalised across drivers."""
    out = {}
    for table in tables:
        rows = db.read(f"SELECT * FROM {table}")
        out[table] = sorted(tuple(str(v) if v is not None else None for v in row) for row in rows)
    return out


@dataclass
class Env:
    store: FilaStore
    db: Database
    projector: Projector
    url: str

    def save(self, *entries: Any) -> int:
        """Save and return the notification id of the last event (what read-your-writes waits on)."""
        return self.store.save(*entries)[-1].notification.id

    def projector_with(self, views: list[View], **kwargs: Any) -> Projector:
        return Projector(self.db, self.store.recorder, views, **kwargs)


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    store = open_store(database_url)
    db = open_database(database_url)
    projector = Projector(db, store.recorder, usage.views(), page=7)
    try:
        yield Env(store, db, projector, database_url)
    finally:
        projector.close()
        db.close()
        store.close()


# -- building the views --------------------------------------------------------------------------


def test_views_project_every_request_exactly(env: Env) -> None:
    rng = random.Random(1)
    entries = [make_entry(rng, i) for i in range(60)]
    env.save(*entries)
    env.save(BreakerTransition(id=uuid4(), breaker="primary", from_state="closed", to_state="open",
                               reason="errors", at=DAY0.isoformat(), process="p"))   # another topic, last

    assert env.projector.catch_up() == 60
    assert daily_rows(env.db) == daily_oracle(entries)

    log = {r["entry_id"]: r for r in usage.usage_log(env.db, limit=1000)["data"]}
    assert len(log) == 60
    first = log[str(entries[0].id)]
    assert (first["api_key_id"], first["model"], first["outcome"], first["total_tokens"], first["at"],
            first["stream"], first["cost_micros"]) == (entries[0].api_key_id, entries[0].model, entries[0].outcome,
                                                        entries[0].total_tokens, entries[0].at, entries[0].stream, None)

    refusals = env.db.read("SELECT entry_id, outcome, rule, counts FROM rate_limit_refusals")
    expected = {str(e.id): (e.outcome, "rpm:10") for e in entries if e.outcome in REFUSALS}
    assert {str(r[0]): (r[1], r[2]) for r in refusals} == expected
    assert all(r[3] == '{"rpm":11}' for r in refusals)

    cache = env.db.read("SELECT SUM(lookups), SUM(hits), SUM(misses), SUM(bypasses), SUM(refreshes) "
                        "FROM cache_stats_daily")[0]
    counted = Counter(e.cache for e in entries)
    assert tuple(int(v) for v in cache) == (len(entries) - counted["none"], counted["hit"], counted["miss"],
                                            counted["bypass"], counted["refresh"])


def test_a_model_name_with_a_nul_character_does_not_stop_the_views(env: Env) -> None:
    """FILA once took any model name; PostgreSQL text takes no NUL, so such an event stored then
    must not fail its page for ever: the views show U+FFFD in its place (a page of 7, both sides
    of it projected too)."""
    rng = random.Random(5)
    entries = [make_entry(rng, i) for i in range(20)]
    entries[9] = make_entry(rng, 9, outcome="ok", model="gpt-4.1-nano\x00evil",
                            upstream="primary/gpt-4.1-nano\x00evil")
    env.save(*entries)

    assert env.projector.catch_up() == 20
    log = {r["entry_id"]: r for r in usage.usage_log(env.db, limit=100)["data"]}
    assert len(log) == 20
    assert log[str(entries[9].id)]["model"] == "gpt-4.1-nano\ufffdevil"
    assert env.db.read("SELECT upstream FROM token_usage_log WHERE model = ?",
                       ["gpt-4.1-nano\ufffdevil"]) == [("primary/gpt-4.1-nano\ufffdevil",)]
    expected = daily_oracle(entries)
    assert daily_rows(env.db) == {(k[0], k[1], k[2].replace("\x00", "\ufffd")): v for k, v in expected.items()}


def test_status_lag_and_wait_for(env: Env) -> None:
    rng = random.Random(2)
    last = env.save(*[make_entry(rng, i) for i in range(10)])
    env.projector.setup()
    assert {s.view: s.lag for s in env.projector.status()} == dict.fromkeys(ALL_TABLES, last)
    assert env.projector.wait_for("usage_daily", last, timeout=0.2) is False

    stop = threading.Event()
    follower = threading.Thread(target=env.projector.follow, args=(stop,))
    follower.start()
    try:
        assert env.projector.wait_for("usage_daily", last, timeout=10) is True
        later = env.save(make_entry(rng, 99))        # read-your-writes for a write made while following
        assert env.projector.wait_for("token_usage_log", later, timeout=10) is True
    finally:
        stop.set()
        follower.join(timeout=10)
    assert not follower.is_alive()
    statuses = env.projector.status()
    assert [(s.position, s.head, s.lag) for s in statuses] == [(later, later, 0)] * 4
    assert env.projector.wait_for("usage_daily", later + 1, timeout=0.1) is False


def test_a_view_whose_table_went_missing_starts_again_from_zero(env: Env) -> None:
    rng = random.Random(17)
    entries = [make_entry(rng, i) for i in range(12)]
    env.save(*entries)
    env.projector.catch_up()
    with env.db.transaction() as tx:
        tx.execute("DROP TABLE usage_daily")
    again = env.projector_with(usage.views(), page=7)
    assert again.positions()["usage_daily"] == 0 and again.positions()["token_usage_log"] == 12
    assert again.catch_up() == 12
    again.close()
    assert daily_rows(env.db) == daily_oracle(entries)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 12


def test_run_once_projects_one_page(env: Env) -> None:
    rng = random.Random(3)
    env.save(*[make_entry(rng, i) for i in range(20)])
    assert env.projector.run_once() == 7
    assert {s.position for s in env.projector.status()} == {7}
    assert env.projector.catch_up() == 13


# -- crashes and concurrency -----------------------------------------------------------------------


class Exploding(View):
    """Wraps a view: on page ``fail_on`` it writes half the page, then raises (a crash mid-page)."""

    def __init__(self, inner: View, fail_on: int) -> None:
        self.inner, self.fail_on, self.pages = inner, fail_on, 0
        self.name, self.topics, self.tables = inner.name, inner.topics, inner.tables
        self.state_types = inner.state_types

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        return self.inner.ddl(dialect, suffix)

    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        self.pages += 1
        if self.pages == self.fail_on:
            self.inner.apply(tx, notes[: len(notes) // 2], suffix)
            raise RuntimeError("crash in the middle of a page")
        self.inner.apply(tx, notes, suffix)


def test_crash_mid_page_rolls_back_and_resumes_exactly(env: Env) -> None:
    rng = random.Random(4)
    entries = [make_entry(rng, i) for i in range(40)]
    env.save(*entries)
    log_view, daily_view, refusals_view, cache_view = usage.views()
    crashing = env.projector_with([log_view, Exploding(daily_view, fail_on=3), refusals_view, cache_view], page=7)

    with pytest.raises(RuntimeError, match="crash in the middle"):
        crashing.catch_up()
    crashing.close()
    # two pages committed; the third (rows of every view, and every position) rolled back
    assert set(crashing.positions().values()) == {14}
    assert daily_rows(env.db) == daily_oracle(entries[:14])
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 14

    assert env.projector.catch_up() == 26           # a restart: the normal views, from where it stopped
    assert daily_rows(env.db) == daily_oracle(entries)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 40


def test_two_followers_never_double_count(env: Env) -> None:
    rng = random.Random(5)
    entries = [make_entry(rng, i) for i in range(120)]
    env.save(*entries)
    other = env.projector_with(usage.views(), page=7)
    threads = [threading.Thread(target=p.catch_up) for p in (env.projector, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    other.close()
    assert daily_rows(env.db) == daily_oracle(entries)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 120


def test_follow_under_concurrent_writes_equals_a_rebuild(env: Env) -> None:
    rng = random.Random(6)
    saved: list[LedgerEntry] = []
    last = [0]

    def writer() -> None:
        for batch in range(25):
            entries = [make_entry(rng, batch * 8 + i) for i in range(rng.randint(1, 8))]
            last[0] = env.save(*entries)
            saved.extend(entries)

    stop = threading.Event()
    follower = threading.Thread(target=env.projector.follow, args=(stop,))
    follower.start()
    writing = threading.Thread(target=writer)
    writing.start()
    writing.join(timeout=60)
    try:
        for table in ALL_TABLES:
            assert env.projector.wait_for(table, last[0], timeout=30)
    finally:
        stop.set()
        follower.join(timeout=10)
    assert daily_rows(env.db) == daily_oracle(saved)
    incremental = snapshot(env.db)

    assert env.projector.rebuild() == len(saved)
    assert snapshot(env.db) == incremental
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == len(saved)


# -- rebuild ------------------------------------------------------------------------------------------


def test_rebuild_keeps_the_old_view_readable_until_the_swap(env: Env) -> None:
    rng = random.Random(7)
    entries = [make_entry(rng, i) for i in range(70)]
    env.save(*entries)
    env.projector.catch_up()
    before = usage.usage_stats(env.db, "day")
    before_rows = snapshot(env.db, ("usage_daily",))
    seen_during: list[Any] = []
    progress: list[Any] = []

    def during(p: Any) -> None:       # runs between pages, while the *_rebuild tables fill up
        progress.append(p)
        if not p.done:
            seen_during.append(usage.usage_stats(env.db, "day"))

    # a reader in another thread, querying all the time
    stop = threading.Event()
    observed: list[Any] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                observed.append(env.db.read("SELECT SUM(requests) FROM usage_daily")[0][0])
            except BaseException as error:      # noqa: BLE001 - reported below
                errors.append(error)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert env.projector.rebuild("usage_daily", progress=during) == 70
    finally:
        stop.set()
        thread.join(timeout=10)

    assert len(seen_during) == 10 and all(s == before for s in seen_during)
    assert errors == [] and observed and all(int(v) == 70 for v in observed)
    assert progress[-1].done and progress[-1].events == 70 and progress[-1].eta_s == 0.0
    assert usage.usage_stats(env.db, "day") == before
    assert snapshot(env.db, ("usage_daily",)) == before_rows
    assert not env.db.table_exists("usage_daily_rebuild") and not env.db.table_exists("usage_daily_old")


def test_rebuild_twice_and_index_names_are_restored(env: Env) -> None:
    rng = random.Random(8)
    env.save(*[make_entry(rng, i) for i in range(15)])
    env.projector.catch_up()
    with env.db.transaction() as tx:
        before = sorted(name for name, _ in env.db.indexes(tx, "token_usage_log"))
    env.projector.rebuild("token_usage_log")
    env.projector.rebuild("token_usage_log")          # a clash of leftover index names would fail here
    with env.db.transaction() as tx:
        after = sorted(name for name, _ in env.db.indexes(tx, "token_usage_log"))
    assert after == before and not any("rebuild" in name for name in after)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 15


def test_rebuild_while_following_loses_nothing(env: Env) -> None:
    rng = random.Random(9)
    entries = [make_entry(rng, i) for i in range(30)]
    env.save(*entries)
    stop = threading.Event()
    follower = threading.Thread(target=env.projector.follow, args=(stop,))
    follower.start()
    try:
        rebuilder = env.projector_with(usage.views(), page=7)
        rebuilder.rebuild()
        rebuilder.close()
        more = [make_entry(rng, 100 + i) for i in range(10)]
        last = env.save(*more)
        for table in ALL_TABLES:
            assert env.projector.wait_for(table, last, timeout=30)
    finally:
        stop.set()
        follower.join(timeout=10)
    assert daily_rows(env.db) == daily_oracle(entries + more)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 40


def test_catch_up_from_zero_is_a_bulk_load(env: Env) -> None:
    rng = random.Random(15)
    entries = [make_entry(rng, i) for i in range(40)]
    env.save(*entries)
    env.projector.setup()
    with env.db.transaction() as tx:
        indexes = {t: sorted(n for n, _ in env.db.indexes(tx, t)) for t in ALL_TABLES}
    bulk = env.projector_with(usage.views(), page=7, bulk_from_zero=30)
    assert bulk.catch_up() == 40
    more = [make_entry(rng, 50 + i) for i in range(5)]
    env.save(*more)
    assert bulk.catch_up() == 5                       # past 0: page by page, in place
    bulk.close()
    assert daily_rows(env.db) == daily_oracle(entries + more)
    assert env.db.read("SELECT COUNT(*) FROM token_usage_log")[0][0] == 45
    with env.db.transaction() as tx:
        assert {t: sorted(n for n, _ in env.db.indexes(tx, t)) for t in ALL_TABLES} == indexes


def test_an_abandoned_rebuild_changes_nothing(env: Env) -> None:
    rng = random.Random(16)
    env.save(*[make_entry(rng, i) for i in range(30)])
    env.projector.catch_up()
    before = snapshot(env.db)
    stop = threading.Event()
    events = env.projector.rebuild(progress=lambda p: stop.set(), stop=stop)
    assert events < 30
    assert snapshot(env.db) == before
    assert {s.position for s in env.projector.status()} == {env.projector.head()}
    assert env.projector.rebuild() == 30 and snapshot(env.db) == before


# -- views of every topic, raw states ---------------------------------------------------------------


class TopicCounts(View):
    """Every event of every topic, the state left as stored bytes (like the audit chain)."""

    name = "test_topic_counts"
    topics = None
    raw = True
    tables = ("test_topic_counts",)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS test_topic_counts{suffix} "
                "(notification_id BIGINT PRIMARY KEY, topic TEXT NOT NULL, originator_id TEXT NOT NULL, size BIGINT)"]

    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        assert all(isinstance(n.state, bytes) for n in notes)
        tx.insert_many(f"test_topic_counts{suffix}", ("notification_id", "topic", "originator_id", "size"),
                       [(n.id, n.topic, n.originator_id, len(n.state)) for n in notes], key=("notification_id",))


def test_a_view_of_every_topic_sees_raw_states(env: Env) -> None:
    rng = random.Random(10)
    breaker = BreakerTransition(id=uuid4(), breaker="b", from_state="closed", to_state="open", reason="r",
                                at=DAY0.isoformat(), process="p")
    entries = [make_entry(rng, i) for i in range(9)]
    last = env.save(*entries[:4], breaker, *entries[4:])
    projector = env.projector_with([*usage.views(), TopicCounts()], page=4)
    assert projector.catch_up() == 10         # one group (all at 0): one read of every topic
    projector.close()
    rows = env.db.read("SELECT notification_id, topic, originator_id FROM test_topic_counts ORDER BY notification_id")
    assert len(rows) == 10 and rows[-1][0] == last
    assert Counter(r[1] for r in rows) == {"fila:LedgerEntry.Recorded": 9, "fila:BreakerTransition.Transitioned": 1}
    assert {r[2] for r in rows} == {str(e.id) for e in entries} | {str(breaker.id)}


def test_direct_reader_reads_what_the_recorder_reads(env: Env) -> None:
    if env.db.dialect != "postgres":
        pytest.skip("the direct reader is Postgres only")
    rng = random.Random(11)
    env.save(*[make_entry(rng, i) for i in range(12)])
    head = env.save(BreakerTransition(id=uuid4(), breaker="b", from_state="closed", to_state="open",
                                      reason="r", at=DAY0.isoformat(), process="p"))
    assert env.projector.reader == "direct"
    for topics in (["fila:LedgerEntry.Recorded"], None):
        for start, stop, limit in ((0, head, 100), (3, 9, 4), (5, head, 2)):
            direct = env.projector._select_direct(start, stop, limit, topics)
            recorded = env.projector._select_recorded(start, stop, limit, topics)
            assert [tuple(r) for r in direct] == [tuple(r) for r in recorded]


def test_a_state_wanted_as_a_struct_and_as_its_base_is_decoded_once(env: Env) -> None:
    rng = random.Random(11)
    last = env.save(*(make_entry(rng, i) for i in range(5)),
                    BreakerTransition(id=uuid4(), breaker="b", from_state="closed", to_state="open", reason="r",
                                      at=DAY0.isoformat(), process="p"))
    together = env.projector_with([*usage.views(), BillingView(), AuditChain()])
    page = together._fetch(together.views, 0, last)
    notes = {view.name: share for view, share in page.notes}
    recorded = [n for n in notes["billing"] if n.topic == RECORDED_TOPIC]
    assert len(recorded) == 5 and all(type(n.state) is usage.Recorded for n in recorded)
    assert all(a.state is b.state for a, b in zip(recorded, notes["token_usage_log"], strict=True))
    assert notes["usage_daily"] is notes["token_usage_log"]
    assert [type(n.state) for n in notes["audit_chain"]] == [bytes] * 6
    alone = env.projector_with([BillingView()])               # billing alone keeps its own, laxer Struct
    [(_, share)] = alone._fetch(alone.views, 0, last).notes
    assert [type(n.state) for n in share] == [BillingRecorded] * 5
    together.close()
    alone.close()


# -- the dialect layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 1200])        # executemany, and COPY (+ savepoint fallback) on Postgres
def test_insert_many_skips_known_keys_and_adds_sums(env: Env, n: int) -> None:
    with env.db.transaction() as tx:
        tx.execute("CREATE TABLE t_rows (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
        tx.execute("CREATE TABLE t_sums (k TEXT PRIMARY KEY, a BIGINT NOT NULL, b BIGINT NOT NULL)")
    rows = [(f"k{i}", i) for i in range(n)]
    for _ in range(2):                               # the second time every key is known
        with env.db.transaction() as tx:
            tx.insert_many("t_rows", ("k", "v"), rows, key=("k",))
            tx.insert_many("t_rows", ("k", "v"), [(k, -1) for k, _ in rows[:2]] + [("new", 7)], key=("k",))
            tx.insert_many("t_sums", ("k", "a", "b"), [(k, v, 1) for k, v in rows], key=("k",), add=("a", "b"))
    assert env.db.read("SELECT COUNT(*), SUM(v) FROM t_rows")[0] == (n + 1, sum(range(n)) + 7)
    assert env.db.read("SELECT SUM(a), SUM(b) FROM t_sums")[0] == (2 * sum(range(n)), 2 * n)
    with pytest.raises(RuntimeError), env.db.transaction() as tx:   # a failing transaction leaves nothing
        tx.insert_many("t_rows", ("k", "v"), [(f"x{i}", i) for i in range(n)], key=("k",))
        raise RuntimeError
    assert env.db.read("SELECT COUNT(*) FROM t_rows")[0][0] == n + 1


def test_insert_many_copies_every_column_type_views_use_and_values_binary_will_not_take(env: Env) -> None:
    uuid_type = "UUID" if env.db.dialect == "postgres" else "TEXT"
    with env.db.transaction() as tx:
        tx.execute(f"CREATE TABLE t_typed (id {uuid_type} PRIMARY KEY, n BIGINT, small INTEGER, flag BOOLEAN, "
                   'label TEXT, keyed TEXT COLLATE "C")' if env.db.dialect == "postgres" else
                   f"CREATE TABLE t_typed (id {uuid_type} PRIMARY KEY, n BIGINT, small INTEGER, flag BOOLEAN, "
                   "label TEXT, keyed TEXT)")
    ids = [uuid4() for _ in range(1_200)]
    rows = [(str(u), i, i % 7, i % 2 == 0, None if i % 5 == 0 else f"é\t{i}\n", f"k{i}") for i, u in enumerate(ids)]
    odd = [(str(uuid4()).upper(), -1, 1, True, 42, "x")] + \
          [(str(uuid4()), -2, 2, False, i, f"y{i}") for i in range(600)]   # ints for a text column
    with env.db.transaction() as tx:
        tx.insert_many("t_typed", ("id", "n", "small", "flag", "label", "keyed"), rows, key=("id",))
        tx.insert_many("t_typed", ("id", "n", "small", "flag", "label", "keyed"), odd, key=("id",))
    back = env.db.read("SELECT id, n, small, flag, label, keyed FROM t_typed")
    got = {str(r[0]).lower(): (r[1], r[2], bool(r[3]), r[4], r[5]) for r in back}
    assert [got[str(u)] for u in ids] == [r[1:] for r in rows]
    assert sorted(v[3] for v in got.values() if v[4].startswith("y")) == sorted(str(i) for i in range(600))
    assert got[odd[0][0].lower()][3] == "42"


# -- readers ---------------------------------------------------------------------------------------


def test_usage_log_filters_and_cursor_pagination(env: Env) -> None:
    rng = random.Random(12)
    entries = [make_entry(rng, i) for i in range(40)]
    env.save(*entries)
    env.projector.catch_up()

    pages, cursor = [], None
    while True:
        page = usage.usage_log(env.db, api_key_id="key-a", cursor=cursor, limit=4)
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    got = [r["entry_id"] for p in pages for r in p]
    assert got == [str(e.id) for e in reversed(entries) if e.api_key_id == "key-a"]

    since, until = entries[10].at, entries[20].at
    window = usage.usage_log(env.db, since=since, until=until, order="asc", limit=100)["data"]
    assert [r["entry_id"] for r in window] == [str(e.id) for e in entries[10:20]]
    errors = usage.usage_log(env.db, outcome="upstream_error", model="m-small", limit=100)["data"]
    assert {r["entry_id"] for r in errors} == {str(e.id) for e in entries
                                              if e.outcome == "upstream_error" and e.model == "m-small"}
    with pytest.raises(ValueError, match="since"):
        usage.usage_log(env.db, since="yesterday")


def test_usage_stats_and_csv(env: Env) -> None:
    rng = random.Random(13)
    entries = [make_entry(rng, i) for i in range(30)]
    env.save(*entries)
    env.projector.catch_up()
    by_key = {r["api_key_id"]: r for r in usage.usage_stats(env.db, "api_key")}
    for key in ("key-a", "key-b", "key-c"):
        mine = [e for e in entries if e.api_key_id == key]
        assert by_key[key]["requests"] == len(mine)
        assert by_key[key]["total_tokens"] == sum(e.total_tokens for e in mine if e.outcome in BILLABLE_OUTCOMES)
    days = usage.usage_stats(env.db, "day", since=entries[5].at, until=entries[12].at[:10])
    assert [d["day"] for d in days] == sorted({e.at[:10] for e in entries[5:13]} | {entries[5].at[:10]})
    assert sum(d["requests"] for d in usage.usage_stats(env.db, "model")) == 30
    with pytest.raises(ValueError, match="group_by"):
        usage.usage_stats(env.db, "plan")

    text = usage.usage_csv(usage.usage_stats(env.db, "api_key"))
    lines = text.splitlines()
    assert lines[0].startswith("api_key_id,requests,ok_requests,")
    assert len(lines) == 4
    assert usage.usage_csv([{"model": "=cmd()", "n": None}]) == "model,n\n'=cmd(),\n"


def test_cache_stats_hit_rate(env: Env) -> None:
    env.projector.catch_up()
    assert usage.cache_stats(env.db) == {"overall": {"hits": 0, "misses": 0, "hit_rate": 0.0, "tokens_saved": 0,
                                                     "lookups": 0, "bypasses": 0, "refreshes": 0}, "clients": []}

    def cached(key: str, cache: str, saved: int = 0, layer: str | None = "memory") -> LedgerEntry:
        return LedgerEntry(id=uuid4(), api_key_id=key, at=DAY0.isoformat(), outcome="ok", status=200, model="m",
                           cache=cache, cache_layer=layer, tokens_saved=saved)

    last = env.save(cached("a", "hit", 10), cached("a", "hit", 5, "redis"), cached("a", "miss"),
                    cached("b", "miss"), cached("b", "bypass"), cached("b", "refresh"), cached("c", "none"))
    env.projector.catch_up()
    assert env.projector.position("cache_stats_daily") == last
    stats = usage.cache_stats(env.db)
    assert stats["overall"] == {"hits": 2, "misses": 2, "hit_rate": 0.5, "tokens_saved": 15, "lookups": 6,
                                "bypasses": 1, "refreshes": 1}
    clients = {c["api_key_id"]: c for c in stats["clients"]}
    assert set(clients) == {"a", "b"}
    assert clients["a"]["hit_rate"] == pytest.approx(2 / 3) and clients["a"]["tokens_saved"] == 15
    assert clients["b"]["hit_rate"] == 0.0
    assert usage.cache_stats(env.db, api_key_id="b")["overall"]["misses"] == 1


# -- the command line --------------------------------------------------------------------------------


def test_cli_status_run_once_and_rebuild(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: Any,
                                         request: pytest.FixtureRequest) -> None:
    rng = random.Random(14)
    last = env.save(*[make_entry(rng, i) for i in range(5)])
    monkeypatch.setenv("FILA_DATABASE_URL", env.url)
    logs = io.StringIO()      # structlog is global: log somewhere that outlives this test, then reset
    monkeypatch.setattr("fila.bootstrap.configure_logging",
                        lambda settings: structlog.configure(logger_factory=structlog.PrintLoggerFactory(logs)))
    request.addfinalizer(structlog.reset_defaults)
    monkeypatch.setattr(projections_cli, "Projector",
                        lambda db, recorder: Projector(db, recorder, usage.views(), page=2))
    parser = argparse.ArgumentParser(prog="fila")
    projections_cli.add_subcommands(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert run("projections", "status") == 0
    assert f"{last:,}" in capsys.readouterr().out
    assert run("projections", "run", "--once") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["VIEW", "POSITION", "HEAD", "LAG"]
    assert all(line.split()[-1] == "0" for line in out[1:]) and len(out) == 5
    assert run("projections", "rebuild", "usage_daily") == 0
    captured = capsys.readouterr()
    assert "rebuild usage_daily [" in captured.err and "ETA done" in captured.err
    assert run("projections", "rebuild") == 2
    assert run("projections", "rebuild", "nope") == 2
    assert "no view named 'nope'" in capsys.readouterr().err
    assert env.db.read("SELECT SUM(requests) FROM usage_daily")[0][0] == 5
    assert "projections_caught_up" in logs.getvalue()


def test_progress_bar_renders_one_line() -> None:
    from fila.projections.runner import RebuildProgress

    out = io.StringIO()
    show = projections_cli.progress_bar(out)
    show(RebuildProgress(("v",), 500, 500, 1000, 2500.0, 0.2))
    show(RebuildProgress(("v",), 1000, 1000, 1000, 2500.0, 0.0, True))
    text = out.getvalue()
    assert text.startswith("\rrebuild v [") and "50.0%" in text and "2,500/s" in text and text.endswith("\n")
