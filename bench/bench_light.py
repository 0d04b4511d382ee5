"""Light-load latency, interleaved: FILA and its baselines and floors take turns, round after round.

    python bench/bench_light.py [--rounds 5] [--seconds 4] [--workers 2] [--variant NAME=VALUE]

This VM's latency at light load drifts between minutes by more than the differences measured
(the same bare handler: 0.44-0.83 ms p50 within one hour), so the light-load lines of
``bench_cache.py`` and ``bench_gateway.py``, each taken at its own moment, compare poorly. Here
every server is up at once and one client at 50 req/s (wrk on one connection, as in those
benches) visits each in turn for ``--seconds``, ``--rounds`` times:

  cache hit:  a bare Litestar handler doing one Redis GET (the cache bench's baseline); the floor
              (``bench/floor.py``: one durable PostgreSQL commit, then the bytes); FILA, a hit of
              its in-process layer, recorded before the answer;
  core path:  the fake upstream called directly (the gateway bench's baseline); the floor with
              the same upstream call before its commit; FILA, cache bypassed, to that upstream.

``--variant FILA_SETTING=value`` starts a second FILA with that setting changed (same database)
and gives it its own two turns, for an A/B inside the same rounds.

Prints each round's p50 and the medians, and FILA's figure over its floor and its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import redis  # noqa: E402

from bench.bench_cache import ADMIN, BASELINE_KEY_ENV, BODY, REDIS_URL  # noqa: E402
from bench.bench_gateway import BYPASS  # noqa: E402
from bench.common import (create_key, drop_database, fake_upstream, fila_server, free_port, fresh_database,  # noqa: E402
                          machine, paced, uvicorn_app)
from bench.floor import BODY_ENV, DATABASE_ENV, UPSTREAM_ENV  # noqa: E402


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="each server's turn in a round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", help="NAME=VALUE: a second FILA with this setting, taking turns too")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    database = fresh_database()
    baseline_key = f"bench:light:baseline:{uuid.uuid4().hex}"
    ports = {name: free_port() for name in ("upstream", "fila", "variant", "redis_get", "floor", "floor_call")}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(fake_upstream(ports["upstream"]))
            upstream = f"http://127.0.0.1:{ports['upstream']}/v1"
            env = {"FILA_DATABASE_URL": database, "FILA_REDIS_URL": REDIS_URL, "FILA_UPSTREAM_BASE_URL": upstream,
                   "OPENAI_API_KEY": "bench", "FILA_ADMIN_TOKEN": ADMIN, "FILA_EMBEDDED_PROJECTOR": "false"}
            stack.enter_context(fila_server(ports["fila"], env, workers=args.workers))
            base = f"http://127.0.0.1:{ports['fila']}"
            key = create_key(base, ADMIN, "enterprise")
            variant = None
            if args.variant:
                name, _, value = args.variant.partition("=")
                stack.enter_context(fila_server(ports["variant"], {**env, name: value}, workers=args.workers))
                variant = f"http://127.0.0.1:{ports['variant']}"
            answer = None
            for _ in range(4 * args.workers):    # every worker holds the answer in memory
                for server in filter(None, (base, variant)):
                    answer = httpx.post(f"{server}/v1/chat/completions", json=BODY, timeout=30,
                                        headers={"authorization": f"Bearer {key}"})
                    answer.raise_for_status()
            redis.Redis.from_url(REDIS_URL).set(baseline_key, answer.content, ex=3600)
            stack.enter_context(uvicorn_app(ports["redis_get"], "bench.bench_cache:baseline_app",
                                            {BASELINE_KEY_ENV: baseline_key}, args.workers))
            stack.enter_context(uvicorn_app(ports["floor"], "bench.floor:floor_app",
                                            {DATABASE_ENV: database, BODY_ENV: answer.content.decode()}, args.workers))
            stack.enter_context(uvicorn_app(ports["floor_call"], "bench.floor:floor_app",
                                            {DATABASE_ENV: database, UPSTREAM_ENV: f"{upstream}/chat/completions"},
                                            args.workers))

            def at(name: str) -> str:
                return f"http://127.0.0.1:{ports[name]}/v1/chat/completions"

            turns = {   # name: (label, url, key, headers)
                "get": ("baseline: Litestar + one Redis GET", at("redis_get"), "x", None),
                "floor": ("floor: Litestar + one durable INSERT", at("floor"), "x", None),
                "hit": ("FILA cache hit", f"{base}/v1/chat/completions", key, None),
                "direct": ("baseline: fake upstream direct", f"{upstream}/chat/completions", "x", None),
                "floor_call": ("floor: + the upstream call first", at("floor_call"), "x", None),
                "miss": ("FILA, upstream call (cache bypassed)", f"{base}/v1/chat/completions", key, BYPASS),
            }
            if variant:
                turns["hit_b"] = (f"FILA cache hit, {args.variant}", f"{variant}/v1/chat/completions", key, None)
                turns["miss_b"] = (f"FILA upstream call, {args.variant}", f"{variant}/v1/chat/completions", key,
                                   BYPASS)
            p50s: dict[str, list[float]] = {name: [] for name in turns}
            for _ in range(args.rounds):
                for name, (_, url, secret, headers) in turns.items():
                    p50s[name].append(paced(url, BODY, secret, seconds=args.seconds, headers=headers)["p50_ms"])
        print(f"\none client at 50 req/s, {args.seconds} s a turn, {args.rounds} rounds; p50 in ms")
        for name, values in p50s.items():
            print(f"{turns[name][0]:<44} " + " ".join(f"{v:5.2f}" for v in values) + f"   median {median(values):5.2f}")
        m = {name: median(values) for name, values in p50s.items()}
        print(f"\ncache hit: FILA {m['hit']:.2f} ms; over the floor {m['hit'] - m['floor']:+.2f} ms, "
              f"over the Redis GET baseline {m['hit'] - m['get']:+.2f} ms")
        print(f"core path: FILA adds {m['miss'] - m['direct']:+.2f} ms to the direct call; the floor adds "
              f"{m['floor_call'] - m['direct']:+.2f} ms (FILA over the floor {m['miss'] - m['floor_call']:+.2f} ms)")
        if variant:
            print(f"{args.variant}: cache hit {m['hit_b'] - m['hit']:+.2f} ms, "
                  f"upstream call {m['miss_b'] - m['miss']:+.2f} ms (against FILA as configured)")
    finally:
        drop_database(database)
        redis.Redis.from_url(REDIS_URL).delete(baseline_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
