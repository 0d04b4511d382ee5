"""The batcher's express lane on PostgreSQL: a lone commit sent from the event loop itself.

It must be the same write as the writer thread's (same rows, ids, errors), used only when the
writer is idle, and a lost connection must neither lose nor double a request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, OperationalError, StoredEvent

from fila.adapters.batcher import Batcher
from fila.adapters.eventstore import FilaStore, open_store
from tests.integration.test_pg_recorder import AWKWARD
from tests.integration.test_store_and_batcher import entry, recorded
from tests.support import new_pg_url


@pytest.fixture
def store() -> Iterator[FilaStore]:
    opened = open_store(new_pg_url())
    yield opened
    opened.close()


async def test_the_async_write_stores_the_same_rows_as_the_threaded_one(store: FilaStore) -> None:
    originator = uuid4()
    first = await store.recorder.insert_events_async(
        [StoredEvent(originator, v, "fila:it's a \\ topic", AWKWARD + bytes([v])) for v in (1, 2, 3)])
    second = store.recorder.insert_events([StoredEvent(originator, 4, "fila:t", AWKWARD)])
    third = await store.recorder.insert_events_async([StoredEvent(originator, 5, "fila:t", b"")])
    assert first == sorted(first) and first[-1] < second[0] < third[0]
    back = store.recorder.select_events(originator)
    assert [(e.originator_version, e.state) for e in back] == \
        [(1, AWKWARD + b"\x01"), (2, AWKWARD + b"\x02"), (3, AWKWARD + b"\x03"), (4, AWKWARD), (5, b"")]
    assert back[0].topic == "fila:it's a \\ topic"


async def test_a_lone_commit_takes_the_express_lane_and_is_readable_when_it_returns(store, batcher):
    for _ in range(3):
        e = entry("k")
        recordings = await batcher.commit(e)
        assert store.repository.get(e.id).version == 1
        assert recordings[0].notification.id == store.recorder.max_notification_id()
    assert batcher.express_commits == 3
    assert batcher.committed == 3 and batcher.last_notification_id == recordings[0].notification.id


async def test_the_express_lane_can_be_turned_off(store):
    batcher = Batcher(store, express=False)
    batcher.start()
    try:
        await batcher.commit(entry("k"))
    finally:
        await asyncio.to_thread(batcher.close)
    assert batcher.express_commits == 0 and batcher.committed == 1


async def test_concurrent_commits_share_the_two_lanes_and_each_is_recorded_once(store, batcher):
    results = await asyncio.gather(*(batcher.commit(entry(f"k{n}")) for n in range(300)))
    notes = recorded(store)
    assert len(notes) == 300 == len({n.originator_id for n in notes})
    assert sorted(r[0].notification.id for r in results) == [n.id for n in notes]
    assert batcher.express_commits == 1        # the first found the writer idle; the rest were batched
    assert batcher.batches < 300 // 5


async def test_a_duplicate_on_the_express_lane_is_an_integrity_error(store, batcher):
    first = entry("k")
    await batcher.commit(first)
    with pytest.raises(IntegrityError):
        await batcher.commit(entry("k", id=first.id))
    assert batcher.express_commits == 2 - 1 and len(recorded(store)) == 1
    await batcher.commit(entry("k"))              # the lane goes on after it
    assert len(recorded(store)) == 2


async def test_a_killed_express_connection_is_replaced_and_the_commit_still_lands(store, batcher):
    await batcher.commit(entry("k"))
    pid = store.recorder._async_writer.info.backend_pid
    with psycopg.connect(new_pg_url().split("?")[0], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    e = entry("k")
    recordings = await batcher.commit(e)          # the dead connection fails; the retry writes it
    assert store.repository.get(e.id).version == 1 and len(recordings) == 1
    await batcher.commit(entry("k"))
    assert store.recorder._async_writer.info.backend_pid != pid
    assert len(recorded(store)) == 3


async def test_a_commit_whose_reply_was_lost_on_the_express_lane_is_not_recorded_twice(store, batcher, monkeypatch):
    real, landed = store.recorder.insert_events_async, []

    async def commits_then_loses_the_reply(stored_events):
        landed.append(await real(stored_events))
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store.recorder, "insert_events_async", commits_then_loses_the_reply)
    e = entry("k")
    recordings = await batcher.commit(e)          # not an IntegrityError: the write did happen
    assert [r.notification.id for r in recordings] == landed[0]
    assert [n.originator_id for n in recorded(store)] == [e.id]


class HeldWriter:
    """The real store, whose writer-thread saves wait for ``gate`` (the express lane does not)."""

    def __init__(self, store: FilaStore) -> None:
        self.store = store
        self.records_async = True
        self.record_async = store.record_async
        self.gate = threading.Event()
        self.entered = threading.Event()

    def record(self, events, **kwargs):
        self.entered.set()
        self.gate.wait(timeout=10)
        return self.store.record(events, **kwargs)


async def test_while_the_writer_is_saving_a_new_commit_queues_for_it(store):
    held = HeldWriter(store)
    batcher = Batcher(held, max_size=200, max_wait=0.002)
    batcher.start()
    try:
        express, queued = asyncio.ensure_future(batcher.commit(entry("k"))), asyncio.ensure_future(
            batcher.commit(entry("k")))      # the first takes the lane, the second goes to the writer
        await express
        assert await asyncio.to_thread(held.entered.wait, 10)
        later = asyncio.ensure_future(batcher.commit(entry("k")))   # the lane is free, the writer is not
        await asyncio.sleep(0.05)
        assert not later.done() and batcher.express_commits == 1
        held.gate.set()
        await asyncio.gather(queued, later)
    finally:
        held.gate.set()
        await asyncio.to_thread(batcher.close)
    assert batcher.express_commits == 1 and len(recorded(store)) == 3


async def test_an_aggregate_with_nothing_new_commits_nothing(store, batcher):
    assert await batcher.commit() == []
    assert batcher.committed == 0 and recorded(store) == []


async def test_a_caller_cancelled_mid_commit_leaves_the_lane_working(store, batcher):
    """A request cancelled while its commit waits (here on the table lock, held elsewhere): the
    commit may still land (the caller is gone either way), and the next commit must go through."""
    await batcher.commit(entry("k"))
    holder = await psycopg.AsyncConnection.connect(new_pg_url().split("?")[0], autocommit=True)
    schema, table = store.recorder.datastore.schema, store.recorder.events_table_name
    try:
        await holder.execute("BEGIN")
        await holder.execute(f'LOCK TABLE "{schema}"."{table}" IN EXCLUSIVE MODE')
        stuck = asyncio.ensure_future(batcher.commit(entry("k")))
        await asyncio.sleep(0.2)
        assert not stuck.done()
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        await holder.execute("COMMIT")
    finally:
        await holder.close()
    e = entry("k")
    recordings = await asyncio.wait_for(batcher.commit(e), timeout=10)
    assert store.repository.get(e.id).version == 1 and len(recordings) == 1
    assert 2 <= len(recorded(store)) <= 3
