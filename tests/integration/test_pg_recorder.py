"""The one-round-trip PostgreSQL recorder: same rows, ids, errors and ordering as the library's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder

from fila.adapters.eventstore import FilaStore, open_store
from fila.adapters.pg_recorder import OneTripRecorder
from tests.support import new_pg_url

# bytes every literal escaping has to survive: quotes, backslashes, NUL, high bytes
AWKWARD = b"\x00'\\\"; COMMIT; --\xff\xfe" + bytes(range(256))


@pytest.fixture
def store() -> Iterator[FilaStore]:
    opened = open_store(new_pg_url())
    yield opened
    opened.close()


def events(n: int, originator: object = None, topic: str = "fila:test") -> list[StoredEvent]:
    if originator is not None:
        return [StoredEvent(originator, v, topic, AWKWARD + str(v).encode()) for v in range(1, n + 1)]
    return [StoredEvent(uuid4(), 1, topic, AWKWARD) for _ in range(n)]


def test_the_store_uses_it_and_rows_round_trip_byte_for_byte(store: FilaStore) -> None:
    assert isinstance(store.recorder, OneTripRecorder)
    originator = uuid4()
    written = events(150, originator, "fila:it's-a \\ topic")
    ids = store.recorder.insert_events(written)
    assert ids == sorted(ids) and len(set(ids)) == 150
    back = store.recorder.select_events(originator)
    assert [(e.originator_version, e.topic, e.state) for e in back] == \
        [(e.originator_version, e.topic, e.state) for e in written]
    notes = store.recorder.select_notifications(start=ids[0], limit=200)
    assert [n.id for n in notes] == ids                      # the ids returned are the rows' own, in order


def test_a_duplicate_fails_the_whole_batch_and_the_writer_goes_on(store: FilaStore) -> None:
    first = events(1)
    store.recorder.insert_events(first)
    before = store.recorder.max_notification_id()
    with pytest.raises(IntegrityError):
        store.recorder.insert_events(events(3) + first)
    assert store.recorder.max_notification_id() == before    # nothing of the failed batch was kept
    ids = store.recorder.insert_events(events(2))
    assert len(ids) == 2 and ids[0] > before


def test_it_agrees_with_the_library_recorder_on_the_same_table(store: FilaStore) -> None:
    library = PostgresApplicationRecorder(store.recorder.datastore, events_table_name=store.recorder.events_table_name)
    mine = store.recorder.insert_events(events(2))
    theirs = library.insert_events(events(2))
    again = store.recorder.insert_events(events(2))
    assert mine[-1] < theirs[0] and theirs[-1] < again[0]


def test_a_dead_connection_is_replaced_and_the_write_retried(store: FilaStore) -> None:
    store.recorder.insert_events(events(1))
    pid = store.recorder._writer.info.backend_pid
    with psycopg.connect(new_pg_url().split("?")[0], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    ids = store.recorder.insert_events(events(1))
    assert len(ids) == 1 and store.recorder._writer.info.backend_pid != pid


def test_concurrent_writers_from_several_threads_lose_nothing(store: FilaStore) -> None:
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(20):
                store.recorder.insert_events(events(5))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    notes = store.recorder.select_notifications(start=1, limit=1000)
    assert len(notes) == 400 and [n.id for n in notes] == sorted(n.id for n in notes)


def _connection_dies_once(recorder: OneTripRecorder, monkeypatch: pytest.MonkeyPatch, *,
                          after_commit: bool) -> list[list[int]]:
    """The next write's connection dies: after the server committed it (its reply lost) or before."""
    from eventsourcing.persistence import OperationalError

    import fila.adapters.pg_recorder as module

    monkeypatch.setattr(module, "RETRY_WAIT_S", 0.01)
    real, attempts, committed = recorder._insert_once, [], []

    def once(stored_events):
        attempts.append(len(stored_events))
        if len(attempts) == 1:
            if after_commit:
                committed.append(real(stored_events))
            recorder.close_writer()
            raise OperationalError("server closed the connection unexpectedly")
        return real(stored_events)

    monkeypatch.setattr(recorder, "_insert_once", once)
    return committed


def test_a_write_whose_commit_reply_was_lost_is_recognised_on_retry(store: FilaStore, monkeypatch) -> None:
    committed = _connection_dies_once(store.recorder, monkeypatch, after_commit=True)
    ids = store.recorder.insert_events(events(5))
    assert ids == committed[0]                                # the first attempt's rows, not an IntegrityError
    stored = store.recorder.select_notifications(start=ids[0] - 1, limit=10)
    assert [n.id for n in stored] == ids                      # stored once each


def test_after_a_lost_connection_a_true_duplicate_is_still_an_integrity_error(store: FilaStore, monkeypatch) -> None:
    first = events(1)
    store.recorder.insert_events(first)
    clash = [StoredEvent(first[0].originator_id, 1, first[0].topic, b"another state")]
    _connection_dies_once(store.recorder, monkeypatch, after_commit=False)
    with pytest.raises(IntegrityError):
        store.recorder.insert_events(events(2) + clash)       # the retry meets a row that is not this one
    assert store.recorder.select_events(first[0].originator_id)[0].state == first[0].state
