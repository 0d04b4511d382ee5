"""Fixed-window arithmetic, header formatting and the in-process limiter (no Redis)."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fila.adapters.ratelimit import (
    DAY, HOUR, MINUTE, TOKENS, Decision, Limits, LocalLimiter, format_duration, reset_after,
    window_start,
)

SECONDS = {"requests_per_minute": MINUTE, "requests_per_hour": HOUR, "requests_per_day": DAY}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- window arithmetic -------------------------------------------------------------------

def test_window_start_examples():
    assert window_start(125.5, MINUTE) == 120
    assert window_start(120.0, MINUTE) == 120
    assert window_start(119.999, MINUTE) == 60
    assert window_start(7199.0, HOUR) == 3600
    assert window_start(0.0, DAY) == 0


def test_day_window_is_utc_midnight():
    t = dt.datetime(2025, 3, 14, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()
    midnight = dt.datetime(2025, 3, 14, tzinfo=dt.timezone.utc).timestamp()
    assert window_start(t, DAY) == midnight
    assert reset_after(t, DAY) == pytest.approx(1.0)


def test_reset_after_examples():
    assert reset_after(120.0, MINUTE) == 60.0  # at a boundary: a whole window remains
    assert reset_after(179.5, MINUTE) == 0.5
    assert reset_after(3600 + 1800.25, HOUR) == 1799.75


@given(now=st.floats(0, 4e9, allow_nan=False), seconds=st.sampled_from([MINUTE, HOUR, DAY]))
def test_window_properties(now, seconds):
    start = window_start(now, seconds)
    assert start % seconds == 0
    assert start <= now < start + seconds
    assert 0 < reset_after(now, seconds) <= seconds


# --- formatting --------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.0004, "0s"), (0.02, "20ms"), (0.5, "500ms"), (1, "1s"), (12, "12s"),
    (59.5, "59.5s"), (59.9996, "1m0s"), (90, "1m30s"), (360, "6m0s"), (61.25, "1m1.25s"),
    (3600, "1h0m0s"), (86399.5, "23h59m59.5s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_headers_allowed_without_token_limit():
    d = Decision(allowed=True, limit_requests=60, remaining_requests=59, reset_requests_s=90.0)
    assert d.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1m30s",
    }


def test_headers_refused_with_tokens_and_retry_after():
    d = Decision(allowed=False, rule=TOKENS, limit_requests=10, remaining_requests=3,
                 reset_requests_s=12.0, limit_tokens=1000, remaining_tokens=0,
                 reset_tokens_s=0.2, retry_after_s=0.2)
    h = d.headers()
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "0"
    assert h["x-ratelimit-reset-tokens"] == "200ms"
    assert h["x-ratelimit-reset-requests"] == "12s"
    assert h["Retry-After"] == "1"  # rounded up and never 0
    assert Decision(allowed=False, retry_after_s=14.01).headers()["Retry-After"] == "15"
    assert "Retry-After" not in Decision(allowed=True, retry_after_s=3.0).headers()
    assert Decision(allowed=True).headers() == {}


def test_limits_reject_negative_values():
    with pytest.raises(ValueError):
        Limits(requests_per_minute=-1)


# --- LocalLimiter ------------------------------------------------------------------------

T0 = 1_700_000_040.0  # a minute boundary


def test_local_limit_refusal_and_reset():
    limiter = LocalLimiter()
    limits = Limits(requests_per_minute=3)
    allowed = [limiter.check("k", limits, now=T0 + i).allowed for i in range(10)]
    assert allowed == [True] * 3 + [False] * 7
    refused = limiter.check("k", limits, now=T0 + 45.2)
    assert refused.rule == "requests_per_minute"
    assert refused.counts == {"requests_per_minute": 3}  # refusals consumed nothing
    assert refused.retry_after_s == pytest.approx(14.8)
    assert refused.headers()["Retry-After"] == "15"
    assert limiter.check("k", limits, now=T0 + 60).allowed  # next window
    assert limiter.check("other", limits, now=T0 + 1).allowed  # keys are independent


def test_local_tightest_rule_and_blocking_rule():
    limiter = LocalLimiter(clock=Clock(T0 + 30))
    limits = Limits(requests_per_minute=10, requests_per_hour=3)
    first = limiter.check("k", limits)
    assert (first.limit_requests, first.remaining_requests) == (3, 2)
    assert first.reset_requests_s == pytest.approx(reset_after(T0 + 30, HOUR))
    limiter.check("k", limits)
    limiter.check("k", limits)
    refused = limiter.check("k", limits)
    assert not refused.allowed and refused.rule == "requests_per_hour"
    assert refused.retry_after_s == pytest.approx(reset_after(T0 + 30, HOUR))
    assert refused.counts == {"requests_per_minute": 3, "requests_per_hour": 3}


def test_refusal_names_the_full_window_that_resets_last():
    limiter = LocalLimiter()
    limits = Limits(requests_per_minute=2, requests_per_hour=2, requests_per_day=50)
    limiter.check("k", limits, now=T0)
    limiter.check("k", limits, now=T0)
    refused = limiter.check("k", limits, now=T0 + 10)  # minute and hour are both full
    assert refused.rule == "requests_per_hour"
    assert refused.retry_after_s == pytest.approx(reset_after(T0 + 10, HOUR))
    assert (refused.limit_requests, refused.remaining_requests) == (2, 0)
    assert refused.reset_requests_s == refused.retry_after_s


def test_local_token_limit_refuses_next_request_once_reached():
    limiter = LocalLimiter()
    limits = Limits(requests_per_minute=100, tokens_per_minute=1000)
    assert limiter.check("k", limits, now=T0).remaining_tokens == 1000
    limiter.add_tokens("k", 999, now=T0 + 1)
    assert limiter.check("k", limits, now=T0 + 2).allowed  # 999 < 1000: admitted
    limiter.add_tokens("k", 500, now=T0 + 3)
    refused = limiter.check("k", limits, now=T0 + 4)
    assert (refused.allowed, refused.rule, refused.remaining_tokens) == (False, TOKENS, 0)
    assert refused.retry_after_s == pytest.approx(56.0)
    assert refused.headers()["x-ratelimit-reset-tokens"] == "56s"
    assert limiter.check("k", limits, now=T0 + 60).allowed


def test_unlimited_is_always_allowed():
    limiter = LocalLimiter()
    assert all(limiter.check("k", Limits(), now=T0).allowed for _ in range(100))


# --- properties --------------------------------------------------------------------------

def request_times(max_size=80):
    """Sorted request times around a random epoch, spread over one of several spans."""
    return st.tuples(
        st.floats(0, 3e9, allow_nan=False),
        st.sampled_from([5.0, 150.0, 8000.0, 200_000.0]),
        st.lists(st.floats(0, 1, allow_nan=False), max_size=max_size),
    ).map(lambda t: sorted(t[0] + t[1] * x for x in t[2]))


@pytest.mark.parametrize("rule", sorted(SECONDS))
@given(times=request_times(), limit=st.integers(0, 12))
def test_local_admits_exactly_min_limit_n_per_window(rule, times, limit):
    seconds = SECONDS[rule]
    limiter = LocalLimiter()
    limits = Limits(**{rule: limit})
    admitted, offered = Counter(), Counter()
    for t in times:
        offered[window_start(t, seconds)] += 1
        if limiter.check("k", limits, now=t).allowed:
            admitted[window_start(t, seconds)] += 1
    for window, n in offered.items():
        assert admitted[window] == min(limit, n)


@settings(max_examples=200)
@given(times=request_times(),
       limits=st.builds(Limits, *[st.none() | st.integers(0, 6) for _ in range(3)]))
def test_local_admits_iff_no_window_is_full(times, limits):
    limiter = LocalLimiter()
    admitted = Counter()
    for t in times:
        windows = [(rule, window_start(t, SECONDS[rule]), limit)
                   for rule, limit, _, _ in limits.rules]
        full = any(admitted[rule, w] >= limit for rule, w, limit in windows)
        decision = limiter.check("k", limits, now=t)
        assert decision.allowed is not full
        if decision.allowed:
            for rule, w, _ in windows:
                admitted[rule, w] += 1
        if windows:
            assert decision.remaining_requests == min(
                max(0, limit - admitted[rule, w]) for rule, w, limit in windows)
    for (rule, _), n in admitted.items():
        assert n <= getattr(limits, rule)
