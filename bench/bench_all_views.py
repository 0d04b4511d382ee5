"""Every view at once (usage x4, audit chain, billing) over N ledger entries of one assignment.

    python bench/bench_all_views.py [N]                 (default 1,000,000; 2 runs)
    python bench/bench_all_views.py 1000000 --runs 3 --keep
    python bench/bench_all_views.py 1000000 --url 'postgresql://postgres@127.0.0.1:5432/fila_bench?schema=S'

Writes N entries into a fresh schema (as bench_audit.py does; ``--url`` reuses a schema that has
them, ``--keep`` keeps the fresh one), then, ``--runs`` times: a page-by-page catch-up of all
registered views into live tables, and a rebuild into fresh tables. The baseline, in the same
run: the projector's direct reader paging through the log, no decoding, no writes. Besides
events/s it prints CPU microseconds per event for this process (Python, every thread) and for
the PostgreSQL backends serving it; at the end the best and the range of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench import bench_audit as ba  # noqa: E402
from bench.bench_projections import Cpu  # noqa: E402
from fila.projections.runner import TRACKING_TABLE, registered_views  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("entries", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--page", type=int, default=10_000)
    parser.add_argument("--url", help="a schema that already has the entries (default: a fresh one)")
    parser.add_argument("--keep", action="store_true", help="keep the fresh schema")
    args = parser.parse_args(argv)
    url = args.url or ba.fresh_url()[0]
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    dbname = urlsplit(url).path.lstrip("/")
    print(f"machine: {ba.machine()}")
    store, db = ba.open_store(url), ba.open_database(url)
    try:
        if not store.recorder.max_notification_id():
            plan = ba.Plan.define("bench-pro", {"name": "Bench Pro", "monthly_price_minor": 4900,
                                                "included_tokens": 20_000_000, "input_price_per_million": "0.40",
                                                "output_price_per_million": "1.60"}, ba.START)
            assignment = ba.Assignment.assign(ba.assignment_id_for("key-bench", 0), "key-bench", str(plan.id),
                                              ba.START, None, ba.START)
            store.save(plan, assignment)
            ba.write_entries(store, args.entries, "key-bench", str(assignment.id), str(plan.id))
        db.analyze_if_stale(schema, store.recorder.events_table_name)   # as autovacuum would have by now
        views = registered_views()
        print(f"url: {url}  views: {', '.join(v.name for v in views)}  page: {args.page:,}")

        baseline = ba.Projector(db, store.recorder, views, page=args.page)
        with Cpu(dbname) as cpu:
            position = count = 0
            while rows := baseline._select_direct(position, position + 2 * args.page, args.page, None):
                count += len(rows)
                position = rows[-1][0]
        print(cpu.line("read", count, "  (baseline: the direct reader's pages, no decoding, no writes)"))
        baseline.close()

        rates: dict[str, list[float]] = {"catchup": [], "rebuild": []}
        for _ in range(args.runs):
            with psycopg.connect(url.split("?")[0], autocommit=True) as conn:   # every view from 0
                for table in [t for v in views for t in v.tables] + [TRACKING_TABLE]:
                    conn.execute(f'DROP TABLE IF EXISTS "{schema}".{table}')
            for label in rates:
                projector = ba.Projector(db, store.recorder, views, page=args.page, bulk_from_zero=10**12)
                projector.setup()
                with Cpu(dbname) as cpu:
                    events = projector.catch_up() if label == "catchup" else projector.rebuild()
                projector.close()
                rates[label].append(events / cpu.wall)
                detail = "page by page into live tables" if label == "catchup" else "into fresh tables, swapped in"
                print(cpu.line(label, events, f"  ({detail})"))
        for label, values in rates.items():
            print(f"{label:8s} best {max(values):,.0f} events/s, range {min(values):,.0f} to {max(values):,.0f} "
                  f"over {len(values)} runs")
    finally:
        db.close()
        store.close()
        if not args.url and not args.keep:
            with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
