"""Ledger-entry ids: time-ordered (UUID version 7, ``fila.services.ids.new_uuid``) against random
(version 4, the baseline), as keys of an events table shaped like FILA's.

    python bench/bench_ledger_ids.py [--rows 200000] [--batches 300]

Two tables with the events table's columns and indexes (primary key on (originator_id,
originator_version), a unique notification id), each first filled with ``--rows`` rows keyed by
its kind of id, then written as the batcher writes (batches of 100 in one transaction that locks
the table, as FILA's recorder does), the two kinds taking turns batch by batch. Prints rows/s for
each kind and the size of each primary-key index.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.common import drop_database, fresh_database, machine  # noqa: E402
from fila.services.ids import new_uuid  # noqa: E402

KINDS = {"random ids (uuid4), baseline": uuid.uuid4, "time-ordered ids (new_uuid, v7)": new_uuid}
STATE = os.urandom(400).hex()     # about a ledger entry's encoded size


def rows(make_id, count: int) -> str:
    return ",".join(f"('{make_id()}',1,'fila.ledger:LedgerEntry.Recorded',decode('{STATE}','hex'))"
                    for _ in range(count))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000, help="rows stored in each table before timing")
    parser.add_argument("--batches", type=int, default=300, help="timed batches of 100 per kind")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    database = fresh_database()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            tables = {}
            for number, (label, make_id) in enumerate(KINDS.items()):
                table = f"events_{number}"
                conn.execute(f"CREATE TABLE {table} (originator_id uuid NOT NULL, originator_version bigint NOT NULL, "
                             "topic text NOT NULL, state bytea NOT NULL, notification_id bigserial, "
                             f"PRIMARY KEY (originator_id, originator_version))")
                conn.execute(f"CREATE UNIQUE INDEX {table}_notification ON {table} (notification_id)")
                for _ in range(args.rows // 5000):
                    conn.execute(f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
                                 f"VALUES {rows(make_id, 5000)}")
                tables[label] = (table, make_id)
            conn.execute("CHECKPOINT")
            spent = {label: 0.0 for label in KINDS}
            for _ in range(args.batches):
                for label, (table, make_id) in tables.items():
                    statement = (f"BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE; INSERT INTO {table} "
                                 f"(originator_id, originator_version, topic, state) VALUES {rows(make_id, 100)} "
                                 "RETURNING notification_id; COMMIT")
                    started = time.perf_counter()
                    with conn.cursor() as cursor:
                        cursor.execute(statement)
                    spent[label] += time.perf_counter() - started
            print(f"\n{args.rows:,} rows stored per table first; then {args.batches} batches of 100 per kind, "
                  "taking turns")
            for label, (table, _) in tables.items():
                size = conn.execute(f"SELECT pg_relation_size('{table}_pkey')").fetchone()[0]
                print(f"{label:<34} {args.batches * 100 / spent[label]:>9,.0f} rows/s  "
                      f"primary key {size / 2**20:.1f} MB")
    finally:
        drop_database(database)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
