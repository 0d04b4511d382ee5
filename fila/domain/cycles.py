"""Billing-cycle periods: half-open UTC intervals and monthly cycles anchored on an assignment.

Rules (copied into the README):

- **Time is UTC and tz-aware.** A naive ``datetime`` is refused (``ValueError``); an aware one in
  another zone is converted to UTC first, so all calendar arithmetic (month lengths, time of day)
  is done in UTC.
- **A period is half-open**, ``[start, end)``: it contains ``start`` and not ``end``; ``end`` of one
  cycle is ``start`` of the next, so consecutive cycles tile time with no gap and no overlap.
- **Monthly cycles are anchored on the assignment start** ``anchor``. Cycle ``k`` (k = 0, 1, ...)
  starts at ``add_months(anchor, k)`` and ends where cycle ``k + 1`` starts.
- **Missing days clamp to the month's last day.** When the anchor's day does not exist in a month
  (the 31st in April, 29 February in a common year), the cycle starts on that month's last day, at
  the anchor's time of day. Every start is computed **from the anchor, never chained** from the
  previous cycle, so an anchor of Jan 31 gives Feb 28 (29 in leap years), Mar 31, Apr 30, ... and
  an anchor of 29 Feb 2024 gives 28 Feb 2025 (k=12) and 29 Feb 2028 (k=48).
- ``cycle_for(anchor, at)`` is the cycle containing ``at``; ``at`` before ``anchor`` is an error.
  It is O(1): the month difference is computed directly, then corrected by at most one.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact

__all__ = [
    "Period",
    "add_months",
    "cycle_by_index",
    "cycle_for",
    "cycle_index",
    "ensure_utc",
]

_ONE_SECOND_US = 1_000_000
_SECONDS = Context(prec=60, traps=[Inexact])


def ensure_utc(moment: datetime, what: str = "datetime") -> datetime:
    """``moment`` converted to UTC; naive datetimes (and non-datetimes) are refused."""
    if not isinstance(moment, datetime):
        raise ValueError(f"{what} must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {moment.isoformat()}")
    return moment.astimezone(timezone.utc)


def _microseconds(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * _ONE_SECOND_US + delta.microseconds


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open interval of time ``[start, end)`` between two UTC datetimes, ``start < end``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        start = ensure_utc(self.start, "period start")
        end = ensure_utc(self.end, "period end")
        if not start < end:
            raise ValueError(f"period must end after it starts: {start.isoformat()} .. {end.isoformat()}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    def contains(self, moment: datetime) -> bool:
        """``start <= moment < end``."""
        return self.start <= ensure_utc(moment, "moment") < self.end

    def __contains__(self, moment: datetime) -> bool:
        return self.contains(moment)

    @property
    def microseconds(self) -> int:
        """Exact length in microseconds (the unit proration uses)."""
        return _microseconds(self.end - self.start)

    @property
    def seconds(self) -> Decimal:
        """Exact length in seconds (a whole number for cycles: every boundary shares the anchor's time)."""
        return _SECONDS.divide(Decimal(self.microseconds), Decimal(_ONE_SECOND_US))

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


def add_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` moved by ``months`` calendar months, the day clamped to the month's last day."""
    if isinstance(months, bool) or not isinstance(months, int):
        raise ValueError(f"months must be an int, got {months!r}")
    years, month0 = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + years, month0 + 1
    if not 1 <= year <= 9999:
        raise ValueError(f"{anchor.isoformat()} + {months} months is out of the supported range")
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def cycle_index(anchor: datetime, at: datetime) -> int:
    """Index ``k`` of the cycle containing ``at`` (``k = 0`` is the cycle starting at ``anchor``)."""
    anchor = ensure_utc(anchor, "anchor")
    at = ensure_utc(at, "at")
    if at < anchor:
        raise ValueError(f"{at.isoformat()} is before the cycle anchor {anchor.isoformat()}")
    # Cycle k starts in calendar month anchor.month + k, so the cycle containing `at` is either the
    # one starting in at's month or, if that one starts later in the month than `at`, the one before.
    k = (at.year - anchor.year) * 12 + (at.month - anchor.month)
    if add_months(anchor, k) > at:
        k -= 1
    return k


def cycle_by_index(anchor: datetime, k: int) -> Period:
    """Cycle ``k`` of ``anchor``: ``[add_months(anchor, k), add_months(anchor, k + 1))``."""
    anchor = ensure_utc(anchor, "anchor")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"cycle index must be a non-negative int, got {k!r}")
    return Period(add_months(anchor, k), add_months(anchor, k + 1))


def cycle_for(anchor: datetime, at: datetime) -> Period:
    """The monthly cycle of ``anchor`` that contains ``at`` (``at >= anchor``)."""
    return cycle_by_index(anchor, cycle_index(anchor, at))
