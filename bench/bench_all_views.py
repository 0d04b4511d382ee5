"""Every view at once (usage x4, audit chain, billing) over N ledger entries of one assignment.

    python bench/bench_all_views.py [N]        (default 1,000,000)

Writes N entries into a fresh schema (as bench_audit.py does), then times a page-by-page
catch-up of all registered views into live tables and a rebuild into fresh tables. The baseline
(raw page reads) is printed by bench_projections.py over the same kind of log.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_audit as ba  # noqa: E402
from fila.projections.runner import registered_views  # noqa: E402


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    url, schema = ba.fresh_url()
    print(f"machine: {ba.machine()}")
    store, db = ba.open_store(url), ba.open_database(url)
    plan = ba.Plan.define("bench-pro", {"name": "Bench Pro", "monthly_price_minor": 4900,
                                        "included_tokens": 20_000_000, "input_price_per_million": "0.40",
                                        "output_price_per_million": "1.60"}, ba.START)
    assignment = ba.Assignment.assign(ba.assignment_id_for("key-bench", 0), "key-bench", str(plan.id),
                                      ba.START, None, ba.START)
    store.save(plan, assignment)
    ba.write_entries(store, n, "key-bench", str(assignment.id), str(plan.id))
    if hasattr(db, "analyze_if_stale"):
        db.analyze_if_stale(schema, store.recorder.events_table_name)
    views = registered_views()
    for label in ("catch-up, page by page into live tables", "rebuild into fresh tables"):
        projector = ba.Projector(db, store.recorder, views, bulk_from_zero=10**12)
        began = time.perf_counter()
        if label.startswith("catch-up"):
            projector.catch_up()
        else:
            projector.rebuild()
        elapsed = time.perf_counter() - began
        print(f"{label:<42} {[v.name for v in views]}  {n:,} events in {elapsed:.2f} s = {n / elapsed:,.0f} events/s")
        projector.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
