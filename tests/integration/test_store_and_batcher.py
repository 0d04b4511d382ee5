"""The event store, the group-commit batcher and the key registry, on SQLite and on PostgreSQL.

Every test runs on both backends (the ``database_url`` fixture) with a schema of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import msgspec
import pytest
from eventsourcing.persistence import IntegrityError

from fila.adapters.batcher import Batcher, BatcherClosed
from fila.adapters.eventstore import FilaStore, open_store
from fila.domain.apikey import SECRET_PREFIX, ApiKey, hash_secret
from fila.domain.ledger import RECORDED_TOPIC, LedgerEntry
from fila.projections.registry import Registry

AT = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def secret_named(name: str) -> str:
    return f"{SECRET_PREFIX}{name}-{uuid4().hex}{uuid4().hex}"


def entry(api_key_id: str = "k", **fields: Any) -> LedgerEntry:
    values = {"outcome": "ok", "status": 200, "model": "gpt-4.1-nano", "prompt_tokens": 3,
              "completion_tokens": 5, "total_tokens": 8, **fields}
    return LedgerEntry(id=fields.pop("id", uuid4()), api_key_id=api_key_id, at=AT.isoformat(),
                       **{k: v for k, v in values.items() if k != "id"})


def recorded(store: FilaStore) -> list[Any]:
    """Every LedgerEntry.Recorded notification in the log, in order."""
    notes, start = [], 0
    while True:
        page = store.recorder.select_notifications(start=start, limit=500, topics=[RECORDED_TOPIC],
                                                   inclusive_of_start=False)
        notes.extend(page)
        if len(page) < 500:
            return notes
        start = page[-1].id


@pytest.fixture
def store(database_url: str) -> Iterator[FilaStore]:
    opened = open_store(database_url)
    yield opened
    opened.close()


# -- the store ----------------------------------------------------------------------------------


def test_the_store_saves_and_loads_a_key_through_its_whole_life(store):
    secret, rotated = secret_named("one"), secret_named("two")
    key = ApiKey.issue(uuid4(), "ci", "team-a", secret, AT)
    store.save(key)
    loaded = store.repository.get(key.id)
    assert (loaded.name, loaded.owner, loaded.secret_hash, loaded.is_active) == ("ci", "team-a",
                                                                                 hash_secret(secret), True)
    loaded.rotate(rotated, AT + timedelta(hours=1))
    loaded.revoke("leaked", AT + timedelta(hours=2))
    store.save(loaded)
    again = store.repository.get(key.id)
    assert again.version == 3 and again.secret_hash == hash_secret(rotated) and not again.is_active
    assert again.revoked_at == (AT + timedelta(hours=2)).isoformat()
    notes = store.recorder.select_notifications(start=1, limit=10)
    assert [n.topic for n in notes] == ["fila:ApiKey.Issued", "fila:ApiKey.Rotated", "fila:ApiKey.Revoked"]
    for note in notes:  # the log holds plain JSON and never a secret
        state = msgspec.json.decode(note.state)
        assert secret not in note.state.decode() and rotated not in note.state.decode()
        assert isinstance(state, dict)


def test_a_ledger_entry_round_trips_and_a_second_recording_under_its_id_is_refused(store):
    first = entry("key-1", id=uuid4(), refusal_counts={"rpm": 3})
    store.save(first)
    loaded = store.repository.get(first.id)
    assert (loaded.api_key_id, loaded.total_tokens, loaded.refusal_counts) == ("key-1", 8, {"rpm": 3})
    with pytest.raises(IntegrityError):
        store.save(entry("key-1", id=first.id))
    assert len(recorded(store)) == 1


def test_a_stale_copy_of_a_key_cannot_overwrite_a_newer_change(store):
    key = ApiKey.issue(uuid4(), "ci", "team-a", secret_named("one"), AT)
    store.save(key)
    mine, theirs = store.repository.get(key.id), store.repository.get(key.id)
    mine.revoke("leaked", AT)
    store.save(mine)
    theirs.rotate(secret_named("two"), AT)
    with pytest.raises(IntegrityError):
        store.save(theirs)


# -- the batcher --------------------------------------------------------------------------------


async def test_under_concurrent_load_every_commit_is_recorded_exactly_once(store, batcher):
    tasks, per_task = 200, 10

    async def client(number: int) -> list[int]:
        ids = []
        for i in range(per_task):
            recordings = await batcher.commit(entry(f"key-{number}", idempotency_key=f"{number}-{i}"))
            assert len(recordings) == 1
            ids.append(recordings[0].notification.id)
        return ids

    results = await asyncio.gather(*(client(n) for n in range(tasks)))
    returned = [nid for ids in results for nid in ids]
    notes = recorded(store)
    assert len(notes) == tasks * per_task
    assert len({n.originator_id for n in notes}) == tasks * per_task
    pairs = Counter(msgspec.json.decode(n.state)["idempotency_key"] for n in notes)
    assert set(pairs) == {f"{n}-{i}" for n in range(tasks) for i in range(per_task)}
    assert max(pairs.values()) == 1
    assert sorted(returned) == [n.id for n in notes]  # each caller was told its own notification
    assert batcher.committed == tasks * per_task
    assert batcher.batches <= tasks * per_task // 10  # group commit: far fewer transactions than commits
    assert batcher.last_notification_id == notes[-1].id


async def test_a_commit_returns_only_after_the_entry_is_readable(store, batcher):
    for _ in range(5):
        e = entry("k")
        recordings = await batcher.commit(e)
        assert store.repository.get(e.id).version == 1
        assert store.recorder.max_notification_id() >= recordings[0].notification.id


class GatedStore:
    """The real store, whose next save waits for ``gate``: callers pile up into one batch."""

    def __init__(self, store: FilaStore) -> None:
        self.store = store
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.saves: list[int] = []

    def record(self, events: Any) -> Any:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.saves.append(len(events))
        return self.store.record(events)


async def test_a_bad_entry_fails_only_its_own_caller_and_the_rest_of_its_batch_commits(store):
    gated = GatedStore(store)
    batcher = Batcher(gated, max_size=200, max_wait=0.002)
    batcher.start()
    try:
        existing = entry("k")
        store.save(existing)
        holder = asyncio.ensure_future(batcher.commit(entry("k")))  # holds the writer in save()
        assert await asyncio.to_thread(gated.entered.wait, 10)
        twin = uuid4()
        bad = [entry("k", id=existing.id), entry("k", id=twin)]  # a duplicate of a stored id; twins
        good = [entry("k") for _ in range(18)]
        good.insert(9, entry("k", id=twin))
        waiting = [asyncio.ensure_future(batcher.commit(e)) for e in good[:5] + bad[:1] + good[5:] + bad[1:]]
        await asyncio.sleep(0.05)   # every caller is queued behind the held save
        gated.gate.set()
        await holder
        results = await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        await asyncio.to_thread(batcher.close)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 2 and all(isinstance(f, IntegrityError) for f in failures)
    assert isinstance(results[5], IntegrityError) and isinstance(results[-1], IntegrityError)
    assert gated.saves[1] == len(waiting)  # they were all in one batch, which was then split
    ids = [n.originator_id for n in recorded(store)]
    assert len(ids) == 1 + 1 + len(good) and len(set(ids)) == len(ids)
    assert {e.id for e in good} <= set(ids) and ids.count(existing.id) == 1
    for result in results:
        if not isinstance(result, BaseException):
            assert len(result) == 1 and result[0].notification.id in {n.id for n in recorded(store)}


async def test_a_closed_batcher_refuses_new_commits(store):
    batcher = Batcher(store)
    with pytest.raises(BatcherClosed):
        await batcher.commit(entry("k"))
    batcher.start()
    await batcher.commit(entry("k"))
    await asyncio.to_thread(batcher.close)
    with pytest.raises(BatcherClosed):
        await batcher.commit(entry("k"))
    assert len(recorded(store)) == 1


async def test_a_lone_commit_is_not_delayed_by_the_batch_window(store):
    batcher = Batcher(store, max_wait=5.0)  # a window that would be obvious if a lone request waited
    batcher.start()
    try:
        await batcher.commit(entry("k"))
        started = asyncio.get_running_loop().time()
        await batcher.commit(entry("k"))
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await asyncio.to_thread(batcher.close)


# -- the registry -------------------------------------------------------------------------------


async def test_the_registry_follows_keys_revocations_and_rotations_in_the_log(database_url, store, batcher):
    registry = Registry(store.recorder)
    one, two = secret_named("one"), secret_named("two")
    first = ApiKey.issue(uuid4(), "first", "team-a", one, AT)
    second = ApiKey.issue(uuid4(), "second", "team-b", two, AT)
    await batcher.commit(first, second)
    await batcher.commit(entry(str(first.id)))  # ledger entries are not the registry's business
    position = registry.catch_up()
    assert registry.authenticate(hash_secret(one)).id == str(first.id)
    assert registry.authenticate(hash_secret(two)).name == "second"
    assert set(registry.keys) == {str(first.id), str(second.id)}

    rotated = secret_named("one-rotated")
    first.rotate(rotated, AT + timedelta(hours=1))
    second.revoke("leaked", AT + timedelta(hours=1))
    await batcher.commit(first, second)
    assert registry.authenticate(hash_secret(one)) is not None  # not caught up yet
    assert registry.catch_up() > position
    assert registry.authenticate(hash_secret(one)) is None
    assert registry.authenticate(hash_secret(rotated)).id == str(first.id)
    assert registry.authenticate(hash_secret(two)) is None
    assert registry.keys[str(second.id)].revoked_reason == "leaked" and not registry.keys[str(second.id)].active
    assert registry.keys[str(first.id)].version == 2

    # a second process: its own store object on the same database, its registry from scratch
    other_store = open_store(database_url)
    other = Registry(other_store.recorder)
    other.catch_up()
    assert {k: (r.secret_hash, r.active, r.version) for k, r in other.keys.items()} == \
           {k: (r.secret_hash, r.active, r.version) for k, r in registry.keys.items()}
    assert set(other.by_hash) == {hash_secret(rotated)}

    # ... and it sees what the first process writes next
    three = secret_named("three")
    third = ApiKey.issue(uuid4(), "third", "team-c", three, AT)
    await batcher.commit(third)
    assert other.authenticate(hash_secret(three)) is None
    other.catch_up()
    assert other.authenticate(hash_secret(three)).id == str(third.id)
    first.revoke("gone", AT + timedelta(hours=2))
    await batcher.commit(first)
    other.catch_up()
    assert other.authenticate(hash_secret(rotated)) is None
    assert other.by_hash.keys() == {hash_secret(three)}
    other_store.close()


async def test_the_registry_reads_a_long_log_page_by_page(store, batcher):
    keys = [ApiKey.issue(uuid4(), f"k{i}", "team", secret_named(f"s{i}"), AT) for i in range(25)]
    await batcher.commit(*keys)
    registry = Registry(store.recorder)
    registry.catch_up(page=4)
    assert len(registry.keys) == 25 and len(registry.by_hash) == 25
