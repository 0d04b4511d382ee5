"""The core path: FILA in front of a 0 ms fake upstream, every request durably recorded.

    python bench/bench_gateway.py [--seconds 10] [--connections 64] [--workers 2]

Measures, in one run on this machine (load from wrk, a separate process, on loopback):
  1. baseline: the fake upstream called directly (wrk at 64 connections; a paced client at 50 req/s);
  2. FILA -> fake upstream, key on a plan without rate limits (cache bypassed: every request
     goes upstream and is recorded);
  3. the same with a plan whose rate limits are all set (high enough never to refuse), so the
     cost of rate limiting and plan lookup shows as a difference; 2 and 3 take turns over
     ``--rounds`` rounds and the medians are compared;
  4. the floor (``bench/floor.py``): a bare Litestar handler that calls the same upstream with
     aiohttp and commits one row to PostgreSQL before answering, at light load only: what any
     durable gateway on this stack pays on this machine, so FILA's own share is the difference;
with ``--with-projector``, ``fila projections run`` follows the log in its own process (as in
docker-compose) on the same two cores, and its lag is sampled every second.
Prints requests/s, p50, p99, committed events/s, the server's peak RSS, and the added latency.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.common import (count_events, create_key, drop_database, fake_upstream, fila_server, free_port,  # noqa: E402
                          fresh_database, machine, paced, process, row, tree_peak_rss_mb, uvicorn_app, wrk)
from bench.floor import DATABASE_ENV, UPSTREAM_ENV  # noqa: E402

BODY = {"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
BYPASS = {"x-fila-cache": "bypass"}
ADMIN = "bench-admin-token"


def limited_plan(base: str) -> None:
    response = httpx.post(f"{base}/admin/plans", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30, json={
        "slug": "bench-limited", "name": "Bench (limits on)", "included_tokens": 10**12,
        "requests_per_minute": 10**9, "requests_per_hour": 10**9, "requests_per_day": 10**9,
        "tokens_per_minute": 10**12})
    if response.status_code not in (201, 409):
        raise RuntimeError(response.text)


def in_turn(keys: dict[str, str], number: int) -> list[tuple[str, str]]:
    """The plans in round ``number``'s order: as given, then reversed, and so on."""
    items = list(keys.items())
    return items if number % 2 == 0 else items[::-1]


def median_run(runs: list[dict], by: str) -> dict:
    """The run whose ``by`` is the median of the rounds (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run[by])[(len(runs) - 1) // 2]


def projection_lag(database: str) -> tuple[int, int]:
    """(log head, how far the slowest view is behind it)."""
    import psycopg

    with psycopg.connect(database) as conn:
        head = conn.execute("SELECT coalesce(max(notification_id), 0) FROM fila_events").fetchone()[0]
        slowest = conn.execute("SELECT min(position) FROM fila_projection_tracking").fetchone()[0]
    return head, head - (slowest or 0)


def watch_lag(database: str, stop: threading.Event, samples: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            samples.append(projection_lag(database)[1])
        except Exception:  # the tracking table may not exist for the first second
            pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="turns each FILA plan takes (load, then light)")
    parser.add_argument("--light-seconds", type=int, default=6)
    parser.add_argument("--with-projector", action="store_true",
                        help="also run `fila projections run` (its own process) and sample its lag")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    upstream_port, fila_port = free_port(), free_port()
    database = fresh_database()
    try:
        with fake_upstream(upstream_port):
            upstream = f"http://127.0.0.1:{upstream_port}/v1"
            direct = wrk(f"{upstream}/chat/completions", BODY, "x", connections=args.connections, seconds=args.seconds)
            direct_light = paced(f"{upstream}/chat/completions", BODY, "x")
            env = {"FILA_DATABASE_URL": database, "FILA_REDIS_URL": "redis://127.0.0.1:6379/0",
                   "FILA_UPSTREAM_BASE_URL": upstream, "OPENAI_API_KEY": "bench", "FILA_ADMIN_TOKEN": ADMIN,
                   "FILA_EMBEDDED_PROJECTOR": "false"}
            projector = (process([sys.executable, "-m", "fila.cli", "projections", "run"],
                                 env={**env, "FILA_LOG_LEVEL": "warning"}) if args.with_projector
                         else contextlib.nullcontext())
            with fila_server(fila_port, env, workers=args.workers) as server, projector:
                base = f"http://127.0.0.1:{fila_port}"
                url = f"{base}/v1/chat/completions"
                limited_plan(base)
                keys = {"FILA, no rate limits": create_key(base, ADMIN, "enterprise"),
                        "FILA, rate limits on": create_key(base, ADMIN, "bench-limited")}
                loads: dict[str, list[dict]] = {label: [] for label in keys}
                lights: dict[str, list[dict]] = {label: [] for label in keys}
                lags: list[int] = []
                # the two plans take turns, round after round: this VM's speed drifts between
                # runs by more than the difference measured. Which goes first alternates
                # (A B, B A, ...): the VM often slows over a run, which would always cost the second
                for number in range(args.rounds):
                    for label, key in in_turn(keys, number):
                        before, started = count_events(database), time.perf_counter()
                        stop = threading.Event()
                        watcher = threading.Thread(target=watch_lag, args=(database, stop, lags))
                        if args.with_projector:
                            watcher.start()
                        load = wrk(url, BODY, key, connections=args.connections, seconds=args.seconds,
                                   headers=BYPASS)
                        elapsed = time.perf_counter() - started
                        stop.set()
                        if args.with_projector:
                            watcher.join()
                        load["events_per_s"] = (count_events(database) - before) / elapsed
                        loads[label].append(load)
                for number in range(args.rounds):
                    for label, key in in_turn(keys, number):
                        lights[label].append(paced(url, BODY, key, headers=BYPASS, seconds=args.light_seconds))
                rss = tree_peak_rss_mb(server.pid)
                if args.with_projector:
                    time.sleep(3)
                    head, final_lag = projection_lag(database)
            floor_env = {DATABASE_ENV: database, UPSTREAM_ENV: f"{upstream}/chat/completions"}
            floor_port = free_port()
            with uvicorn_app(floor_port, "bench.floor:floor_app", floor_env, args.workers):
                floor_light = paced(f"http://127.0.0.1:{floor_port}/v1/chat/completions", BODY, "x",
                                    seconds=args.light_seconds)
        print(f"\nload: wrk, {args.connections} connections, {args.seconds} s; light: one client at 50 req/s "
              f"for {args.light_seconds} s; FILA's two plans alternate over {args.rounds} rounds (medians below)")
        print(row("baseline: fake upstream direct, load", direct))
        print(row("baseline: fake upstream direct, light", direct_light))
        print(row("floor: Litestar + that call + durable INSERT, light", floor_light)
              + f"  added p50 {floor_light['p50_ms'] - direct_light['p50_ms']:+.2f} ms")
        results = {label: (median_run(loads[label], "rps"), median_run(lights[label], "p50_ms")) for label in keys}
        for label, (load, light) in results.items():
            print(row(f"{label}, load", load) + f"  committed {load['events_per_s']:,.0f} events/s")
            print(row(f"{label}, light", light) + f"  added p50 {light['p50_ms'] - direct_light['p50_ms']:+.2f} ms")
        for label in keys:
            print(f"  {label}, each round: " + ", ".join(f"{r['rps']:,.0f} req/s" for r in loads[label])
                  + "; light p50 " + ", ".join(f"{r['p50_ms']:.2f}" for r in lights[label]) + " ms")
        (off_load, off_light), (on_load, on_light) = results.values()
        print(f"\nrate limiting + plan lookup: p50 {on_light['p50_ms'] - off_light['p50_ms']:+.3f} ms at light load, "
              f"throughput {100 * (on_load['rps'] / off_load['rps'] - 1):+.1f} % under load (medians)")
        pairs = [100 * (on['rps'] / off['rps'] - 1) for off, on in zip(*(loads[label] for label in keys))]
        print("  throughput, rate limits on against off, round by round: "
              + ", ".join(f"{pair:+.1f} %" for pair in pairs) + " (rounds alternate which plan goes first)")
        print(f"FILA server peak RSS ({args.workers} workers + supervisor): {rss:.0f} MB")
        if args.with_projector:
            print(f"projector (fila projections run, its own process, all views): lag sampled each second "
                  f"under load max {max(lags, default=0):,} events, median {sorted(lags)[len(lags) // 2] if lags else 0:,}; "
                  f"3 s after the load {final_lag:,} of {head:,} events")
    finally:
        drop_database(database)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
