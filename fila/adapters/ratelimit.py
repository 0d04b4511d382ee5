"""Per-API-key rate limits in Redis, exact across any number of gateway processes.

Fixed windows aligned to the epoch: minute, hour, UTC day (``window_start(t, 86400)`` is UTC
midnight; Unix time has no leap seconds). Why fixed windows: a window is one integer counter, so
a check is exact (one atomic Lua script reads and bumps all of a key's counters) with O(1)
memory per key and window. The known cost: a client may spend a window's quota just before a
boundary and again just after it, a burst of up to 2x the limit within one window's length.

``check`` refuses if a request window is full or this minute's tokens already reached
``tokens_per_minute``; a refusal consumes nothing. Tokens are known only once the upstream
answers, so ``add_tokens`` adds them afterwards: a token limit refuses the *next* request once
the minute's tokens reach it. Windows follow the gateway's clock (keep hosts NTP-synced). Keys
``{prefix}:{{key_id}}:{m|h|d|t}:{window_start}`` share a Redis Cluster slot via the hash tag.

Failure policy: fail open to per-process limits. If Redis errors or is slow, an in-process
``LocalLimiter`` decides (same windows; exact per process, approximate across processes: N
processes may admit up to N times the remaining quota), with ``degraded=True``; a warning is
logged at most every 10 s; nothing is raised. After a failure Redis is skipped for
``REDIS_RETRY_S``. The local limiter is seeded with the counts each Redis answer shows, so an
outage starts from the last known usage; what it admits is not in Redis: ``rebuild`` after.

Expected client: ``redis.asyncio.Redis(..., socket_timeout=0.05, socket_connect_timeout=0.1,
retry=Retry(NoBackoff(), 0))``; redis-py's default retries took 3.7 s to fail on a closed port.
``timeout_s`` (default 0.25 s, ~5 us per call) is a backstop deadline. A timed-out script may
still have counted its request: slowness can over-count, never under-count.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoScriptError, RedisError

MINUTE, HOUR, DAY = 60, 3600, 86400
TOKENS = "tokens_per_minute"
TTL_MARGIN_S = 5  # counters outlive their window a little, so clock skew never resets one early
WARN_EVERY_S = 10.0
REDIS_RETRY_S = 1.0
ROOMY_MIN = 20  # see RateLimiter.roomy
RESERVE_MAX = 64       # slots one process may hold for one key (see RateLimiter, "Reserves")
RESERVE_SHARE = 50     # ... and at most 1/50 of the key's smallest request limit
RESERVE_HOLD_S = 1.0   # unused slots go back to Redis after this long without a request
TOKENS_FLUSH_S = 0.01  # finished requests' tokens are summed this long before they go to Redis
# rule -> (window seconds, key code); request rules shortest window first
_WINDOWS = {"requests_per_minute": (MINUTE, "m"), "requests_per_hour": (HOUR, "h"),
            "requests_per_day": (DAY, "d"), TOKENS: (MINUTE, "t")}

# The requests for one key that arrive in one event-loop tick are checked together, as if one
# after the other: KEYS[1..n]: request counters, KEYS[n+1] (optional): this minute's token
# counter. ARGV[1] = m requests, ARGV[2] = n, ARGV[2+i] = TTL of KEYS[i] (i <= n),
# ARGV[2+n+i] = limit of KEYS[i]. The first ``allowed`` of the m are admitted (every request
# counter goes up by ``allowed``), the rest refused; a full token counter refuses them all.
# Returns {allowed, counter values before}.
_CHECK_LUA = """
local m, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local before, allowed = {}, m
for i = 1, #KEYS do
  before[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local room = tonumber(ARGV[2 + n + i]) - before[i]
  if i > n and room > 0 then room = m end
  if room < allowed then allowed = math.max(room, 0) end
end
if allowed > 0 then
  for i = 1, n do
    if redis.call('INCRBY', KEYS[i], allowed) == allowed then redis.call('EXPIRE', KEYS[i], ARGV[2 + i]) end
  end
end
return {allowed, unpack(before)}
"""
# Unused reserved slots go back: every request counter of the reserve down by ARGV[1] (never
# below zero; a counter already gone with its window stays gone).
_GIVE_BACK_LUA = """
for i = 1, #KEYS do
  local n = math.min(tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[i]) or '0'))
  if n > 0 then redis.call('DECRBY', KEYS[i], n) end
end
"""
_ADD_TOKENS_LUA = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
"""


def window_start(now: float, seconds: int) -> int:
    """Start (epoch seconds) of the epoch-aligned window of ``seconds`` containing ``now``."""
    return int(now // seconds) * seconds


def reset_after(now: float, seconds: int) -> float:
    """Seconds until the window containing ``now`` ends; always in (0, seconds]."""
    return window_start(now, seconds) + seconds - now


def _ttl(now: float, seconds: int) -> int:
    return math.ceil(reset_after(now, seconds)) + TTL_MARGIN_S


def format_duration(seconds: float) -> str:
    """Go ``time.Duration`` style, as OpenAI's reset headers: "500ms", "59.5s", "1h0m0s"."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    if ms < 60_000:                      # the usual case (a minute window): no hours or minutes
        secs, ms = divmod(ms, 1000)
        return f"{secs}.{ms:03d}".rstrip("0") + "s" if ms else f"{secs}s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    s = f"{secs}.{ms:03d}".rstrip("0") if ms else str(secs)
    return (f"{hours}h{minutes}m" if hours else f"{minutes}m" if minutes else "") + f"{s}s"


@dataclass(frozen=True)
class Limits:
    """A key's limits; None means unlimited."""

    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    # Derived once, not fields: (rule, limit, seconds, key code) of each limited rule, request
    # rules first (``windows``), and of the request rules alone (``rules``).
    windows: ClassVar[tuple[tuple[str, int, int, str], ...]]
    rules: ClassVar[tuple[tuple[str, int, int, str], ...]]

    def __post_init__(self) -> None:
        for name in _WINDOWS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, not {value!r}")
        windows = tuple((name, getattr(self, name), seconds, code) for name, (seconds, code)
                        in _WINDOWS.items() if getattr(self, name) is not None)
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "rules", tuple(w for w in windows if w[0] != TOKENS))


@dataclass(frozen=True)
class Decision:
    """``*_requests`` describe the tightest request rule (least remaining, then latest reset);
    ``rule`` is the refusing rule that resets last (so ``retry_after_s`` is when a retry can
    succeed); ``counts`` are the counters seen (after the increment when admitted)."""

    allowed: bool
    rule: str | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    degraded: bool = False

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers; ``Retry-After`` (ceil seconds, >= 1) if refused."""
        h: dict[str, str] = {}
        for kind, limit, remaining, reset in (
                ("requests", self.limit_requests, self.remaining_requests, self.reset_requests_s),
                ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s)):
            if limit is not None:
                h[f"x-ratelimit-limit-{kind}"] = str(limit)
                h[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                h[f"x-ratelimit-reset-{kind}"] = format_duration(reset or 0.0)
        if not self.allowed and self.retry_after_s is not None:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return h


def _decide(limits: Limits, counts: dict[str, int], allowed: bool, now: float,
            degraded: bool) -> Decision:
    blocking = []  # (reset, rule) of the full windows, when refused
    requests = tokens = (None, None, None)  # (limit, remaining, reset)
    for name, limit, seconds, _ in limits.windows:
        state = (limit, max(0, limit - counts[name]), (now // seconds + 1) * seconds - now)  # reset_after
        if name == TOKENS:
            tokens = state
        elif requests[0] is None or (state[1], -state[2]) < (requests[1], -requests[2]):
            requests = state
        if not allowed and counts[name] >= limit:
            blocking.append((state[2], name))
    retry_after, rule = max(blocking) if blocking else (None, None)
    return Decision(allowed, rule, *requests, *tokens, retry_after, counts, degraded)


class LocalLimiter:
    """In-process fixed windows with the Redis script's semantics: exact within one process.
    Memory: one (window_start, count) slot per key and rule; a new window replaces the old."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._slots: dict[str, dict[str, list[int]]] = {}  # key_id -> rule -> [start, count]

    @staticmethod
    def _count(slots: dict[str, list[int]], rule: str, start: int) -> int:
        slot = slots.get(rule)
        return slot[1] if slot is not None and slot[0] == start else 0

    def check(self, key_id: str, limits: Limits, *, now: float | None = None,
              degraded: bool = False) -> Decision:
        now = self._clock() if now is None else now
        slots = self._slots.setdefault(key_id, {})
        counts = {name: self._count(slots, name, window_start(now, seconds))
                  for name, _, seconds, _ in limits.windows}
        allowed = all(counts[name] < limit for name, limit, _, _ in limits.windows)
        if allowed:
            for name, _, seconds, _ in limits.rules:
                counts[name] += 1
                slots[name] = [window_start(now, seconds), counts[name]]
        return _decide(limits, counts, allowed, now, degraded)

    def seen(self, key_id: str, rule: str, start: int) -> int | None:
        """The count last known for this window, or None if this window was never seen."""
        slot = self._slots.get(key_id, {}).get(rule)
        return slot[1] if slot is not None and slot[0] == start else None

    def add_tokens(self, key_id: str, tokens: int, *, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        slots = self._slots.setdefault(key_id, {})
        start = window_start(now, MINUTE)
        slots[TOKENS] = [start, self._count(slots, TOKENS, start) + tokens]

    def observe(self, key_id: str, counts: dict[str, int], *, now: float) -> None:
        """Adopt counts seen elsewhere (in Redis) where they exceed the local ones."""
        slots = self._slots.setdefault(key_id, {})
        for name, count in counts.items():
            start = window_start(now, _WINDOWS[name][0])
            slot = slots.get(name)
            if slot is None or start > slot[0] or (start == slot[0] and count > slot[1]):  # a 0 seen is seen
                slots[name] = [start, count]


@dataclass(eq=False)
class _Reserve:
    """Request slots already counted in Redis for one key, held by this process: a request
    taking one is admitted without a round trip. ``counts`` are the request counters just
    after the slots were taken, so a request's counts are ``counts - left`` (what a check in
    Redis would have shown had nobody else used the key meanwhile)."""

    key_id: str
    limits: Limits
    keys: list[str]              # the request counters the slots were taken from
    since: float                 # the reserve holds while every window it counted in is current:
    until: float                 # since <= now < until
    counts: dict[str, int]
    size: int                    # slots asked for per refill
    left: int = 0
    used_at: float = 0.0         # loop time of the last request served
    # while a script call asking for its slots is on its way: resolved when its answer is in
    landed: asyncio.Future | None = None
    taken_at: float = 0.0        # the limiter's clock when it was taken


class _Coalescer:
    """Script calls made in the same event-loop tick go to Redis as one pipeline: one round trip
    and far less client CPU per call under load; a lone call goes as it is."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: list[tuple[Any, list, list, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def call(self, script: Any, keys: list, args: list) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((script, keys, args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, list, list, asyncio.Future]]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                results: list[Any] = [await script(keys=keys, args=args)]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                for index, result in enumerate(results):
                    if isinstance(result, NoScriptError):   # Redis restarted: the script loads itself
                        script, keys, args, _ = batch[index]
                        results[index] = await script(keys=keys, args=args)
        except (RedisError, OSError) as error:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (*_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class RateLimiter:
    """Redis-backed limiter. A check made while no other is on its way to Redis is sent at once.
    Otherwise it joins the batch of its event-loop tick: the checks of one tick for the same
    counters are one script call (admitted in order up to what is left, the rest refused), and
    the calls of one tick share one pipeline. Under load a hot key costs Redis one call per
    tick, not one per request; at light load a check is one round trip with no wait.

    Reserves: while a key is far from every limit (as ``roomy``, with the reserve's size on top),
    a check that goes to Redis also takes up to ``reserve`` more request slots for this process
    (at most 1/50 of the key's smallest request limit), counted in Redis like admitted requests.
    The key's next requests here take one each with no round trip, and a refill goes out in the
    background when half are used. The limit stays exact upwards: every admitted request was
    counted in Redis before it was admitted. The price is downwards: while a process holds
    unused slots, another process may be refused although the limit is not reached. It holds at
    most ``reserve`` slots per key, only while the key is roomy, and gives the unused ones back
    after ``reserve_hold_s`` without a request, when a window or the plan's limits change, or at
    shutdown. A token limit is seen by a reserve's requests as this process last saw it (its own
    tokens, and everyone's at the last refill); near the limit the check goes to Redis."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "fila:rl",
                 clock: Callable[[], float] = time.time, fallback: LocalLimiter | None = None,
                 logger: Any = None, timeout_s: float = 0.25, reserve: int = RESERVE_MAX,
                 reserve_hold_s: float = RESERVE_HOLD_S, tokens_flush_s: float = TOKENS_FLUSH_S) -> None:
        self._redis, self._prefix, self._clock, self._timeout_s = redis, prefix, clock, timeout_s
        self._reserve_max, self._reserve_hold_s, self._tokens_flush_s = reserve, reserve_hold_s, tokens_flush_s
        self._reserves: dict[str, _Reserve] = {}
        self._give_back_script = redis.register_script(_GIVE_BACK_LUA)
        self._fallback = fallback if fallback is not None else LocalLimiter(clock)
        self._log = logger if logger is not None else structlog.get_logger()
        self._check_script = redis.register_script(_CHECK_LUA)  # sha computed locally, no I/O
        self._tokens_script = redis.register_script(_ADD_TOKENS_LUA)
        self._scripts = _Coalescer(redis)
        self._skip_redis_until, self._next_warning_at, self._failures = 0.0, 0.0, 0
        self._asks: dict[tuple[tuple, tuple], list[asyncio.Future]] = {}   # this tick's checks
        self._pending: dict[str, int] = {}                  # key -> checks awaiting Redis
        self._sending = 0                                   # check calls on their way to Redis
        self._owed: dict[str, list[int]] = {}               # tokens waiting for this tick's flush
        self._owed_flushed: asyncio.Future | None = None
        self._owed_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task] = set()

    def _redis_skipped(self) -> bool:  # reads the clock only while Redis is failing
        return bool(self._skip_redis_until) and self._clock() < self._skip_redis_until

    def _redis_failed(self, exc: BaseException) -> None:
        now = self._clock()
        self._skip_redis_until = now + REDIS_RETRY_S
        self._failures += 1
        if now >= self._next_warning_at:
            self._log.warning("ratelimit.redis_unavailable", error=repr(exc),
                              failures=self._failures, policy="fail open to per-process limits")
            self._next_warning_at, self._failures = now + WARN_EVERY_S, 0

    def roomy(self, key_id: str, limits: Limits, *, now: float | None = None, extra: int = 0) -> bool:
        """Whether this process's last answer from Redis showed every window of ``key_id`` far
        from full: more than a tenth of the limit (and ``ROOMY_MIN``) left beyond the checks
        still in flight. Then a refusal is unlikely enough that the gateway may call the
        upstream while the check is on its way (the check still decides, exactly)."""
        if not limits.windows or self._redis_skipped():
            return False
        now = self._clock() if now is None else now
        pending = self._pending.get(key_id, 0) + extra
        for name, limit, seconds, _ in limits.windows:
            count = self._fallback.seen(key_id, name, window_start(now, seconds))
            if count is None or limit - count - pending <= max(ROOMY_MIN, limit // 10):
                return False
        return True

    def reserved(self, key_id: str) -> bool:
        """Whether this process holds slots for ``key_id``: its next check needs no round trip."""
        reserve = self._reserves.get(key_id)
        return reserve is not None and reserve.left > 0

    async def check(self, key_id: str, limits: Limits, *, now: float | None = None) -> Decision:
        """Admit or refuse one request for ``key_id``; never raises for Redis trouble."""
        self._pending[key_id] = self._pending.get(key_id, 0) + 1
        try:
            return await self._check(key_id, limits, now)
        finally:
            left = self._pending[key_id] - 1
            if left:
                self._pending[key_id] = left
            else:
                del self._pending[key_id]

    async def _check(self, key_id: str, limits: Limits, now: float | None) -> Decision:
        now = self._clock() if now is None else now
        windows = limits.windows
        if not windows:
            return Decision(allowed=True)
        reserve = self._reserves.get(key_id)
        if reserve is not None:
            if not reserve.left and reserve.landed is not None:    # slots on their way: wait for them
                await asyncio.shield(reserve.landed)                # rather than a round trip of our own
                reserve = self._reserves.get(key_id)
            if reserve is not None and reserve.left:
                decision = self._from_reserve(key_id, reserve, limits, now)
                if decision is not None:
                    return decision
        if self._redis_skipped():
            return self._fallback.check(key_id, limits, now=now, degraded=True)
        keys, args = self._call_args(key_id, limits, now)
        taking = self._take_reserve(key_id, limits, keys, now) if key_id not in self._reserves else None
        extra = taking.size if taking is not None else 0
        try:
            if self._sending or self._asks:      # checks on their way: join the next batch (its deadline)
                place, reply = await self._ask((tuple(keys), tuple(args)), taking)
            else:                                # idle: this one goes now, no tick waited
                self._sending += 1
                try:
                    async with asyncio.timeout(self._timeout_s):
                        place, reply = 0, await self._check_script(keys=keys, args=[1 + extra, *args])
                finally:
                    self._sending -= 1
                if taking is not None:
                    self._stock(taking, reply, 1, now)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError, ConnectionError
            self._redis_failed(exc)
            return self._fallback.check(key_id, limits, now=now, degraded=True)
        finally:
            if taking is not None and taking.landed is not None:   # its call failed or was abandoned: no slots
                self._stock(taking, None, 0, now)
        self._skip_redis_until = 0.0
        allowed, before, n = int(reply[0]), reply[1:], len(limits.rules)
        admitted = place < allowed
        seen = place + 1 if admitted else allowed      # this request's place among the tick's
        counts = {window[0]: int(count) + (seen if i < n else 0)
                  for i, (window, count) in enumerate(zip(windows, before))}
        self._fallback.observe(key_id, counts, now=now)
        return _decide(limits, counts, admitted, now, False)

    def _call_args(self, key_id: str, limits: Limits, now: float) -> tuple[list[str], list[int]]:
        """The check script's counters and arguments (without ARGV[1], the number asked for)."""
        base = f"{self._prefix}:{{{key_id}}}:"
        keys = [f"{base}{code}:{int(now // seconds) * seconds}" for _, _, seconds, code in limits.windows]
        args = [len(limits.rules), *(_ttl(now, seconds) for _, _, seconds, _ in limits.rules),
                *(limit for _, limit, _, _ in limits.windows)]
        return keys, args

    # -- reserves (see the class docstring) ----------------------------------------------------

    def _reserve_size(self, key_id: str, limits: Limits, now: float) -> int:
        if not self._reserve_max or not limits.rules:
            return 0
        size = min(self._reserve_max, min(limit for _, limit, _, _ in limits.rules) // RESERVE_SHARE)
        return size if size >= 2 and self.roomy(key_id, limits, now=now, extra=size) else 0

    def _take_reserve(self, key_id: str, limits: Limits, keys: list[str], now: float) -> _Reserve | None:
        """A new, empty reserve for ``key_id`` if the key is roomy; the caller's script call asks
        for its slots on top of its own requests, and ``_stock`` fills it with the answer."""
        size = self._reserve_size(key_id, limits, now)
        if not size:
            return None
        loop = asyncio.get_running_loop()
        starts = [(window_start(now, seconds), seconds) for _, _, seconds, _ in limits.rules]
        reserve = _Reserve(key_id, limits, keys[:len(limits.rules)], max(start for start, _ in starts),
                           min(start + seconds for start, seconds in starts), {}, size,
                           used_at=loop.time(), landed=loop.create_future(), taken_at=now)
        self._reserves[key_id] = reserve
        loop.call_later(self._reserve_hold_s, self._expire, key_id, reserve)
        return reserve

    def _stock(self, reserve: _Reserve, reply: list | None, requests: int, now: float) -> None:
        """Put the slots a script call granted beyond its ``requests`` into ``reserve`` (a failed
        call, ``reply=None``, grants none)."""
        key_id, limits = reserve.key_id, reserve.limits
        if reserve.landed is not None:
            if not reserve.landed.done():
                reserve.landed.set_result(None)
            reserve.landed = None
        granted = 0
        if reply is not None:
            allowed = int(reply[0])
            granted = max(0, allowed - requests)
            after = {name: int(count) + allowed for (name, *_), count in zip(limits.rules, reply[1:])}
            self._fallback.observe(key_id, after, now=now)
        if self._reserves.get(key_id) is not reserve or not self._same_windows(reserve, now):
            self._give_back(reserve.keys, granted)   # dropped or stale meanwhile: the slots go back
            return
        if granted:
            reserve.counts = after
            reserve.left += granted
        if not reserve.left:
            del self._reserves[key_id]

    @staticmethod
    def _same_windows(reserve: _Reserve, now: float) -> bool:
        return reserve.since <= now < reserve.until

    def _from_reserve(self, key_id: str, reserve: _Reserve, limits: Limits, now: float) -> Decision | None:
        """Admit from the reserve, or None: the check must go to Redis."""
        if (reserve.limits is not limits and reserve.limits != limits) or not self._same_windows(reserve, now):
            self._drop(key_id)
            return None
        counts: dict[str, int] = {}
        if limits.tokens_per_minute is not None:
            counts[TOKENS] = self._fallback.seen(key_id, TOKENS, window_start(now, MINUTE)) or 0
            if counts[TOKENS] >= limits.tokens_per_minute:
                return None      # Redis has the last word, and names the rule
        reserve.left -= 1
        loop = asyncio.get_running_loop()
        reserve.used_at = loop.time()
        for name, _, _, _ in limits.rules:
            counts[name] = reserve.counts[name] - reserve.left
        if reserve.left * 2 <= reserve.size and reserve.landed is None:
            size = 0 if self._redis_skipped() else self._reserve_size(key_id, limits, now)
            if size:
                reserve.landed = loop.create_future()
                self._spawn(self._refill(reserve, size, now))
            elif not reserve.left:         # spent, and no more to take: the next check goes to Redis
                del self._reserves[key_id]
        return _decide(limits, counts, True, now, False)

    async def _refill(self, reserve: _Reserve, size: int, now: float) -> None:
        keys, args = self._call_args(reserve.key_id, reserve.limits, now)
        reply = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._scripts.call(self._check_script, keys, [size, *args])
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
        finally:
            self._stock(reserve, reply, 0, now)

    def _expire(self, key_id: str, reserve: _Reserve) -> None:
        if self._reserves.get(key_id) is not reserve:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - reserve.used_at
        if idle >= self._reserve_hold_s and reserve.landed is None:
            self._drop(key_id)
        else:
            loop.call_later(max(self._reserve_hold_s - idle, 0.01), self._expire, key_id, reserve)

    def _drop(self, key_id: str) -> None:
        reserve = self._reserves.pop(key_id, None)
        if reserve is not None and reserve.left:
            self._give_back(reserve.keys, reserve.left)
            reserve.left = 0

    def _give_back(self, keys: list[str], slots: int) -> None:
        if slots > 0:
            self._spawn(self._send_give_back(keys, slots))

    async def _send_give_back(self, keys: list[str], slots: int) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._scripts.call(self._give_back_script, keys, [slots])
        except (RedisError, OSError) as exc:   # the slots stay counted until their windows end
            self._redis_failed(exc)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def release(self) -> None:
        """On shutdown: send the tokens owed and give every unused reserved slot back, and wait
        for Redis to take them."""
        if self._owed_timer is not None:
            self._owed_timer.cancel()
            self._flush_owed()
        for key_id in list(self._reserves):
            self._drop(key_id)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _ask(self, group: tuple[tuple, tuple], reserve: _Reserve | None = None) -> asyncio.Future:
        """Join this tick's checks of the same counters; resolves to (place, script reply). A
        ``reserve`` being taken rides on the group's call (one per group)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._asks.get(group)
        if waiting is None:
            self._asks[group] = waiting = [[], None]
            if len(self._asks) == 1:
                loop.call_soon(self._flush_asks)
        waiting[0].append(future)
        if reserve is not None:     # at most one per group: one reserve per key at a time
            waiting[1] = reserve
        return future

    def _flush_asks(self) -> None:
        asks, self._asks = self._asks, {}
        self._spawn(self._send_asks(asks))

    async def _send_asks(self, asks: dict[tuple[tuple, tuple], list]) -> None:
        groups = list(asks.items())
        self._sending += 1
        try:
            async with asyncio.timeout(self._timeout_s):     # one deadline for the whole batch
                replies = await asyncio.gather(
                    *(self._scripts.call(self._check_script, list(keys),
                                         [len(futures) + (reserve.size if reserve is not None else 0), *args])
                      for (keys, args), (futures, reserve) in groups), return_exceptions=True)
        except TimeoutError as exc:
            replies = [exc] * len(groups)
        except BaseException:   # cancelled (shutdown): nobody is left waiting for an answer
            for _, (futures, reserve) in groups:
                if reserve is not None:
                    self._stock(reserve, None, 0, reserve.taken_at)
                for future in futures:
                    if not future.done():
                        future.set_exception(RedisError("the check was abandoned"))
            raise
        finally:
            self._sending -= 1
        for (_, (futures, reserve)), reply in zip(groups, replies):
            if reserve is not None:
                self._stock(reserve, None if isinstance(reply, BaseException) else reply, len(futures),
                            reserve.taken_at)
            for place, future in enumerate(futures):
                if future.done():          # its caller gave up waiting
                    continue
                if isinstance(reply, BaseException):
                    future.set_exception(reply)
                else:
                    future.set_result((place, reply))

    async def add_tokens(self, key_id: str, tokens: int, limits: Limits, *,
                         now: float | None = None) -> None:
        """Add a finished request's tokens to this minute's counter (a no-op without a token
        limit) and wait until Redis has them; never raises for Redis trouble."""
        flushed = self.count_tokens(key_id, tokens, limits, now=now)
        if flushed is not None:
            await flushed           # the flush has the deadline, and reports a failure itself

    def count_tokens(self, key_id: str, tokens: int, limits: Limits, *,
                     now: float | None = None) -> asyncio.Future | None:
        """``add_tokens`` without waiting: the tokens join the next flush (``tokens_flush_s``
        from the first tokens owed), whose future is returned (None when nothing goes to
        Redis). This process's own checks see them at once; other processes, after the flush.
        Must run on the event loop."""
        if limits.tokens_per_minute is None or tokens <= 0:
            return None
        now = self._clock() if now is None else now
        self._fallback.add_tokens(key_id, tokens, now=now)
        if self._redis_skipped():
            return None
        key = f"{self._prefix}:{{{key_id}}}:t:{window_start(now, MINUTE)}"
        owed = self._owed.get(key)
        if owed is None:
            self._owed[key] = [tokens, _ttl(now, MINUTE)]
        else:
            owed[0] += tokens
        flushed = self._owed_flushed
        if flushed is None:
            loop = asyncio.get_running_loop()
            flushed = self._owed_flushed = loop.create_future()
            self._owed_timer = loop.call_later(self._tokens_flush_s, self._flush_owed)
        return flushed

    def _flush_owed(self) -> None:
        """The tokens added since the last flush, summed per counter: one INCRBY per key
        however many requests finished meanwhile (a group commit releases dozens at once)."""
        owed, flushed = self._owed, self._owed_flushed
        self._owed, self._owed_flushed, self._owed_timer = {}, None, None
        if flushed is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_owed(owed, flushed))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_owed(self, owed: dict[str, list[int]], flushed: asyncio.Future) -> None:
        calls = [self._scripts.call(self._tokens_script, [key], [tokens, ttl]) for key, (tokens, ttl) in owed.items()]
        try:
            async with asyncio.timeout(self._timeout_s):
                if len(calls) == 1:      # the usual case: one busy key
                    try:
                        results = [await calls[0]]
                    except (RedisError, OSError) as exc:
                        results = [exc]
                else:
                    results = await asyncio.gather(*calls, return_exceptions=True)
        except TimeoutError as exc:
            results = [exc]
        except BaseException:
            if not flushed.done():
                flushed.set_result(RedisError("the token count was abandoned"))
            raise
        failure = next((r for r in results if isinstance(r, (RedisError, OSError))), None)
        if failure is not None:
            self._redis_failed(failure)
        if not flushed.done():
            flushed.set_result(failure)

    async def rebuild(self, key_id: str, events: Iterable[tuple[float, int]], limits: Limits,
                      *, now: float | None = None) -> dict[str, int]:
        """Recompute the current windows' counters from accepted requests ``(timestamp,
        tokens)`` (from the event log) and SET them in one MULTI; returns the counts. Unlike
        ``check`` this raises ``RedisError``: it is a recovery step whose caller must know if it
        failed. Requests admitted between reading the log and the SET are overwritten, so run
        it before the key takes traffic again, or accept that slack."""
        now = self._clock() if now is None else now
        counts = {name: 0 for name, _, _, _ in limits.windows}
        starts = {name: window_start(now, seconds) for name, _, seconds, _ in limits.windows}
        for at, tokens in events:
            for name, start in starts.items():
                if start <= at <= now:
                    counts[name] += tokens if name == TOKENS else 1
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, _, seconds, code in limits.windows:
                pipe.set(f"{self._prefix}:{{{key_id}}}:{code}:{starts[name]}", counts[name],
                         ex=_ttl(now, seconds))
            await pipe.execute()
        self._fallback.observe(key_id, counts, now=now)
        return counts
