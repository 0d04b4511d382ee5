"""The in-process LRU: bounded by the bytes it stores, least recently used out first, expiry by
an injected clock; and the degradation gate of the Redis store, on a Redis that never answers."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from fila.adapters.cache_store import ENTRY_OVERHEAD, MemoryLRU, RedisStore, Stored, StoreUnavailable, \
    decode_stored, encode_stored


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def entry_size(key: str, body: int) -> int:
    return body + ENTRY_OVERHEAD + len(key)


def test_the_budget_counts_stored_bytes_and_evicts_the_least_recently_used():
    clock = Clock()
    lru = MemoryLRU(max_bytes=3 * entry_size("k1", 1000), clock=clock)
    for key in ("k1", "k2", "k3"):
        assert lru.put(key, key.upper(), 1000, expires_at=clock.t + 60)
    assert lru.bytes == 3 * entry_size("k1", 1000) and len(lru) == 3
    assert lru.get("k1") == "K1"          # k1 is now the most recently used
    lru.put("k4", "K4", 1000, expires_at=clock.t + 60)
    assert lru.get("k2") is None           # the least recently used went
    assert [lru.get(k) for k in ("k1", "k3", "k4")] == ["K1", "K3", "K4"]
    assert lru.bytes <= lru.max_bytes


def test_a_value_larger_than_the_whole_budget_is_not_kept():
    lru = MemoryLRU(max_bytes=1000, clock=Clock())
    assert not lru.put("big", "x", 5000, expires_at=2e9)
    assert lru.get("big") is None and lru.bytes == 0


def test_replacing_a_key_does_not_count_it_twice():
    lru = MemoryLRU(max_bytes=10_000, clock=Clock())
    lru.put("k", "a", 100, expires_at=2e9)
    lru.put("k", "b", 300, expires_at=2e9)
    assert lru.get("k") == "b" and lru.bytes == entry_size("k", 300)


def test_entries_expire_by_the_injected_clock():
    clock = Clock()
    lru = MemoryLRU(max_bytes=10_000, clock=clock)
    lru.put("k", "v", 10, expires_at=clock.t + 30)
    clock.t += 29.9
    assert lru.get("k") == "v"
    clock.t += 0.1
    assert lru.get("k") is None and lru.bytes == 0 and len(lru) == 0


def test_delete_by_prefix_drops_only_that_namespace():
    lru = MemoryLRU(max_bytes=100_000, clock=Clock())
    for key in ("a.1", "a.2", "b.1"):
        lru.put(key, key, 10, expires_at=2e9)
    assert lru.delete_prefix("a.") == 2
    assert lru.get("b.1") == "b.1" and lru.get("a.1") is None


def test_stored_answers_round_trip_through_msgpack():
    stored = Stored(body=b'{"id":"x"}', source="e1", prompt_tokens=3, completion_tokens=4, total_tokens=7,
                    expires_at=123.5)
    assert decode_stored(encode_stored(stored)) == stored


class DeadRedis:
    """A redis client whose every call fails as a refused connection would."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, source: str):
        return self._fail

    async def _fail(self, *args, **kwargs):
        self.calls += 1
        raise RedisConnectionError("refused")

    def __getattr__(self, name: str):
        return self._fail


async def test_a_failing_redis_is_skipped_for_the_backoff_then_tried_again(monkeypatch):
    clock = Clock()
    redis = DeadRedis()
    warnings = []
    monkeypatch.setattr("fila.adapters.cache_store.log.warning", lambda event, **kw: warnings.append(event))
    store = RedisStore(redis, backoff_s=1.0, warn_every_s=10.0, clock=clock)
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    assert redis.calls == 1 and not store.available
    for _ in range(20):                      # during the back-off: no network at all
        with pytest.raises(StoreUnavailable):
            await store.get("k")
    assert redis.calls == 1
    clock.t += 1.0                           # back-off over: one new attempt
    with pytest.raises(StoreUnavailable):
        await store.set("k", b"v", 1000)
    assert redis.calls == 2
    assert warnings == ["cache_redis_degraded"]   # at most one warning per 10 s
    clock.t += 10.0
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    assert warnings == ["cache_redis_degraded"] * 2
