"""Times in events are ISO-8601 strings in UTC, passed in by the caller (never read inside events)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return at.astimezone(UTC).isoformat()


def parse_iso(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise ValueError(f"time {text!r} has no timezone")
    return at.astimezone(UTC)
