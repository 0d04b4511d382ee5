"""Billing-cycle periods (fila.domain.cycles)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from fila.domain.cycles import Period, add_months, cycle_by_index, cycle_for, cycle_index

DAY = timedelta(days=1)
US = timedelta(microseconds=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- Period --------------------------------------------------------------------------------------

def test_period_is_half_open() -> None:
    p = Period(utc(2024, 1, 1), utc(2024, 2, 1))
    assert p.contains(p.start) and utc(2024, 1, 15) in p
    assert not p.contains(p.end)
    assert p.contains(p.end - US)
    assert not p.contains(p.start - US)


def test_period_length() -> None:
    p = Period(utc(2024, 4, 1), utc(2024, 5, 1))
    assert p.seconds == Decimal(30 * 86_400)
    assert p.microseconds == 30 * 86_400 * 10**6
    assert Period(utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 1, 500_000)).seconds == Decimal("1.5")


def test_period_refuses_naive_and_empty_or_reversed() -> None:
    with pytest.raises(ValueError):
        Period(datetime(2024, 1, 1), utc(2024, 2, 1))
    with pytest.raises(ValueError):
        Period(utc(2024, 1, 1), datetime(2024, 2, 1))
    with pytest.raises(ValueError):
        Period(utc(2024, 1, 1), utc(2024, 1, 1))
    with pytest.raises(ValueError):
        Period(utc(2024, 2, 1), utc(2024, 1, 1))
    with pytest.raises(ValueError):
        Period(utc(2024, 1, 1), utc(2024, 2, 1)).contains(datetime(2024, 1, 5))


def test_period_converts_other_zones_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    p = Period(datetime(2024, 1, 1, 2, tzinfo=plus2), datetime(2024, 2, 1, 2, tzinfo=plus2))
    assert p == Period(utc(2024, 1, 1), utc(2024, 2, 1))
    assert p.start.tzinfo is UTC or p.start.utcoffset() == timedelta(0)


# -- monthly cycles ------------------------------------------------------------------------------

def test_anchor_on_the_31st_across_a_year_clamps_without_chaining() -> None:
    anchor = utc(2023, 1, 31, 10, 30)
    starts = [cycle_by_index(anchor, k).start for k in range(15)]
    assert [(s.year, s.month, s.day) for s in starts] == [
        (2023, 1, 31), (2023, 2, 28), (2023, 3, 31), (2023, 4, 30), (2023, 5, 31), (2023, 6, 30),
        (2023, 7, 31), (2023, 8, 31), (2023, 9, 30), (2023, 10, 31), (2023, 11, 30), (2023, 12, 31),
        (2024, 1, 31), (2024, 2, 29), (2024, 3, 31),
    ]
    assert all((s.hour, s.minute) == (10, 30) for s in starts)
    assert cycle_by_index(anchor, 1) == Period(utc(2023, 2, 28, 10, 30), utc(2023, 3, 31, 10, 30))


def test_anchor_on_the_30th_and_29th() -> None:
    assert cycle_by_index(utc(2023, 1, 30), 1).start == utc(2023, 2, 28)
    assert cycle_by_index(utc(2023, 1, 30), 2).start == utc(2023, 3, 30)
    assert cycle_by_index(utc(2023, 1, 29), 1).start == utc(2023, 2, 28)
    assert cycle_by_index(utc(2024, 1, 29), 1).start == utc(2024, 2, 29)


def test_30_and_31_day_months() -> None:
    anchor = utc(2024, 3, 15, 8)
    assert cycle_by_index(anchor, 0).seconds == 31 * 86_400  # Mar 15 -> Apr 15
    assert cycle_by_index(anchor, 1).seconds == 30 * 86_400  # Apr 15 -> May 15
    assert cycle_by_index(utc(2023, 2, 1), 0).seconds == 28 * 86_400
    assert cycle_by_index(utc(2024, 2, 1), 0).seconds == 29 * 86_400


def test_leap_day_anchor() -> None:
    anchor = utc(2024, 2, 29, 12)
    assert cycle_by_index(anchor, 1).start == utc(2024, 3, 29, 12)
    assert cycle_by_index(anchor, 12).start == utc(2025, 2, 28, 12)
    assert cycle_by_index(anchor, 13).start == utc(2025, 3, 29, 12)
    assert cycle_by_index(anchor, 24).start == utc(2026, 2, 28, 12)
    assert cycle_by_index(anchor, 48).start == utc(2028, 2, 29, 12)
    assert cycle_for(anchor, utc(2025, 3, 1)) == Period(utc(2025, 2, 28, 12), utc(2025, 3, 29, 12))


def test_time_of_day_matters_at_the_boundary() -> None:
    anchor = utc(2024, 1, 31, 23, 59, 59, 500_000)
    assert cycle_index(anchor, utc(2024, 2, 29, 23, 59, 59, 499_999)) == 0
    assert cycle_index(anchor, utc(2024, 2, 29, 23, 59, 59, 500_000)) == 1
    assert cycle_index(anchor, utc(2024, 2, 29)) == 0  # same day, earlier time: still cycle 0
    assert cycle_index(anchor, utc(2024, 3, 1)) == 1


def test_at_exactly_at_boundaries() -> None:
    anchor = utc(2024, 1, 31, 10)
    first = cycle_for(anchor, anchor)
    assert first == cycle_by_index(anchor, 0) and first.start == anchor
    assert cycle_for(anchor, first.end) == cycle_by_index(anchor, 1)
    assert cycle_for(anchor, first.end - US) == first
    assert cycle_index(anchor, utc(2024, 3, 31, 10)) == 2
    assert cycle_index(anchor, utc(2024, 3, 31, 10) - US) == 1


def test_before_anchor_and_naive_are_refused() -> None:
    anchor = utc(2024, 1, 31)
    with pytest.raises(ValueError):
        cycle_for(anchor, anchor - US)
    with pytest.raises(ValueError):
        cycle_for(datetime(2024, 1, 31), utc(2024, 2, 1))
    with pytest.raises(ValueError):
        cycle_for(anchor, datetime(2024, 2, 1))
    with pytest.raises(ValueError):
        cycle_by_index(anchor, -1)


def test_other_zones_are_computed_in_utc() -> None:
    # 2024-01-31 23:00 at -05:00 is 2024-02-01 04:00 UTC: the anchor day is the 1st, in UTC.
    anchor = datetime(2024, 1, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    assert cycle_by_index(anchor, 1).start == utc(2024, 3, 1, 4)


def test_far_future_is_direct() -> None:
    anchor = utc(2000, 5, 31, 6)
    assert cycle_index(anchor, utc(2500, 5, 31, 6)) == 500 * 12
    assert cycle_for(anchor, utc(2500, 6, 30, 5)) == Period(utc(2500, 5, 31, 6), utc(2500, 6, 30, 6))


def test_add_months_negative_and_range() -> None:
    assert add_months(utc(2024, 3, 31), -1) == utc(2024, 2, 29)
    with pytest.raises(ValueError):
        add_months(utc(9999, 12, 1), 1)


# -- properties ----------------------------------------------------------------------------------

def oracle_start(anchor: datetime, k: int) -> datetime:
    """Cycle k's start, written independently: walk k months, then clamp the anchor's day."""
    year, month = anchor.year, anchor.month
    for _ in range(k):
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    last = calendar.monthrange(year, month)[1]
    return datetime(year, month, min(anchor.day, last), anchor.hour, anchor.minute, anchor.second,
                    anchor.microsecond, tzinfo=UTC)


anchors = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC))
# bias towards month ends, the interesting anchors
month_end_anchors = st.builds(
    lambda y, m, back, t: datetime(y, m, calendar.monthrange(y, m)[1], tzinfo=UTC) - timedelta(days=back) + t,
    st.integers(1990, 2100), st.integers(1, 12), st.integers(0, 3),
    st.timedeltas(min_value=timedelta(0), max_value=DAY - US),
)
offsets = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=366 * 8))


@settings(max_examples=400)
@given(st.one_of(anchors, month_end_anchors), offsets)
def test_cycle_contains_at_and_cycles_tile_time(anchor: datetime, offset: timedelta) -> None:
    at = anchor + offset
    k = cycle_index(anchor, at)
    period = cycle_for(anchor, at)
    assert period.contains(at)
    assert period == cycle_by_index(anchor, k)
    assert period.start == oracle_start(anchor, k) and period.end == oracle_start(anchor, k + 1)
    assert cycle_by_index(anchor, k + 1).start == period.end  # no gap, no overlap after
    if k > 0:
        assert cycle_by_index(anchor, k - 1).end == period.start  # ... nor before
        assert not cycle_by_index(anchor, k - 1).contains(at)
    assert not cycle_by_index(anchor, k + 1).contains(at)
    assert 28 * DAY <= period.end - period.start <= 31 * DAY
    assert period.start.time() == anchor.time()


@given(st.one_of(anchors, month_end_anchors), st.integers(0, 200))
def test_cycle_index_inverts_cycle_by_index(anchor: datetime, k: int) -> None:
    period = cycle_by_index(anchor, k)
    assert cycle_index(anchor, period.start) == k
    assert cycle_index(anchor, period.end - US) == k
    assert cycle_index(anchor, period.end) == k + 1
