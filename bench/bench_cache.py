"""The cache's hit path: FILA answering one warm prompt from its cache, every hit durably recorded.

    python bench/bench_cache.py [--seconds 10] [--connections 64] [--workers 2]

Measures, in one run on this machine (load from wrk, a separate process, on loopback):
  1. baseline: a bare Litestar app (same uvicorn flags and workers) whose one handler does one
     Redis GET of the cached body and returns its bytes;
  2. FILA (PostgreSQL ledger, Redis, fake upstream), a key on the enterprise plan (no rate
     limits), one prompt warmed: every request is a cache hit (memory layer after the first in
     each worker) recorded as its own ledger entry before it is answered.
Each under load (wrk, 64 connections) and at light load (one client, 50 req/s, sequential).
At light load also the floor (``bench/floor.py``): a bare Litestar handler that commits one row
to PostgreSQL and returns the same bytes, what any hit recorded durably before its answer pays
on this machine, so FILA's own share of its light-load figure is the difference.
Prints requests/s, p50, p99, committed events/s, the servers' peak RSS, and FILA / baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from litestar import Litestar, Response, post  # noqa: E402

from bench.common import (count_events, create_key, drop_database, fake_upstream, free_port,  # noqa: E402
                          fresh_database, machine, paced, row, tree_peak_rss_mb, uvicorn_app, wrk)
from bench.floor import BODY_ENV, DATABASE_ENV  # noqa: E402

BODY = {"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "Say hello to the cache benchmark."}]}
ADMIN = "bench-admin-token"
REDIS_URL = "redis://127.0.0.1:6379/0"
BASELINE_KEY_ENV = "FILA_BENCH_BASELINE_KEY"


def baseline_app():
    """uvicorn factory for the baseline: one Redis GET, the bytes back (what a hit must at least do)."""
    import redis.asyncio as aioredis

    key = os.environ[BASELINE_KEY_ENV]
    state: dict = {}

    async def connect() -> None:
        state["redis"] = aioredis.Redis.from_url(REDIS_URL)

    @post("/v1/chat/completions", status_code=200)
    async def cached() -> Response:
        return Response(await state["redis"].get(key), media_type="application/json")

    return Litestar(route_handlers=[cached], on_startup=[connect], debug=False, logging_config=None)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its children (the workers)."""
    import subprocess

    pids = [pid] + [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    ticks = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def hits_in(database: str, since: int) -> dict[str, int]:
    import msgspec
    import psycopg

    counts: dict[str, int] = {}
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT state FROM fila_events WHERE topic = 'fila:LedgerEntry.Recorded' "
                            "AND notification_id > %s", (since,)).fetchall()
    for (state,) in rows:
        entry = msgspec.json.decode(bytes(state))
        label = f"{entry['cache']}/{entry['cache_layer']}"
        counts[label] = counts.get(label, 0) + 1
    return counts


def max_notification(database: str) -> int:
    import psycopg

    with psycopg.connect(database) as conn:
        return conn.execute("SELECT coalesce(max(notification_id), 0) FROM fila_events").fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-embedded-projector", action="store_true",
                        help="FILA_EMBEDDED_PROJECTOR=false: the views are not projected inside the workers")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    upstream_port, fila_port, baseline_port = free_port(), free_port(), free_port()
    database = fresh_database()
    baseline_key = f"bench:cache:baseline:{uuid.uuid4().hex}"
    try:
        with fake_upstream(upstream_port):
            upstream = f"http://127.0.0.1:{upstream_port}/v1"
            env = {"FILA_DATABASE_URL": database, "FILA_REDIS_URL": REDIS_URL, "FILA_UPSTREAM_BASE_URL": upstream,
                   "OPENAI_API_KEY": "x", "FILA_ADMIN_TOKEN": ADMIN}
            if args.no_embedded_projector:
                env["FILA_EMBEDDED_PROJECTOR"] = "false"
            with uvicorn_app(fila_port, "fila.bootstrap:app_from_env", env, args.workers) as server:
                base = f"http://127.0.0.1:{fila_port}"
                url = f"{base}/v1/chat/completions"
                key = create_key(base, ADMIN, "enterprise")
                warm = []
                deadline = time.monotonic() + 30
                while len(warm) < 4 * args.workers:      # until every worker knows the key and holds the answer
                    answer = httpx.post(url, json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30)
                    warm = warm + [answer] if answer.status_code == 200 else []
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"warm-up failed: {answer.status_code} {answer.text[:200]}")
                cached_body = warm[-1].content
                print("warm-up:", [w.headers.get("x-fila-cache-layer") or w.headers.get("x-fila-cache") for w in warm])
                position = max_notification(database)
                before, started, cpu = count_events(database), time.perf_counter(), tree_cpu_s(server.pid)
                load = wrk(url, BODY, key, connections=args.connections, seconds=args.seconds)
                elapsed = time.perf_counter() - started
                load["cpu_ms"] = (tree_cpu_s(server.pid) - cpu) * 1000 / load["requests"]
                load["events_per_s"] = (count_events(database) - before) / elapsed
                light = paced(url, BODY, key)
                outcomes = hits_in(database, position)
                rss = tree_peak_rss_mb(server.pid)

            import redis

            redis.Redis.from_url(REDIS_URL).set(baseline_key, cached_body, ex=3600)
            with uvicorn_app(baseline_port, "bench.bench_cache:baseline_app", {BASELINE_KEY_ENV: baseline_key},
                         args.workers) as baseline:
                burl = f"http://127.0.0.1:{baseline_port}/v1/chat/completions"
                cpu = tree_cpu_s(baseline.pid)
                base_load = wrk(burl, BODY, "x", connections=args.connections, seconds=args.seconds)
                base_load["cpu_ms"] = (tree_cpu_s(baseline.pid) - cpu) * 1000 / base_load["requests"]
                base_light = paced(burl, BODY, "x")
                base_rss = tree_peak_rss_mb(baseline.pid)
            floor_port = free_port()
            with uvicorn_app(floor_port, "bench.floor:floor_app",
                             {DATABASE_ENV: database, BODY_ENV: cached_body.decode()}, args.workers):
                floor_light = paced(f"http://127.0.0.1:{floor_port}/v1/chat/completions", BODY, "x")
        print(f"\nload: wrk, {args.connections} connections, {args.seconds} s; light: one client at 50 req/s")
        print(row("baseline: Litestar + one Redis GET, load", base_load)
              + f"  server CPU {base_load['cpu_ms']:.3f} ms/request")
        print(row("baseline: Litestar + one Redis GET, light", base_light))
        print(row("floor: Litestar + one durable INSERT, light", floor_light))
        print(row("FILA cache hit, load", load) + f"  server CPU {load['cpu_ms']:.3f} ms/request"
              f"  committed {load['events_per_s']:,.0f} events/s")
        print(row("FILA cache hit, light", light))
        print(f"\nledger entries during the runs, by cache/layer: {outcomes}")
        print(f"FILA / baseline: {load['rps'] / base_load['rps']:.2f} x throughput, "
              f"{load['cpu_ms'] / base_load['cpu_ms']:.2f} x server CPU per request; "
              f"light p50 {light['p50_ms']:.2f} ms vs {base_light['p50_ms']:.2f} ms")
        print(f"peak RSS ({args.workers} workers + supervisor): FILA {rss:.0f} MB, baseline {base_rss:.0f} MB")
    finally:
        drop_database(database)
        try:
            import redis

            redis.Redis.from_url(REDIS_URL).delete(baseline_key)
        except Exception:  # tidying the shared Redis is best effort
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
