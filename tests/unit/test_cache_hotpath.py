"""The hit path's shortcut for recording: ``ledger.recorded`` builds the very event the
``LedgerEntry`` aggregate would record, and the store keeps and returns it as such."""

from __future__ import annotations

import uuid

import pytest

from fila.adapters.eventstore import open_store
from fila.domain.ledger import RECORDED_TOPIC, LedgerEntry, recorded
from tests.support import new_sqlite_url

FIELDS = dict(api_key_id="k", at="2026-01-01T00:00:00+00:00", outcome="ok", status=200, model="m",
              fingerprint="f" * 32, prompt_tokens=10, completion_tokens=5, total_tokens=15, latency_us=100,
              cache="hit", cache_layer="memory", cache_source="src", tokens_saved=15, plan_id="p", plan_version=1)


def state(event) -> dict:
    values = dict(event.__dict__)
    del values["timestamp"]
    return values


@pytest.mark.parametrize("fields", [FIELDS, dict(api_key_id="k", at="t", outcome="forbidden", status=403, model="m"),
                                    dict(FIELDS, refusal_counts={"rpm": 3}, error="x", stream=True)])
def test_the_direct_event_equals_the_aggregates(fields):
    entry_id = uuid.uuid4()
    [expected] = LedgerEntry(id=entry_id, **fields).collect_events()
    event = recorded(entry_id, **fields)
    assert type(event) is type(expected) and state(event) == state(expected)
    assert event.timestamp.tzinfo is not None


def test_unknown_missing_or_badly_typed_fields_are_refused():
    with pytest.raises(TypeError):
        recorded(uuid.uuid4(), **FIELDS, bogus=1)
    with pytest.raises(TypeError):
        recorded(uuid.uuid4(), api_key_id="k", at="t", outcome="ok", status=200)
    with pytest.raises(TypeError):
        recorded(str(uuid.uuid4()), **FIELDS)


def test_the_store_saves_it_and_rebuilds_the_entry(tmp_path):
    store = open_store(new_sqlite_url(tmp_path))
    entry_id = uuid.uuid4()
    store.save(recorded(entry_id, **FIELDS))
    entry = store.repository.get(entry_id)
    assert (entry.cache, entry.cache_layer, entry.cache_source, entry.tokens_saved) == ("hit", "memory", "src", 15)
    [note] = store.recorder.select_notifications(start=1, limit=10, topics=[RECORDED_TOPIC])
    assert note.originator_id == entry_id
    with pytest.raises(Exception, match="(?i)integrity|unique"):
        store.save(recorded(entry_id, **FIELDS))       # one entry per id, as before
