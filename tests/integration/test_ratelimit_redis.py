"""RateLimiter against a real Redis (127.0.0.1:6379): the Lua script, concurrency across tasks
and OS processes, tokens, rebuild, and the degraded fallback."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections import Counter

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from fila.adapters.ratelimit import (
    HOUR, MINUTE, TOKENS, Limits, LocalLimiter, RateLimiter, window_start,
)

HOST, PORT = "127.0.0.1", 6379
SLACK = 5.0  # deadline for tests about exactness: a loaded CI box must not make them degrade
T0 = 1_700_000_040.0  # a minute boundary


pytestmark = pytest.mark.usefixtures("redis_server")


def new_client(**kwargs) -> aioredis.Redis:
    kwargs = {"socket_timeout": SLACK, "retry": Retry(NoBackoff(), 0), **kwargs}
    return aioredis.Redis(host=kwargs.pop("host", HOST), port=kwargs.pop("port", PORT), **kwargs)


@pytest.fixture
def prefix():
    prefix = f"test:rl:{uuid.uuid4().hex}"
    yield prefix
    sync = redis.Redis(host=HOST, port=PORT)  # tidy up the shared server
    keys = list(sync.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        sync.delete(*keys)


@pytest.fixture
async def client():
    client = new_client()
    yield client
    await client.aclose()


@pytest.fixture
def limiter(client, prefix):
    return RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=0)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict]] = []

    def warning(self, event: str, **kw) -> None:
        self.warnings.append((event, kw))


async def test_exactly_limit_allowed_per_window_sequentially(limiter):
    limits = Limits(requests_per_minute=7, requests_per_hour=12)
    first = [(await limiter.check("k", limits, now=T0 + i)).allowed for i in range(20)]
    assert first == [True] * 7 + [False] * 13
    second = [(await limiter.check("k", limits, now=T0 + 60 + i)).allowed for i in range(20)]
    assert second == [True] * 5 + [False] * 15  # the hour has 12
    third = [(await limiter.check("k", limits, now=T0 + HOUR * 2 + i)).allowed for i in range(9)]
    assert third == [True] * 7 + [False] * 2


async def test_refused_requests_do_not_consume(limiter, client, prefix):
    limits = Limits(requests_per_minute=3, requests_per_day=5)
    for i in range(13):
        await limiter.check("k", limits, now=T0 + i)
    assert int(await client.get(f"{prefix}:{{k}}:m:{int(T0)}")) == 3
    assert int(await client.get(f"{prefix}:{{k}}:d:{window_start(T0, 86400)}")) == 3
    assert [(await limiter.check("k", limits, now=T0 + 60 + i)).allowed
            for i in range(5)] == [True, True, False, False, False]
    ttl = await client.ttl(f"{prefix}:{{k}}:m:{int(T0)}")  # created at T0: window + margin
    assert MINUTE <= ttl <= MINUTE + 5


async def test_retry_after_and_reset_values(limiter):
    limits = Limits(requests_per_minute=2, requests_per_hour=100)
    now = T0 + 45.2
    ok = await limiter.check("k", limits, now=now)
    assert (ok.limit_requests, ok.remaining_requests, ok.retry_after_s) == (2, 1, None)
    assert ok.reset_requests_s == pytest.approx(14.8)
    await limiter.check("k", limits, now=now)
    refused = await limiter.check("k", limits, now=now)
    assert (refused.allowed, refused.rule, refused.remaining_requests) == (
        False, "requests_per_minute", 0)
    assert refused.retry_after_s == pytest.approx(14.8)
    assert refused.counts == {"requests_per_minute": 2, "requests_per_hour": 2}
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "14.8s",
        "Retry-After": "15",
    }
    assert not refused.degraded


async def test_checks_of_one_tick_are_one_script_call_admitting_in_order_up_to_the_limit(limiter, client, prefix):
    limits = Limits(requests_per_minute=20, requests_per_hour=25)
    assert (await limiter.check("k", limits, now=T0 + 1)).allowed          # 1 used before the burst
    calls = []
    send = limiter._scripts.call

    async def counted(script, keys, args):
        calls.append(args[0])
        return await send(script, keys, args)

    limiter._scripts.call = counted
    decisions = await asyncio.gather(*(limiter.check("k", limits, now=T0 + 2) for _ in range(30)))
    assert calls == [29]            # the first went at once, alone; the 29 behind it as one call
    assert [d.allowed for d in decisions] == [True] * 19 + [False] * 11    # in arrival order
    assert [d.counts["requests_per_minute"] for d in decisions[:19]] == list(range(2, 21))
    assert [d.remaining_requests for d in decisions[:19]] == list(range(18, -1, -1))
    assert {(d.rule, d.counts["requests_per_minute"], d.counts["requests_per_hour"]) for d in decisions[19:]} == \
        {("requests_per_minute", 20, 20)}
    assert int(await client.get(f"{prefix}:{{k}}:m:{int(T0)}")) == 20     # refusals consumed nothing
    # the hour has 5 left once the next minute opens: 5 of the next tick's 8 get in
    later = await asyncio.gather(*(limiter.check("k", limits, now=T0 + 61) for _ in range(8)))
    assert [d.allowed for d in later] == [True] * 5 + [False] * 3 and calls == [29, 7]
    assert {d.rule for d in later[5:]} == {"requests_per_hour"}


async def test_a_full_token_minute_refuses_the_whole_tick(limiter, prefix):
    limits = Limits(requests_per_minute=100, tokens_per_minute=50)
    await limiter.add_tokens("k", 50, limits, now=T0 + 1)
    decisions = await asyncio.gather(*(limiter.check("k", limits, now=T0 + 2) for _ in range(4)))
    assert [(d.allowed, d.rule) for d in decisions] == [(False, TOKENS)] * 4
    assert all(d.counts == {"requests_per_minute": 0, TOKENS: 50} for d in decisions)


async def test_tokens_finished_together_are_summed_into_one_redis_call_per_counter(limiter, client, prefix):
    limits = Limits(tokens_per_minute=10**6)
    calls = []
    send = limiter._scripts.call

    async def counted(script, keys, args):
        calls.append((tuple(keys), tuple(args)))
        return await send(script, keys, args)

    limiter._scripts.call = counted
    await asyncio.gather(*(limiter.add_tokens("k", n, limits, now=T0 + 1) for n in range(1, 51)),
                         *(limiter.add_tokens("other", 7, limits, now=T0 + 1) for _ in range(3)))
    assert sorted((keys, args[0]) for keys, args in calls) == [
        ((f"{prefix}:{{k}}:t:{int(T0)}",), 1275), ((f"{prefix}:{{other}}:t:{int(T0)}",), 21)]
    assert int(await client.get(f"{prefix}:{{k}}:t:{int(T0)}")) == 1275      # 1 + 2 + ... + 50
    assert int(await client.get(f"{prefix}:{{other}}:t:{int(T0)}")) == 21
    await limiter.add_tokens("k", 5, limits, now=T0 + 2)                      # a later tick: its own call
    assert len(calls) == 3 and int(await client.get(f"{prefix}:{{k}}:t:{int(T0)}")) == 1280


async def test_tokens_counted_over_the_flush_interval_go_as_one_call_and_release_sends_them(client, prefix):
    limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, tokens_flush_s=0.2)
    calls = _counting(limiter)
    limits = Limits(tokens_per_minute=10**6)
    counter = f"{prefix}:{{k}}:t:{int(T0)}"
    for n in range(1, 11):                       # ten requests finishing in ten loop ticks
        limiter.count_tokens("k", n, limits, now=T0 + 1)
        await asyncio.sleep(0.005)
    assert await client.get(counter) is None and calls == []       # still inside the interval
    assert limiter._fallback.seen("k", TOKENS, int(T0)) == 55     # ...but this process sees them
    await asyncio.sleep(0.3)
    assert int(await client.get(counter)) == 55 and calls == ["script"]
    limiter.count_tokens("k", 45, limits, now=T0 + 2)
    await limiter.release()                       # shutdown: what is owed goes at once
    assert int(await client.get(counter)) == 100 and calls == ["script", "script"]


async def test_token_limit_refuses_after_add_tokens_reaches_it(limiter, client, prefix):
    limits = Limits(requests_per_minute=100, tokens_per_minute=1000)
    first = await limiter.check("k", limits, now=T0 + 1)
    assert (first.allowed, first.remaining_tokens, first.counts[TOKENS]) == (True, 1000, 0)
    await limiter.add_tokens("k", 600, limits, now=T0 + 2)
    assert MINUTE - 2 <= await client.ttl(f"{prefix}:{{k}}:t:{int(T0)}") <= MINUTE + 5
    second = await limiter.check("k", limits, now=T0 + 3)
    assert second.allowed and second.remaining_tokens == 400
    await limiter.add_tokens("k", 400, limits, now=T0 + 4)
    refused = await limiter.check("k", limits, now=T0 + 10)
    assert (refused.allowed, refused.rule, refused.remaining_tokens) == (False, TOKENS, 0)
    assert refused.retry_after_s == pytest.approx(50.0)
    assert refused.headers()["x-ratelimit-reset-tokens"] == "50s"
    assert refused.counts == {"requests_per_minute": 2, TOKENS: 1000}
    assert (await limiter.check("k", limits, now=T0 + 60)).allowed


async def test_rebuild_restores_counts_after_losing_redis(limiter, client, prefix):
    limits = Limits(requests_per_minute=10, requests_per_hour=20, tokens_per_minute=5000)
    now = window_start(T0, HOUR) + 1830.0
    events = [(now - 3700, 100), (now - 1000, 7), (now - 200, 7),  # earlier hour / this hour
              *((now - 25 + i, 1000) for i in range(4)),  # this minute
              (now + 5, 9)]  # after `now`: ignored
    for at, tokens in events[:-1]:
        assert (await limiter.check("k", limits, now=at)).allowed
        await limiter.add_tokens("k", tokens, limits, now=at)
    before = await limiter.check("k", limits, now=now)
    await client.delete(*[k async for k in client.scan_iter(f"{prefix}:*")])  # Redis lost
    lost = await limiter.check("k", limits, now=now)
    assert lost.counts["requests_per_hour"] == 1

    counts = await limiter.rebuild("k", events, limits, now=now)
    assert counts == {"requests_per_minute": 4, "requests_per_hour": 6, TOKENS: 4000}
    after = await limiter.check("k", limits, now=now)
    assert after.counts == before.counts
    assert after.counts == {"requests_per_minute": 5, "requests_per_hour": 7, TOKENS: 4000}


async def test_concurrent_tasks_admit_exactly_the_limit(limiter):
    limits = Limits(requests_per_minute=50)
    now = time.time()  # one fixed instant, so a minute boundary cannot split the run

    async def task(calls: int) -> int:
        return sum([(await limiter.check("k", limits, now=now)).allowed for _ in range(calls)])

    assert sum(await asyncio.gather(*(task(20) for _ in range(10)))) == 50


def _process_worker(prefix, key_id, now, tasks, calls, barrier, results):
    async def main() -> int:
        client = new_client()
        limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK)
        await client.ping()  # connect before the start line
        barrier.wait(timeout=30)

        async def task() -> int:
            return sum([(await limiter.check(key_id, Limits(requests_per_minute=50), now=now))
                        .allowed for _ in range(calls)])

        try:
            return sum(await asyncio.gather(*(task() for _ in range(tasks))))
        finally:
            await client.aclose()

    results.put(asyncio.run(main()))


async def test_tasks_and_two_os_processes_admit_exactly_the_limit(limiter, client, prefix):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    now = time.time()
    procs = [ctx.Process(target=_process_worker,
                         args=(prefix, "shared", now, 5, 10, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        await client.ping()
        barrier.wait(timeout=30)  # all three processes start together

        async def task() -> int:
            return sum([(await limiter.check("shared", Limits(requests_per_minute=50), now=now))
                        .allowed for _ in range(10)])

        here = sum(await asyncio.gather(*(task() for _ in range(10))))  # 100 calls here
        there = [results.get(timeout=30) for _ in procs]  # 2 x 50 calls in the other processes
    finally:
        for p in procs:
            p.join(timeout=30)
    assert here + sum(there) == 50
    assert all(p.exitcode == 0 for p in procs)
    assert int(await client.get(f"{prefix}:{{shared}}:m:{window_start(now, MINUTE)}")) == 50


# --- the Lua script and the LocalLimiter agree, and both admit iff no window is full ------

steps = st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 400)), max_size=40)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.floats(1e9, 3e9, allow_nan=False), span=st.sampled_from([5.0, 150.0, 8000.0]),
       steps=steps, limits=st.builds(Limits, *[st.none() | st.integers(0, 6)] * 3,
                                     st.none() | st.integers(0, 1500)))
def test_lua_matches_model_and_local_limiter(base, span, steps, limits):
    calls = sorted((base + span * x, tokens) for x, tokens in steps)
    prefix, key_id = f"test:rl:{uuid.uuid4().hex}", uuid.uuid4().hex

    async def run() -> list:
        client = new_client()
        try:
            limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=0)
            decisions = []
            for t, tokens in calls:
                decisions.append(await limiter.check(key_id, limits, now=t))
                await limiter.add_tokens(key_id, tokens, limits, now=t)
            return decisions
        finally:
            keys = [k async for k in client.scan_iter(f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    decisions = asyncio.run(run())
    local, admitted, tokens_in = LocalLimiter(), Counter(), Counter()
    for (t, tokens), remote in zip(calls, decisions):
        windows = [(rule, window_start(t, seconds), limit)
                   for rule, limit, seconds, _ in limits.rules]
        full = any(admitted[rule, w] >= limit for rule, w, limit in windows) or (
            limits.tokens_per_minute is not None
            and tokens_in[window_start(t, MINUTE)] >= limits.tokens_per_minute)
        assert remote.allowed is not full
        assert not remote.degraded
        assert remote == local.check(key_id, limits, now=t)
        if limits.tokens_per_minute is not None:
            tokens_in[window_start(t, MINUTE)] += tokens
            local.add_tokens(key_id, tokens, now=t)
        if remote.allowed:
            for rule, w, _ in windows:
                admitted[rule, w] += 1
    for (rule, _), n in admitted.items():
        assert n <= getattr(limits, rule)


# --- Redis unreachable or slow ------------------------------------------------------------

async def test_unreachable_redis_degrades_to_local_limits_without_raising(prefix):
    clock, log = Clock(T0), Log()
    client = new_client(port=1, socket_connect_timeout=0.2)
    limiter = RateLimiter(client, prefix=prefix, clock=clock, logger=log)
    limits = Limits(requests_per_minute=3, tokens_per_minute=100)
    decisions = []
    for _ in range(20):  # t = 0 .. 9.5 s; Redis is retried once a second
        decisions.append(await limiter.check("k", limits))
        if decisions[-1].allowed:
            await limiter.add_tokens("k", 10, limits)
        clock.t += 0.5
    assert [d.allowed for d in decisions] == [True] * 3 + [False] * 17
    assert all(d.degraded for d in decisions)
    assert decisions[-1].rule == "requests_per_minute"
    assert len(log.warnings) == 1  # at most once per 10 s
    assert log.warnings[0][1]["policy"] == "fail open to per-process limits"
    clock.t = T0 + 10
    assert (await limiter.check("k", limits)).counts[TOKENS] == 30
    assert len(log.warnings) == 2
    assert log.warnings[1][1]["failures"] == 10  # attempts at t = 1, 2, ..., 10
    await client.aclose()


async def test_deadline_bounds_a_client_with_default_retries(prefix):
    client = aioredis.Redis(host=HOST, port=1, socket_connect_timeout=0.2)  # retries for ~3.7 s
    limiter = RateLimiter(client, prefix=prefix, logger=Log(), timeout_s=0.2)
    started = time.perf_counter()
    decisions = [await limiter.check("k", Limits(requests_per_day=1)) for _ in range(3)]
    assert time.perf_counter() - started < 1.5
    assert [(d.allowed, d.degraded) for d in decisions] == [(True, True), (False, True),
                                                           (False, True)]
    await client.aclose()


async def test_slow_redis_times_out_to_local_limits(prefix):
    async def black_hole(reader, writer):  # accepts, never answers
        await reader.read()
        writer.close()

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = new_client(port=port, socket_timeout=0.05, socket_connect_timeout=0.05)
    limiter = RateLimiter(client, prefix=prefix, logger=Log())
    started = time.perf_counter()
    decision = await limiter.check("k", Limits(requests_per_minute=1))
    assert decision.allowed and decision.degraded
    assert time.perf_counter() - started < 1.0
    assert not (await limiter.check("k", Limits(requests_per_minute=1))).allowed
    await client.aclose()
    server.close()


async def test_local_fallback_starts_from_the_last_counts_seen_in_redis(client, prefix):
    clock, fallback = Clock(T0 + 5), LocalLimiter()
    healthy = RateLimiter(client, prefix=prefix, clock=clock, fallback=fallback, logger=Log(),
                          timeout_s=SLACK)
    limits = Limits(requests_per_minute=5)
    for _ in range(4):
        assert (await healthy.check("k", limits)).allowed
    broken_client = new_client(port=1, socket_connect_timeout=0.2)
    broken = RateLimiter(broken_client, prefix=prefix, clock=clock, fallback=fallback,
                         logger=Log())
    degraded = [await broken.check("k", limits) for _ in range(3)]
    assert [(d.allowed, d.degraded) for d in degraded] == [(True, True), (False, True),
                                                          (False, True)]
    await broken_client.aclose()


async def test_concurrent_checks_share_one_pipeline_and_survive_a_script_flush():
    """Checks from one loop tick go as one pipeline; after SCRIPT FLUSH (a Redis restart) the
    pipelined EVALSHA misses and the scripts load themselves again: decisions stay exact."""
    import uuid

    import redis.asyncio as aioredis

    from fila.adapters.ratelimit import Limits, RateLimiter

    client = aioredis.Redis(host="127.0.0.1", port=6379)
    try:
        limiter = RateLimiter(client, prefix=f"fila:test:{uuid.uuid4().hex}")
        limits = Limits(requests_per_minute=7)
        await client.script_flush()
        decisions = await asyncio.gather(*[limiter.check("k", limits, now=1_000_020.0) for _ in range(30)])
        assert sum(d.allowed for d in decisions) == 7
        assert not any(d.degraded for d in decisions)
    finally:
        await client.aclose()


# --- reserves: slots counted in Redis ahead, served with no round trip ---------------------

def _counting(limiter: RateLimiter) -> list[str]:
    """Record every script call the limiter sends to Redis (direct or coalesced)."""
    calls: list[str] = []
    direct, coalesced = limiter._check_script, limiter._scripts.call

    async def check_script(keys, args):
        calls.append("check")
        return await direct(keys=keys, args=args)

    async def call(script, keys, args):
        calls.append("give back" if script is limiter._give_back_script else "script")
        return await coalesced(script, keys, args)

    limiter._check_script, limiter._scripts.call = check_script, call
    return calls


async def test_a_roomy_key_is_served_from_its_reserve_with_the_counts_of_exact_checks(client, prefix):
    limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=16, reserve_hold_s=60)
    calls = _counting(limiter)
    limits = Limits(requests_per_minute=1000, requests_per_day=10**6)
    remaining = []
    for i in range(1001):
        decision = await limiter.check("k", limits, now=T0)
        remaining.append(decision.remaining_requests if decision.allowed else "refused")
        if i % 5 == 0:
            await asyncio.sleep(0)          # let a refill on its way land, as a server's awaits do
    assert remaining == list(range(999, -1, -1)) + ["refused"]      # what exact checks would say
    assert decision.rule == "requests_per_minute"
    assert int(await client.get(f"{prefix}:{{k}}:m:{int(T0)}")) == 1000    # no slot left over
    assert int(await client.get(f"{prefix}:{{k}}:d:{window_start(T0, 86400)}")) == 1000
    # far from the limit one call in Redis serves many; near it (the last ~10 %) every check goes
    assert len(calls) < 300, Counter(calls)
    await limiter.release()


async def test_reserves_of_two_processes_never_pass_the_limit_and_unused_slots_come_back(prefix):
    a_client, b_client = new_client(), new_client()
    a, b = (RateLimiter(c, prefix=prefix, timeout_s=SLACK, reserve=16, reserve_hold_s=0.05)
            for c in (a_client, b_client))
    limits = Limits(requests_per_minute=1000)
    now = time.time()
    admitted = Counter()
    try:
        for i in range(1400):                  # interleaved bursts from the two "processes"
            limiter = a if (i // 7) % 2 else b
            admitted[limiter is a] += (await limiter.check("shared", limits, now=now)).allowed
        assert sum(admitted.values()) <= 1000
        await asyncio.sleep(0.3)               # past the hold: whatever either kept goes back
        for limiter in (a, b, a, b):
            while (await limiter.check("shared", limits, now=now)).allowed:
                admitted[limiter is a] += 1
        assert sum(admitted.values()) == 1000 and admitted[True] > 0 and admitted[False] > 0
        await asyncio.sleep(0.3)
        assert int(await a_client.get(f"{prefix}:{{shared}}:m:{window_start(now, MINUTE)}")) == 1000
    finally:
        await a.release(), await b.release()
        await a_client.aclose(), await b_client.aclose()


async def test_a_new_window_or_new_limits_drop_the_reserve_and_give_its_slots_back(client, prefix):
    limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=16, reserve_hold_s=60)
    calls = _counting(limiter)
    limits = Limits(requests_per_minute=1000, requests_per_hour=10**5)
    for _ in range(5):
        assert (await limiter.check("k", limits, now=T0)).allowed
    assert calls.count("check") == 2            # the first learns the counts, the second takes a reserve
    decision = await limiter.check("k", limits, now=T0 + MINUTE)        # next minute, same hour
    assert decision.allowed and decision.counts["requests_per_minute"] == 1
    await asyncio.sleep(0.1)
    assert "give back" in calls
    hour = f"{prefix}:{{k}}:h:{window_start(T0, HOUR)}"
    reserved = int(await client.get(hour)) - 6          # the new minute's reserve, if it took one
    assert 0 <= reserved <= 16
    bigger = Limits(requests_per_minute=2000, requests_per_hour=10**5)      # the plan changed
    assert (await limiter.check("k", bigger, now=T0 + MINUTE)).allowed
    await limiter.release()
    assert int(await client.get(hour)) == 7            # every request counted once, no slot kept


async def test_a_reserve_is_not_taken_near_a_limit_or_for_small_limits(client, prefix):
    limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=16, reserve_hold_s=60)
    small = Limits(requests_per_minute=60)                  # 60 // 50 < 2: never
    for _ in range(30):
        await limiter.check("small", small, now=T0)
    assert not limiter._reserves and int(await client.get(f"{prefix}:{{small}}:m:{int(T0)}")) == 30
    await client.set(f"{prefix}:{{near}}:m:{int(T0)}", 890, ex=120)      # 110 left of 1000
    near = Limits(requests_per_minute=1000)
    for _ in range(3):
        await limiter.check("near", near, now=T0)
    assert "near" not in limiter._reserves       # 109 left: not above a tenth (100) + the reserve (16)
    assert int(await client.get(f"{prefix}:{{near}}:m:{int(T0)}")) == 893


async def test_a_reserve_defers_to_redis_once_this_process_saw_the_token_limit_reached(client, prefix):
    limiter = RateLimiter(client, prefix=prefix, timeout_s=SLACK, reserve=16, reserve_hold_s=60)
    limits = Limits(requests_per_minute=1000, tokens_per_minute=5000)
    for _ in range(3):
        assert (await limiter.check("k", limits, now=T0)).allowed
    assert limiter._reserves["k"].left > 0
    await limiter.add_tokens("k", 5000, limits, now=T0)
    refused = await limiter.check("k", limits, now=T0)
    assert not refused.allowed and refused.rule == TOKENS
    await limiter.release()
