"""Domain rules of API keys and ledger entries, the pinned event topics, and the msgspec transcoder."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID, uuid4

import msgspec
import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Mapper
from eventsourcing.utils import get_topic, resolve_topic
from hypothesis import given, settings
from hypothesis import strategies as st

import fila.domain
from fila.adapters.transcoder import MsgspecTranscoder
from fila.domain.apikey import SECRET_PREFIX, ApiKey, hash_secret
from fila.domain.errors import Conflict
from fila.domain.ledger import RECORDED_TOPIC, BreakerTransition, LedgerEntry, entry_id_for

AT = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
SECRET = SECRET_PREFIX + "a-secret-nobody-may-store-0123456789abcdef"
NEW_SECRET = SECRET_PREFIX + "the-rotated-secret-also-never-stored-98765"


def issued(secret: str = SECRET) -> ApiKey:
    return ApiKey.issue(uuid4(), "ci", "team-a", secret, AT)


def stored_states(events: list) -> list[bytes]:
    """What the store would write for these events (the transcoded state, as bytes)."""
    mapper = Mapper(transcoder=MsgspecTranscoder())
    return [mapper.to_stored_event(e).state for e in events]


# -- API keys -----------------------------------------------------------------------------------


def test_an_issued_key_is_active_and_keeps_only_the_hash_of_its_secret():
    key = issued()
    assert key.is_active
    assert key.secret_hash == hashlib.sha256(SECRET.encode()).hexdigest() == hash_secret(SECRET)
    assert key.prefix.startswith(SECRET_PREFIX) and len(key.prefix) < len(SECRET)
    assert SECRET not in vars(key).values()


def test_no_event_of_a_key_carries_its_secret():
    key = issued()
    key.rotate(NEW_SECRET, AT + timedelta(days=1))
    key.revoke("leaked", AT + timedelta(days=2))
    events = key.collect_events()
    assert [type(e).__name__ for e in events] == ["Issued", "Rotated", "Revoked"]
    for event, state in zip(events, stored_states(events), strict=True):
        for secret in (SECRET, NEW_SECRET):
            assert secret not in str(vars(event))
            assert secret.encode() not in state
    assert vars(events[0])["secret_hash"] == hash_secret(SECRET)
    assert vars(events[1])["secret_hash"] == hash_secret(NEW_SECRET)


def test_revoking_twice_is_a_conflict_and_records_nothing_more():
    key = issued()
    key.revoke("leaked", AT)
    with pytest.raises(Conflict) as raised:
        key.revoke("again", AT + timedelta(minutes=1))
    assert raised.value.status == 409 and raised.value.code == "already_revoked"
    assert [type(e).__name__ for e in key.collect_events()] == ["Issued", "Revoked"]
    assert key.revoked_reason == "leaked" and not key.is_active


def test_a_revoked_key_cannot_be_rotated():
    key = issued()
    key.revoke("leaked", AT)
    with pytest.raises(Conflict) as raised:
        key.rotate(NEW_SECRET, AT + timedelta(minutes=1))
    assert raised.value.status == 409
    assert key.secret_hash == hash_secret(SECRET)
    assert [type(e).__name__ for e in key.collect_events()] == ["Issued", "Revoked"]


def test_rotation_replaces_the_hash_and_keeps_the_key_active():
    key = issued()
    key.rotate(NEW_SECRET, AT + timedelta(hours=1))
    assert key.is_active
    assert key.secret_hash == hash_secret(NEW_SECRET) != hash_secret(SECRET)
    assert key.prefix == NEW_SECRET[: len(key.prefix)]
    assert key.rotated_at == (AT + timedelta(hours=1)).isoformat()


def test_times_are_stored_in_utc_and_must_carry_a_timezone():
    utc_plus_2 = timezone(timedelta(hours=2))
    key = ApiKey.issue(uuid4(), "ci", "team-a", SECRET, datetime(2026, 1, 15, 14, 0, tzinfo=utc_plus_2))
    assert key.issued_at == "2026-01-15T12:00:00+00:00"
    with pytest.raises(ValueError):
        ApiKey.issue(uuid4(), "ci", "team-a", SECRET, datetime(2026, 1, 15, 12, 0))


def test_replaying_a_keys_events_rebuilds_it():
    key = issued()
    key.rotate(NEW_SECRET, AT + timedelta(hours=1))
    key.revoke("leaked", AT + timedelta(hours=2))
    events = key.collect_events()
    copy = None
    for event in events:
        copy = event.mutate(copy)
    assert copy is not None and copy.id == key.id and copy.version == 3
    assert (copy.secret_hash, copy.revoked_at, copy.revoked_reason) == (
        hash_secret(NEW_SECRET), key.revoked_at, "leaked")


# -- ledger entry ids ---------------------------------------------------------------------------


def test_entry_ids_are_deterministic_per_key_and_idempotency_key():
    key_a, key_b = str(uuid4()), str(uuid4())
    assert entry_id_for(key_a, "retry-1") == entry_id_for(key_a, "retry-1")
    assert isinstance(entry_id_for(key_a, "retry-1"), UUID)
    assert entry_id_for(key_a, "retry-1") != entry_id_for(key_b, "retry-1")
    assert entry_id_for(key_a, "retry-1") != entry_id_for(key_a, "retry-2")


@settings(max_examples=60, deadline=None)
@given(st.uuids(), st.uuids(), st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_entry_ids_collide_only_for_the_same_pair(key_1, key_2, idem_1, idem_2):
    same_pair = (key_1, idem_1) == (key_2, idem_2)
    assert (entry_id_for(str(key_1), idem_1) == entry_id_for(str(key_2), idem_2)) is same_pair


def test_a_ledger_entry_is_one_recorded_event():
    entry = LedgerEntry(id=uuid4(), api_key_id="k", at=AT.isoformat(), outcome="ok", status=200,
                        model="gpt-4.1-nano", prompt_tokens=3, completion_tokens=4, total_tokens=7)
    events = entry.collect_events()
    assert len(events) == 1 and get_topic(type(events[0])) == RECORDED_TOPIC == "fila:LedgerEntry.Recorded"


# -- pinned topics ------------------------------------------------------------------------------

# Stored history names these topics: each must keep resolving to its class, whatever the module.
PINNED = {
    "fila:ApiKey": ApiKey,
    "fila:ApiKey.Created": ApiKey.Created,
    "fila:ApiKey.Issued": ApiKey.Issued,
    "fila:ApiKey.Revoked": ApiKey.Revoked,
    "fila:ApiKey.Rotated": ApiKey.Rotated,
    "fila:LedgerEntry": LedgerEntry,
    "fila:LedgerEntry.Created": LedgerEntry.Created,
    "fila:LedgerEntry.Recorded": LedgerEntry.Recorded,
    "fila:BreakerTransition": BreakerTransition,
    "fila:BreakerTransition.Created": BreakerTransition.Created,
    "fila:BreakerTransition.Transitioned": BreakerTransition.Transitioned,
}


def domain_aggregates() -> list[type[Aggregate]]:
    found = []
    for module_info in pkgutil.iter_modules(fila.domain.__path__, "fila.domain."):
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Aggregate) and value is not Aggregate
                    and value.__module__ == module.__name__):
                found.append(value)
    return found


def event_classes(aggregate: type[Aggregate]) -> list[type]:
    return [value for name, value in vars(aggregate).items()
            if isinstance(value, type) and issubclass(value, Aggregate.Event) and name != "Event"]


@pytest.mark.parametrize("topic", sorted(PINNED))
def test_historical_topics_still_resolve_to_their_class(topic):
    assert resolve_topic(topic) is PINNED[topic]
    assert get_topic(PINNED[topic]) == topic


def test_every_domain_aggregate_and_event_has_a_pinned_fila_topic():
    aggregates = domain_aggregates()
    assert {ApiKey, LedgerEntry, BreakerTransition} <= set(aggregates)
    for aggregate in aggregates:
        own = vars(aggregate).get("TOPIC")
        assert own and own.startswith("fila:"), f"{aggregate.__qualname__} has no pinned topic"
        events = event_classes(aggregate)
        assert events, f"{aggregate.__qualname__} has no events"
        for cls in events:
            topic = vars(cls).get("TOPIC")
            assert topic and topic.startswith("fila:"), f"{cls.__qualname__} has no pinned topic"
            assert resolve_topic(topic) is cls and get_topic(cls) == topic


def test_events_are_stored_under_their_pinned_topic():
    key = issued()
    key.revoke("leaked", AT)
    mapper = Mapper(transcoder=MsgspecTranscoder())
    assert [mapper.to_stored_event(e).topic for e in key.collect_events()] == [
        "fila:ApiKey.Issued", "fila:ApiKey.Revoked"]


# -- the msgspec transcoder ---------------------------------------------------------------------


def test_an_event_survives_the_round_trip_through_the_transcoder_timestamp_included():
    mapper = Mapper(transcoder=MsgspecTranscoder())
    entry = LedgerEntry(id=uuid4(), api_key_id="k", at=AT.isoformat(), outcome="ok", status=200,
                        model="m", stream=True, prompt_tokens=3, completion_tokens=4, total_tokens=7,
                        refusal_counts={"rpm": 3, "nested": [1, None, "x", {"b": False}]}, upstream=None)
    event = entry.collect_events()[0]
    stored = mapper.to_stored_event(event)
    back = mapper.to_domain_event(stored)
    assert back == event
    assert isinstance(back.timestamp, datetime) and back.timestamp == event.timestamp
    assert back.timestamp.utcoffset() == timedelta(0)
    msgspec.json.decode(stored.state)  # stored as plain JSON, readable without the mapper


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k != "timestamp"), json_values,
                       max_size=6))
def test_json_native_state_round_trips_unchanged(state):
    transcoder = MsgspecTranscoder()
    stamp = datetime(2026, 1, 15, 12, 0, 0, 123456, tzinfo=UTC)
    assert transcoder.decode(transcoder.encode({**state, "timestamp": stamp})) == {**state, "timestamp": stamp}


@pytest.mark.parametrize("value", [
    pytest.param(uuid4(), id="uuid"),
    pytest.param(datetime(2026, 1, 1, tzinfo=UTC), id="datetime"),
    pytest.param(Decimal("1.50"), id="decimal"),
    pytest.param({"spent": Decimal("0.10")}, id="decimal-in-a-dict"),
    pytest.param({"key": uuid4()}, id="uuid-in-a-dict"),
    pytest.param([datetime(2026, 1, 1, tzinfo=UTC)], id="datetime-in-a-list"),
])
def test_a_field_that_is_not_json_native_is_refused_at_encode_time(value):
    # each of these would come back as a str: a field must never silently change its type
    with pytest.raises(TypeError):
        MsgspecTranscoder().encode({"timestamp": datetime.now(UTC), "field": value})
