"""Projection throughput: catch-up of every usage view from 0, and a rebuild of one view.

    .venv/bin/python bench/bench_projections.py --events 1000000
    .venv/bin/python bench/bench_projections.py --events 200000 --url 'postgresql://postgres@127.0.0.1:5432/fila_bench?schema=b1'

Without ``--url`` it makes a fresh schema in database ``fila_bench`` (dropped at the end unless
``--keep``; with ``--url`` the events already there are reused and topped up to ``--events``).
Events are written in batches of 1,000 through the store's recorder (``insert_events``), with
StoredEvents encoded by msgspec exactly as the store's mapper would (checked byte for byte against
the mapper on a sample); the write rate is printed on its own. Traffic is skewed like a gateway's:
1,000 keys with Zipf-like weights, 8 models, 80 % ok, 10 % refusals, half the requests cached.

Baselines in the same run: the raw page read through ``recorder.select_notifications`` (what
the library offers) and through the projector's direct reader, neither decoding nor writing.
Besides wall-clock rates it prints CPU microseconds per event, for this process (Python) and for
the Postgres backends serving it, so a figure survives a machine shared with other work.
Prints figures, never passes or fails on time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import resource
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent

from fila.adapters.eventstore import open_store
from fila.domain.ledger import RECORDED_TOPIC, LedgerEntry
from fila.projections import usage
from fila.projections.db import open_database
from fila.projections.runner import Projector

KEYS = [f"key-{i:04d}" for i in range(1000)]
KEY_CUM = list(itertools.accumulate(1 / (i + 1) ** 1.1 for i in range(len(KEYS))))  # few heavy clients
MODELS = [f"model-{i}" for i in range(8)]
MODEL_CUM = list(itertools.accumulate([40, 25, 12, 8, 6, 4, 3, 2]))
OUTCOMES = ["ok"] * 80 + ["client_disconnected"] * 3 + ["upstream_error"] * 4 + ["upstream_rejected"] * 2 + \
           ["breaker_open"] * 1 + ["rate_limited"] * 7 + ["quota_exhausted"] * 2 + ["forbidden"] * 1
CACHE = ["none"] * 50 + ["hit"] * 20 + ["miss"] * 25 + ["bypass"] * 3 + ["refresh"] * 2
REFUSED = {"rate_limited", "quota_exhausted", "forbidden"}
STATE_ORDER: list[str] = []      # the mapper's field order, learnt from a sample


def fresh_url() -> str:
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'fila_bench'").fetchone():
            conn.execute('CREATE DATABASE "fila_bench"')
    schema = "bench_" + uuid.uuid4().hex[:12]
    url = "postgresql://postgres@127.0.0.1:5432/fila_bench"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}?schema={schema}"


def entry_kwargs(rng: random.Random, start: datetime, i: int) -> dict:
    outcome = rng.choice(OUTCOMES)
    billable = outcome in ("ok", "client_disconnected")
    cache = rng.choice(CACHE) if billable else "none"
    prompt = rng.randint(5, 2000) if billable else 0
    completion = rng.randint(1, 800) if billable else 0
    return dict(
        api_key_id=rng.choices(KEYS, cum_weights=KEY_CUM)[0],
        at=(start + timedelta(seconds=i * 2.6)).isoformat(),           # 1M requests over a month
        outcome=outcome, status=200 if billable else (429 if outcome in REFUSED else 502),
        model=rng.choices(MODELS, cum_weights=MODEL_CUM)[0], fingerprint=f"{rng.getrandbits(128):032x}",
        stream=rng.random() < 0.3, prompt_tokens=prompt, completion_tokens=completion,
        total_tokens=prompt + completion, latency_us=rng.randint(2_000, 4_000_000),
        upstream="primary" if billable else None,
        error=None if billable or outcome in REFUSED else "upstream said no",
        idempotency_key=f"idem-{i}" if rng.random() < 0.2 else None,
        cache=cache, cache_layer=("memory" if rng.random() < 0.7 else "redis") if cache != "none" else None,
        tokens_saved=prompt + completion if cache == "hit" else 0,
        plan_id="plan-pro", plan_version=3, assignment_id=f"asg-{rng.randrange(1000)}",
        refusal_rule="rpm:60" if outcome in REFUSED else None,
        refusal_counts={"rpm": 61, "limit": 60} if outcome in REFUSED else None,
    )


def stored_event(originator_id: uuid.UUID, kwargs: dict, stamp: str, encode) -> StoredEvent:
    state = {"timestamp": stamp, "originator_topic": LedgerEntry.TOPIC, **kwargs}
    return StoredEvent(originator_id=originator_id, originator_version=1, topic=RECORDED_TOPIC,
                       state=encode({k: state.get(k) for k in STATE_ORDER}))


def check_against_mapper(store, rng: random.Random, start: datetime) -> None:
    """The fast StoredEvents must be the ones the store's mapper makes."""
    event = LedgerEntry(id=uuid.uuid4(), **entry_kwargs(rng, start, 0)).collect_events()[0]
    mapped = store.mapper.to_stored_event(event)
    decoded = msgspec.json.decode(mapped.state)
    STATE_ORDER[:] = list(decoded)
    kwargs = {k: getattr(event, k) for k in STATE_ORDER if k not in ("timestamp", "originator_topic")}
    ours = stored_event(event.originator_id, kwargs, decoded["timestamp"], msgspec.json.encode)
    if (ours.topic, ours.state, ours.originator_version) != (mapped.topic, mapped.state, mapped.originator_version):
        raise SystemExit(f"fast StoredEvent differs from the mapper's:\n{ours.state!r}\n{mapped.state!r}")


def write_events(store, n: int, first: int, batch: int = 1000) -> float:
    rng = random.Random(first)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    check_against_mapper(store, rng, start)
    encode = msgspec.json.Encoder().encode
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    began = time.perf_counter()
    for lo in range(first, first + n, batch):
        events = [stored_event(uuid.uuid4(), entry_kwargs(rng, start, i), stamp, encode)
                  for i in range(lo, min(first + n, lo + batch))]
        store.recorder.insert_events(events)
    return time.perf_counter() - began


class Cpu:
    """CPU seconds of this process and of the Postgres backends connected to ``dbname``."""

    monitor: psycopg.Connection | None = None     # one connection for every probe (the server may be full)

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.tick = os.sysconf("SC_CLK_TCK")
        if Cpu.monitor is None:
            Cpu.monitor = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{dbname}", autocommit=True)

    def _backends(self) -> dict[int, float]:
        conn = Cpu.monitor
        me = conn.info.backend_pid
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                           (self.dbname,)) if r[0] != me]
        out = {}
        for pid in pids:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:       # not visible (another host) or gone
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / self.tick
        return out

    def __enter__(self) -> Cpu:
        self.pg0 = self._backends()
        self.py0 = time.process_time()
        self.wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.py = time.process_time() - self.py0
        self.pg = sum(cpu - self.pg0.get(pid, 0.0) for pid, cpu in self._backends().items())

    def line(self, label: str, events: int, extra: str = "") -> str:
        us = 1e6 / max(events, 1)
        return (f"{label:8s}{events:>10,} events {self.wall:7.2f} s {events / self.wall:>9,.0f} events/s"
                f"  cpu/event: python {self.py * us:5.1f} us, postgres {self.pg * us:5.1f} us{extra}")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--url", help="postgresql://...?schema=NAME (default: a fresh schema in fila_bench)")
    parser.add_argument("--page", type=int, default=10_000)
    parser.add_argument("--reader", default="auto", choices=("auto", "direct", "recorder"))
    parser.add_argument("--rebuild-view", default="token_usage_log")
    parser.add_argument("--keep", action="store_true", help="keep the generated schema")
    args = parser.parse_args(argv)
    url = args.url or fresh_url()
    dbname = urlsplit(url).path.lstrip("/")
    store = open_store(url)
    with psycopg.connect(url.split("?")[0]) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    load = os.getloadavg()
    print(f"machine: {platform.platform()}, python {platform.python_version()}, cpus {os.cpu_count()}, "
          f"postgres {pg_version}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"url: {url}  events: {args.events:,}  page: {args.page:,}")

    already = store.recorder.max_notification_id() or 0
    if already < args.events:
        with Cpu(dbname) as cpu:
            write_events(store, args.events - already, already)
        print(cpu.line("write", args.events - already, "  (recorder.insert_events, 1,000 per batch)"))
    db = open_database(url)
    projector = Projector(db, store.recorder, usage.views(), page=args.page, reader=args.reader)
    with db.transaction() as tx:      # catch-up from 0, even on a reused schema
        for table in [t for v in projector.views for t in v.tables] + ["fila_projection_tracking"]:
            tx.execute(f"DROP TABLE IF EXISTS {table}")
    projector.setup()
    # as autovacuum would have by now in a live system (the projector does it too if it must)
    analyzed = db.analyze_if_stale(store.recorder.datastore.schema, store.recorder.events_table_name)
    print(f"analyze events table: {'done' if analyzed else 'not needed'}")

    for label, select in (("read/rec", projector._select_recorded), ("read/dir", projector._select_direct)):
        if label == "read/dir" and projector.reader != "direct":
            continue
        with Cpu(dbname) as cpu:
            position = count = 0
            while rows := select(position, position + 2 * args.page, args.page, [RECORDED_TOPIC]):
                count += len(rows)
                position = rows[-1][0]
        print(cpu.line(label, count, "  (baseline: pages only, no decoding, no writes)"))

    def reset_views() -> None:
        with db.transaction() as tx:
            for table in [t for v in projector.views for t in v.tables] + ["fila_projection_tracking"]:
                tx.execute(f"DROP TABLE IF EXISTS {table}")
        projector._ready = False
        projector.setup()

    # page by page into the live tables, indexes and all: a follower catching up after a pause
    incremental = Projector(db, store.recorder, usage.views(), page=args.page, reader=args.reader,
                            bulk_from_zero=10**12)
    with Cpu(dbname) as cpu:
        applied = incremental.catch_up()
    print(cpu.line("catchup", applied, f"  (page by page: {len(projector.views)} views, {incremental.pages:,} pages, "
                                       f"reader {projector.reader})"))
    incremental.close()
    reset_views()
    # from position 0 the projector builds like a rebuild (indexes once, at the end)
    with Cpu(dbname) as cpu:
        applied = projector.catch_up()
    print(cpu.line("catchup", applied, f"  (from 0, bulk: {len(projector.views)} views, {projector.pages:,} pages)"))
    print("status  " + ", ".join(f"{s.view} {s.position}/{s.head}" for s in projector.status()))
    rows = {t: db.read(f"SELECT COUNT(*) FROM {t}")[0][0] for v in projector.views for t in v.tables}
    print("rows    " + ", ".join(f"{t} {n:,}" for t, n in rows.items()))

    pages_before = projector.pages
    with Cpu(dbname) as cpu:
        rebuilt = projector.rebuild(args.rebuild_view)
    print(cpu.line("rebuild", rebuilt, f"  ({args.rebuild_view}, {projector.pages - pages_before:,} pages)"))
    print(f"peak RSS {rss_mb():,.0f} MB")
    projector.close()
    db.close()
    if not args.url and not args.keep:
        schema = parse_qs(urlsplit(url).query)["schema"][0]
        with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
