"""Ids of the hot path: aggregate ids are time-ordered UUIDs (version 7), unique, never secret."""

import time
import uuid

from fila.services.ids import new_request_id, new_uuid


def test_aggregate_ids_are_version_7_with_the_rfc_variant():
    for _ in range(1000):
        value = new_uuid()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_an_id_carries_the_millisecond_it_was_made_in():
    before = time.time_ns() // 1_000_000
    value = new_uuid()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_ids_made_in_later_milliseconds_sort_after_earlier_ones():
    first = [new_uuid() for _ in range(100)]
    time.sleep(0.002)
    later = [new_uuid() for _ in range(100)]
    assert max(first) < min(later)
    assert max(str(u) for u in first) < min(str(u) for u in later)   # as text too (the database's order)


def test_ids_within_one_millisecond_still_differ_in_their_random_bits():
    ids = [new_uuid() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    same_ms = [u for u in ids if u.int >> 80 == ids[0].int >> 80]
    assert len({u.int & ((1 << 62) - 1) for u in same_ms}) == len(same_ms)


def test_request_ids_are_32_hex_digits_and_unique():
    ids = [new_request_id() for _ in range(10_000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
