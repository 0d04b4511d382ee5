"""The cache's storage: a bounded in-process LRU, and the shared store (Redis) behind a port.

``MemoryLRU`` holds values for one process, bounded by the bytes of what it stores (plus a
fixed overhead per entry); expired entries are dropped when read, the least recently used
when the budget is exceeded. It is touched only from the event loop's thread.

``SharedStore`` is the port the cache service uses for what processes share; ``RedisStore``
implements it. Every call either answers or raises ``StoreUnavailable``: a Redis error or
timeout (the client fails fast: 0.25 s socket timeout, no retries) trips a back-off during
which calls fail at once without touching the network, so a dead or slow Redis costs a
request nothing after the first failure. After the back-off the next call tries again; the
first success closes it. Warnings are logged at most every ``warn_every_s`` seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger("fila.cache")

ENTRY_OVERHEAD = 200   # bytes counted per entry beyond its body (key, tuple, Struct)


class Stored(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A cached answer: the body as first served, the entry that filled it, its usage, its expiry."""

    body: bytes
    source: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    expires_at: float    # wall-clock seconds


encode_stored = msgspec.msgpack.Encoder().encode
decode_stored = msgspec.msgpack.Decoder(Stored).decode


class StoreUnavailable(Exception):
    """The shared store did not answer (or is being skipped during a back-off)."""


class MemoryLRU:
    """An LRU bounded by bytes; ``clock`` gives wall-clock seconds (a fake one in tests)."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        if item[2] <= self.clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: str, value: Any, size: int, expires_at: float) -> bool:
        size += ENTRY_OVERHEAD + len(key)
        if size > self.max_bytes:
            self.delete(key)
            return False
        self.delete(key)
        self._data[key] = (value, size, expires_at)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old, _) = self._data.popitem(last=False)
            self.bytes -= old
        return True

    def delete(self, key: str) -> bool:
        if key in self._data:
            self._drop(key)
            return True
        return False

    def delete_prefix(self, prefix: str) -> int:
        doomed = [key for key in self._data if key.startswith(prefix)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        _, size, _ = self._data.pop(key)
        self.bytes -= size


class SharedStore(Protocol):
    """What processes share (Redis). Every method raises ``StoreUnavailable`` when it cannot answer."""

    @property
    def available(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None: ...

    async def delete(self, *keys: str) -> int: ...

    async def acquire(self, key: str, token: str, ttl_ms: int) -> bool: ...

    async def release(self, key: str, token: str) -> None: ...

    async def get_with_lock(self, key: str, lock_key: str) -> tuple[bytes | None, bool]: ...

    async def append(self, key: str, values: list[bytes], keep: int, ttl_ms: int) -> None: ...

    async def read_list(self, key: str) -> list[bytes] | None: ...

    async def delete_matching(self, pattern: str) -> int: ...


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisStore:
    """``SharedStore`` on a redis.asyncio client, with a back-off while Redis is failing."""

    def __init__(self, redis: Any, *, backoff_s: float = 1.0, warn_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.backoff_s = backoff_s
        self.warn_every_s = warn_every_s
        self.clock = clock
        self.failures = 0
        self._down_until = 0.0
        self._down = False
        self._warned_at = -1e18
        self._release = redis.register_script(_RELEASE)

    @property
    def available(self) -> bool:
        return self.clock() >= self._down_until

    def _check(self) -> None:
        if self._down_until and self.clock() < self._down_until:
            raise StoreUnavailable("redis is being skipped after a failure")

    def _failed(self, error: BaseException) -> StoreUnavailable:
        now = self.clock()
        self.failures += 1
        self._down_until = now + self.backoff_s
        self._down = True
        if now - self._warned_at >= self.warn_every_s:
            self._warned_at = now
            log.warning("cache_redis_degraded", error=type(error).__name__, backoff_s=self.backoff_s,
                        failures=self.failures)
        return StoreUnavailable(type(error).__name__)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            self._down_until = 0.0
            log.warning("cache_redis_recovered", failures=self.failures)

    async def get(self, key: str) -> bytes | None:
        self._check()
        try:
            value = await self.redis.get(key)
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        if self._down:
            self._ok()
        return value

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        self._check()
        try:
            await self.redis.set(key, value, px=max(1, ttl_ms))
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()

    async def delete(self, *keys: str) -> int:
        self._check()
        try:
            count = await self.redis.delete(*keys) if keys else 0
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()
        return int(count)

    async def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        self._check()
        try:
            got = await self.redis.set(key, token, nx=True, px=max(1, ttl_ms))
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()
        return bool(got)

    async def release(self, key: str, token: str) -> None:
        self._check()
        try:
            await self._release(keys=[key], args=[token])
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()

    async def get_with_lock(self, key: str, lock_key: str) -> tuple[bytes | None, bool]:
        """The value at ``key``, and whether ``lock_key`` is still held (one round trip)."""
        self._check()
        try:
            value, lock = await self.redis.mget(key, lock_key)
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()
        return value, lock is not None

    async def append(self, key: str, values: list[bytes], keep: int, ttl_ms: int) -> None:
        """Push ``values`` at the end of a list atomically, keep its last ``keep``, reset its TTL."""
        self._check()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *values)
                pipe.ltrim(key, -keep, -1)
                pipe.pexpire(key, max(1, ttl_ms))
                await pipe.execute()
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()

    async def read_list(self, key: str) -> list[bytes] | None:
        self._check()
        try:
            values = await self.redis.lrange(key, 0, -1)
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()
        return values or None

    async def delete_matching(self, pattern: str) -> int:
        """SCAN for ``pattern`` and UNLINK what it finds (an admin action, not the hot path)."""
        self._check()
        deleted = 0
        try:
            batch: list[Any] = []
            async for key in self.redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += await self.redis.unlink(*batch)
        except (RedisError, OSError) as error:
            raise self._failed(error) from None
        self._ok()
        return int(deleted)
