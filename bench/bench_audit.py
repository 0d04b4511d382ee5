"""Auditor replay of one billing cycle with 100,000 requests, against reading the same events.

    .venv/bin/python bench/bench_audit.py
    .venv/bin/python bench/bench_audit.py --requests 100000 --runs 3 --keep

It makes a fresh schema in database ``fila_bench`` (dropped at the end unless ``--keep``),
saves a plan and an assignment through the store, then bulk-writes ``--requests`` ledger
entries of that assignment, all in its first cycle, through the store's recorder
(``insert_events``, 1,000 per batch, StoredEvents byte-identical to the mapper's: checked on a
sample). The billing view is built by the projector, then timed in the same run:

* ``read``     the replay's own reads (same topics, same id windows; on PostgreSQL the direct
  binary reader the projector uses too), not decoded: the baseline;
* ``decode``   the same, plus msgspec decoding of every state;
* ``library read``  the same pages through ``recorder.select_notifications`` (Notifications), for scale;
* ``replay``   ``fila.services.audit.replay``: read, decode, the billing fold, the contribution
  list with running totals, and the comparison with the view (it must agree);
* ``verify``   ``fila audit verify``'s check of the whole log against the hash chain (chained first).

Prints figures, never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fila.adapters.eventstore import open_store  # noqa: E402
from fila.domain.billing_cycle import cycle_id_for  # noqa: E402
from fila.domain.billing_fold import TOPICS  # noqa: E402
from fila.domain.ledger import RECORDED_TOPIC, LedgerEntry  # noqa: E402
from fila.domain.plans import Assignment, Plan, assignment_id_for  # noqa: E402
from fila.projections.billing import BillingView  # noqa: E402
from fila.projections.chain import AuditChain  # noqa: E402
from fila.projections.db import open_database  # noqa: E402
from fila.projections.runner import Projector  # noqa: E402
from fila.services.audit import _pages, replay, verify  # noqa: E402

BENCH_DB = "postgresql://postgres@127.0.0.1:5432/fila_bench"
START = datetime(2026, 1, 1, tzinfo=UTC)
PAGE = 10_000


def fresh_url() -> tuple[str, str]:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'fila_bench'").fetchone():
            conn.execute('CREATE DATABASE "fila_bench"')
    schema = "audit_" + uuid.uuid4().hex[:12]
    with psycopg.connect(BENCH_DB, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{BENCH_DB}?schema={schema}", schema


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with psycopg.connect(BENCH_DB) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    load = os.getloadavg()
    return (f"{platform.platform()} | {os.cpu_count()} cores | {cpu} | Python {platform.python_version()} | "
            f"PostgreSQL {pg} | load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def entries(n: int, key: str, assignment_id: str, plan_id: str, rng: random.Random):
    spacing = (31 * 86_400 - 3_600) / n            # every request inside January (cycle 0)
    for i in range(n):
        hit = rng.random() < 0.1
        prompt, completion = rng.randint(20, 1500), rng.randint(5, 600)
        yield dict(api_key_id=key, at=(START + timedelta(seconds=60 + i * spacing)).isoformat(), outcome="ok",
                   status=200, model="gpt-4.1-nano", fingerprint=f"{rng.getrandbits(128):032x}", stream=False,
                   prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   latency_us=rng.randint(2_000, 900_000), upstream="primary", cache="hit" if hit else "miss",
                   cache_layer="memory", tokens_saved=prompt + completion if hit else 0, plan_id=plan_id,
                   plan_version=1, assignment_id=assignment_id)


def write_entries(store, n: int, key: str, assignment_id: str, plan_id: str) -> float:
    """Bulk-write ``n`` Recorded events as the store's mapper would encode them."""
    rng = random.Random(7)
    sample = LedgerEntry(id=uuid.uuid4(), **next(entries(1, key, assignment_id, plan_id, rng))).collect_events()[0]
    mapped = store.mapper.to_stored_event(sample)
    order = list(msgspec.json.decode(mapped.state))
    stamp = msgspec.json.decode(mapped.state)["timestamp"]
    encode = msgspec.json.Encoder().encode

    def stored(originator_id: uuid.UUID, fields: dict) -> StoredEvent:
        state = {"timestamp": stamp, "originator_topic": LedgerEntry.TOPIC, **fields}
        return StoredEvent(originator_id=originator_id, originator_version=1, topic=RECORDED_TOPIC,
                           state=encode({k: state.get(k) for k in order}))

    again = stored(sample.originator_id, {k: getattr(sample, k) for k in order
                                          if k not in ("timestamp", "originator_topic")})
    if again.state != mapped.state:
        raise SystemExit(f"bulk StoredEvent differs from the mapper's:\n{again.state!r}\n{mapped.state!r}")
    began = time.perf_counter()
    batch: list[StoredEvent] = []
    for fields in entries(n, key, assignment_id, plan_id, random.Random(11)):
        batch.append(stored(uuid.uuid4(), fields))
        if len(batch) == 1000:
            store.recorder.insert_events(batch)
            batch = []
    if batch:
        store.recorder.insert_events(batch)
    return time.perf_counter() - began


def read_all(recorder, decode=None) -> int:
    """The library's reader: ``recorder.select_notifications`` pages (Notifications)."""
    head = recorder.max_notification_id() or 0
    position = count = 0
    topics = list(TOPICS)
    while position < head:
        stop = min(head, position + PAGE)
        notes = recorder.select_notifications(start=position, limit=PAGE, stop=stop, topics=topics,
                                              inclusive_of_start=False)
        if decode is not None:
            for n in notes:
                decode(n.state)
        count += len(notes)
        position = stop
    return count


def read_replays(recorder, db, decode=None) -> int:
    """The replay's own reads: ``audit._pages`` (the direct binary reader on PostgreSQL)."""
    count = 0
    for _, _, notes in _pages(recorder, recorder.max_notification_id() or 0, PAGE, list(TOPICS), db):
        if decode is not None:
            for n in notes:
                decode(n.state)
        count += len(notes)
    return count


class Runs:
    """Wall-clock and CPU seconds (this process) of each run of one function."""

    def __init__(self, fn, runs: int) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.result = None
        for _ in range(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            self.result = fn()
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)

    def line(self, label: str, events: int, extra: str = "") -> str:
        best, median, cpu = min(self.wall), statistics.median(self.wall), min(self.cpu)
        return (f"{label:8s} best {best:6.3f} s  median {median:6.3f} s  cpu {cpu:6.3f} s  "
                f"({events / best:>9,.0f} events/s, {best / max(events, 1) * 1e6:5.1f} us/event){extra}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated schema")
    args = parser.parse_args(argv)
    url, schema = fresh_url()
    print(f"machine: {machine()}")
    print(f"url: {url}  requests: {args.requests:,}  runs: {args.runs}")
    store = open_store(url)
    db = open_database(url)
    try:
        plan = Plan.define("bench-pro", {"name": "Bench Pro", "monthly_price_minor": 4900,
                                         "included_tokens": 20_000_000, "input_price_per_million": "0.40",
                                         "output_price_per_million": "1.60", "cache_hit_billing": "fraction",
                                         "cache_hit_fraction": "0.25"}, START)
        key = "key-bench"
        assignment = Assignment.assign(assignment_id_for(key, 0), key, str(plan.id), START, None, START)
        store.save(plan, assignment)
        seconds = write_entries(store, args.requests, key, str(assignment.id), str(plan.id))
        print(f"write    {args.requests:,} entries in {seconds:.2f} s ({args.requests / seconds:,.0f}/s, "
              "recorder.insert_events, 1,000 per batch)")
        if hasattr(db, "analyze_if_stale"):    # as autovacuum would have by now on a live system
            db.analyze_if_stale(schema, store.recorder.events_table_name)
        projector = Projector(db, store.recorder, [BillingView(), AuditChain()])
        try:
            began = time.perf_counter()
            projector.catch_up()
            print(f"views    billing + audit_chain caught up in {time.perf_counter() - began:.2f} s")
        finally:
            projector.close()
        cycle_id = str(cycle_id_for(str(assignment.id), 0))
        events = read_all(store.recorder)

        read = Runs(lambda: read_replays(store.recorder, db), args.runs)
        print(read.line("read", events, "  (baseline: the replay's own page reads, not decoded)"))
        decoder = msgspec.json.Decoder().decode
        decoded = Runs(lambda: read_replays(store.recorder, db, decoder), args.runs)
        print(decoded.line("decode", events, "  (read + msgspec decode of every state to dicts)"))
        library = Runs(lambda: read_all(store.recorder), args.runs)
        print(library.line("lib read", events, "  (the same pages through recorder.select_notifications)"))
        replayed = Runs(lambda: replay(store.recorder, db, cycle_id), args.runs)
        report = replayed.result
        figures = report.figures
        print(replayed.line("replay", events, f"  ({len(report.contributions):,} contributions, "
                                              f"agrees with the view: {report.agrees})"))
        print(f"         total {figures['total_minor']:,} {figures['currency']} minor, {figures['requests']:,} "
              f"requests, overage {figures['overage_tokens']:,} tokens; replay / read: wall "
              f"{min(replayed.wall) / min(read.wall):.1f}x, cpu {min(replayed.cpu) / min(read.cpu):.1f}x")
        checked = Runs(lambda: verify(db, store.recorder), args.runs)
        print(checked.line("verify", checked.result.stored_events, f"  (ok: {checked.result.ok})"))
        if not report.agrees or not checked.result.ok:
            print("WARNING: the replay or the chain found a difference", file=sys.stderr)
    finally:
        db.close()
        store.close()
        if not args.keep:
            with psycopg.connect(BENCH_DB, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
