"""The circuit breaker, driven by a fake clock: states, window, permits, transitions."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fila.adapters.breaker import (
    HALF_OPEN_RETRY_AFTER,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Transition,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
LEGAL_EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**overrides: float) -> tuple[CircuitBreaker, FakeClock, list[Transition]]:
    """A breaker on a fake clock whose transitions land in a list. Rate rule off unless asked."""
    clock, seen = FakeClock(), []
    options = {"failure_threshold": 3, "min_calls_in_window": 1000, "open_seconds": 10.0, **overrides}
    breaker = CircuitBreaker("upstream", BreakerSettings(**options), clock=clock, on_transition=seen.append)
    return breaker, clock, seen


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire().failure()


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire().success()


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.settings.failure_threshold)
    assert breaker.state is OPEN


# -- closed: the two rules ------------------------------------------------------------


def test_opens_after_consecutive_failures() -> None:
    breaker, clock, seen = make(failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED and breaker.retry_after() == 0.0
    fail(breaker)
    assert breaker.state is OPEN
    assert seen == [Transition("upstream", CLOSED, OPEN, "consecutive_failures=3", clock.now)]


@pytest.mark.parametrize("outcome", ["success", "neutral"])
def test_success_or_neutral_resets_the_consecutive_count(outcome: str) -> None:
    breaker, _, seen = make(failure_threshold=3)
    fail(breaker, 2)
    getattr(breaker.acquire(), outcome)()
    assert breaker.snapshot()["consecutive_failures"] == 0
    fail(breaker, 2)
    assert breaker.state is CLOSED and seen == []
    fail(breaker)
    assert breaker.state is OPEN


def test_error_rate_opens_only_with_enough_calls_in_the_window() -> None:
    breaker, clock, seen = make(failure_threshold=100, min_calls_in_window=10, error_rate_threshold=0.5)
    for _ in range(4):
        succeed(breaker)
        fail(breaker)
    fail(breaker)  # 5 of 9 failed: over the rate, but too few calls
    assert breaker.state is CLOSED
    fail(breaker)  # 6 of 10
    assert breaker.state is OPEN
    assert seen == [Transition("upstream", CLOSED, OPEN, "error_rate=0.60 over 30s (10 calls)", clock.now)]


def test_error_rate_below_the_threshold_keeps_it_closed() -> None:
    breaker, _, _ = make(failure_threshold=100, min_calls_in_window=10, error_rate_threshold=0.5)
    for _ in range(20):
        succeed(breaker, 2)
        fail(breaker)  # a third failed, for ever
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls_in_window"] == 60


def test_old_failures_fall_out_of_the_window() -> None:
    breaker, clock, _ = make(failure_threshold=100, min_calls_in_window=4, window_seconds=10)
    fail(breaker, 3)
    clock.advance(9.5)  # the failures' bucket is still in the window
    assert breaker.snapshot()["failures_in_window"] == 3
    clock.advance(0.5)
    assert breaker.snapshot()["failures_in_window"] == 0
    succeed(breaker, 3)
    fail(breaker)  # 1 of 4 in the window; 4 of 7 had the old failures stayed
    assert breaker.state is CLOSED
    assert (breaker.snapshot()["calls_in_window"], breaker.snapshot()["failures_in_window"]) == (4, 1)


def test_the_window_slides_bucket_by_bucket() -> None:
    breaker, clock, _ = make(window_seconds=10)
    fail(breaker)
    clock.advance(4)
    succeed(breaker, 2)
    clock.advance(6)  # the failure left, the successes are 6 s old
    assert (breaker.snapshot()["calls_in_window"], breaker.snapshot()["failures_in_window"]) == (2, 0)
    clock.advance(4)
    assert breaker.snapshot()["calls_in_window"] == 0
    fail(breaker)
    clock.advance(19)  # a long quiet spell: every bucket is stale, whatever slot it sits in
    assert breaker.snapshot()["calls_in_window"] == 0


def test_window_memory_does_not_grow_with_the_call_rate() -> None:
    breaker, clock, _ = make(failure_threshold=10**9, window_seconds=30)

    def traffic(seconds: int, per_second: int = 5000) -> None:
        for _ in range(seconds):
            clock.advance(1)
            for _ in range(per_second):
                breaker.acquire().success()

    traffic(31)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    traffic(31)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes for 155,000 more calls"
    assert breaker.snapshot()["calls_in_window"] == 30 * 5000


# -- open: failing fast -----------------------------------------------------------------


def test_open_fails_fast_with_the_time_left() -> None:
    breaker, clock, seen = make(open_seconds=10)
    trip(breaker)
    clock.advance(3)
    with pytest.raises(CircuitOpenError) as raised:
        breaker.acquire()
    assert raised.value.retry_after == pytest.approx(7.0)
    assert raised.value.breaker == "upstream"
    assert "upstream" in str(raised.value) and "7.00s" in str(raised.value)
    assert breaker.retry_after() == pytest.approx(7.0)
    clock.advance(6.5)
    assert breaker.retry_after() == pytest.approx(0.5)
    assert breaker.state is OPEN and len(seen) == 1


def test_failing_fast_records_nothing() -> None:
    breaker, clock, seen = make()
    trip(breaker)
    calls_before = breaker.snapshot()["calls_in_window"]
    for _ in range(20_000):
        with pytest.raises(CircuitOpenError):
            breaker.acquire()
    assert breaker.snapshot()["calls_in_window"] == calls_before and len(seen) == 1


# -- half-open: probes ------------------------------------------------------------------


def test_half_open_after_open_seconds_allows_exactly_the_probe_count() -> None:
    breaker, clock, seen = make(open_seconds=10, half_open_probes=2)
    trip(breaker)
    clock.advance(9.99)
    assert breaker.state is OPEN
    clock.advance(0.01)
    assert breaker.retry_after() == 0.0
    probes = [breaker.acquire(), breaker.acquire()]
    with pytest.raises(CircuitOpenError) as raised:
        breaker.acquire()
    assert raised.value.retry_after == HALF_OPEN_RETRY_AFTER == breaker.retry_after()
    assert breaker.state is HALF_OPEN and len(probes) == 2
    assert seen[-1] == Transition("upstream", OPEN, HALF_OPEN, "open_timeout_elapsed", clock.now)


def test_probe_success_closes_with_an_empty_window() -> None:
    breaker, clock, seen = make(failure_threshold=100, min_calls_in_window=2, error_rate_threshold=0.5)
    fail(breaker, 2)
    assert breaker.state is OPEN
    clock.advance(10)
    breaker.acquire().success()
    assert breaker.state is CLOSED
    assert seen[-1] == Transition("upstream", HALF_OPEN, CLOSED, "probe_succeeded", clock.now)
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["consecutive_failures"], snap["opened_at"]) == (0, 0, None)
    fail(breaker)  # the pre-open failures no longer count: 1 failure of 1 call is under min calls
    assert breaker.state is CLOSED


def test_closing_takes_success_to_close_probes() -> None:
    breaker, clock, _ = make(half_open_probes=1, success_to_close=3)
    trip(breaker)
    clock.advance(10)
    for _ in range(2):
        breaker.acquire().success()
        assert breaker.state is HALF_OPEN
    breaker.acquire().neutral()  # a 4xx proves the upstream is up
    assert breaker.state is CLOSED


def test_probe_failure_reopens_for_a_fresh_period() -> None:
    breaker, clock, seen = make(open_seconds=10)
    trip(breaker)
    clock.advance(12)
    probe = breaker.acquire()
    clock.advance(2)
    probe.failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(10.0)
    assert breaker.snapshot()["opened_at"] == clock.now
    assert [(t.from_state, t.to_state, t.reason) for t in seen[1:]] == [
        (OPEN, HALF_OPEN, "open_timeout_elapsed"),
        (HALF_OPEN, OPEN, "probe_failed"),
    ]


def test_a_released_probe_frees_its_slot_without_an_outcome() -> None:
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(10)
    breaker.acquire().release()
    probe = breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    del probe  # dropped without a word: the slot comes back too
    breaker.acquire().success()
    assert breaker.state is CLOSED
    assert [t.reason for t in seen] == ["consecutive_failures=3", "open_timeout_elapsed", "probe_succeeded"]


def test_an_outcome_from_before_a_transition_is_ignored() -> None:
    breaker, clock, _ = make()
    late = breaker.acquire()
    trip(breaker)
    clock.advance(10)
    probe = breaker.acquire()
    late.success()  # answered a call made while closed: not a probe
    assert breaker.state is HALF_OPEN
    probe.success()
    assert breaker.state is CLOSED


# -- permits ----------------------------------------------------------------------------


def test_a_second_outcome_is_a_no_op() -> None:
    breaker, _, _ = make()
    permit = breaker.acquire()
    permit.failure()
    permit.failure()
    permit.success()
    permit.release()
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["failures_in_window"], snap["consecutive_failures"]) == (1, 1, 1)


def test_context_manager_counts_an_escaping_exception_as_a_failure() -> None:
    breaker, _, _ = make()
    with pytest.raises(ConnectionError):
        with breaker.acquire():
            raise ConnectionError("upstream reset")
    assert breaker.snapshot()["failures_in_window"] == 1


def test_context_manager_counts_a_clean_exit_as_a_success() -> None:
    breaker, _, _ = make()
    fail(breaker, 2)
    with breaker.acquire():
        pass
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["failures_in_window"], snap["consecutive_failures"]) == (3, 2, 0)


def test_context_manager_keeps_an_outcome_already_reported() -> None:
    breaker, _, _ = make()
    with pytest.raises(ValueError):
        with breaker.acquire() as permit:
            permit.neutral()  # the upstream said 400; our own code then raised
            raise ValueError("bad request")
    assert breaker.snapshot()["failures_in_window"] == 0


def test_context_manager_releases_a_cancelled_probe() -> None:
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(10)
    with pytest.raises(asyncio.CancelledError):
        with breaker.acquire():
            raise asyncio.CancelledError  # the client went away mid-call
    assert breaker.state is HALF_OPEN and len(seen) == 2
    with breaker.acquire():  # the slot is free again
        pass
    assert breaker.state is CLOSED


# -- transitions and the hook -------------------------------------------------------------


def test_the_whole_life_as_the_hook_sees_it() -> None:
    breaker, clock, seen = make(failure_threshold=3, min_calls_in_window=4, open_seconds=5)
    start = clock.now
    fail(breaker, 3)
    clock.advance(5)
    breaker.acquire().failure()
    clock.advance(6)
    breaker.acquire().success()
    succeed(breaker, 2)
    fail(breaker)
    succeed(breaker)
    fail(breaker)  # 2 of 5 failed since closing (the probe is not in the window)
    fail(breaker)  # 3 of 6
    assert seen == [
        Transition("upstream", CLOSED, OPEN, "consecutive_failures=3", start),
        Transition("upstream", OPEN, HALF_OPEN, "open_timeout_elapsed", start + 5),
        Transition("upstream", HALF_OPEN, OPEN, "probe_failed", start + 5),
        Transition("upstream", OPEN, HALF_OPEN, "open_timeout_elapsed", start + 11),
        Transition("upstream", HALF_OPEN, CLOSED, "probe_succeeded", start + 11),
        Transition("upstream", CLOSED, OPEN, "error_rate=0.50 over 30s (6 calls)", start + 11),
    ]


def test_a_failing_hook_does_not_corrupt_the_breaker() -> None:
    def hook(transition: Transition) -> None:
        raise RuntimeError(f"metrics exporter down at {transition.to_state}")

    clock = FakeClock()
    config = BreakerSettings(failure_threshold=1)
    breaker = CircuitBreaker("upstream", config, clock=clock, on_transition=hook)
    with pytest.raises(RuntimeError):
        breaker.acquire().failure()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    clock.advance(10)
    with pytest.raises(RuntimeError):
        breaker.acquire()  # the lazy open -> half-open change ran the hook
    probe = breaker.acquire()
    with pytest.raises(RuntimeError):
        probe.success()
    assert breaker.state is CLOSED
    succeed(breaker)
    assert breaker.snapshot()["calls_in_window"] == 1


@pytest.mark.parametrize(
    "bad", [{"failure_threshold": 0}, {"error_rate_threshold": 0}, {"open_seconds": 0}, {"window_seconds": -1}]
)
def test_settings_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**bad)


# -- properties ---------------------------------------------------------------------------

breaker_settings = st.builds(
    BreakerSettings,
    failure_threshold=st.integers(1, 4),
    error_rate_threshold=st.sampled_from([0.25, 0.5, 1.0]),
    window_seconds=st.sampled_from([1.0, 5.0, 30.0]),
    min_calls_in_window=st.integers(1, 6),
    open_seconds=st.sampled_from([0.5, 3.0, 10.0]),
    half_open_probes=st.integers(1, 3),
    success_to_close=st.integers(1, 3),
)
acquire = st.tuples(st.just("acquire"), st.just(0))
outcomes = st.sampled_from(["success", "failure", "failure", "neutral", "release", "drop"])
outcome = st.tuples(outcomes, st.integers(0, 7))  # to which held permit
advance = st.tuples(st.just("advance"), st.integers(0, 48).map(lambda quarters: quarters / 4) | st.just(31.0))
operations = st.lists(st.one_of(acquire, outcome, acquire, outcome, advance), max_size=60)


@settings(max_examples=500, deadline=None)
@given(config=breaker_settings, ops=operations)
def test_the_state_machine_stays_on_legal_edges_and_honours_the_open_period(config, ops) -> None:
    clock, seen = FakeClock(), []
    breaker = CircuitBreaker("p", config, clock=clock, on_transition=seen.append)
    held: list[list] = []  # [permit, transitions seen when it was acquired, outcome reported]

    def state() -> BreakerState:  # as the hook tells it; acquire itself may turn OPEN into HALF_OPEN
        return seen[-1].to_state if seen else CLOSED

    def outstanding_probes() -> int:
        return sum(1 for _, epoch, done in held if epoch == len(seen) and not done)

    for op, arg in ops:
        if op == "advance":
            clock.advance(arg)
        elif op == "acquire":
            try:
                held.append([breaker.acquire(), len(seen), False])  # no other reference: "drop" frees it
            except CircuitOpenError as error:
                assert state() is not CLOSED, "a closed breaker refused a call"
                assert error.retry_after > 0
                if state() is OPEN:
                    assert error.retry_after == pytest.approx(seen[-1].at + config.open_seconds - clock.now)
                else:
                    assert outstanding_probes() == config.half_open_probes, "a free probe slot was refused"
            else:
                assert state() is not OPEN, "a call was let through while open"
                if state() is HALF_OPEN:
                    assert outstanding_probes() <= config.half_open_probes
        elif held:
            entry = held[arg % len(held)]
            if op == "drop":
                held.remove(entry)
                del entry
            else:
                getattr(entry[0], op)()
                entry[2] = True
        previous = CLOSED
        for index, transition in enumerate(seen):
            assert transition.from_state is previous
            assert (transition.from_state, transition.to_state) in LEGAL_EDGES
            if transition.to_state is HALF_OPEN:
                assert transition.at >= seen[index - 1].at + config.open_seconds
            previous = transition.to_state


@settings(max_examples=300, deadline=None)
@given(
    config=breaker_settings,
    ops=st.lists(st.sampled_from(["ok", "fail"]) | st.sampled_from([0.25, 0.5, 1.0, 3.0, 7.0]), max_size=120),
)
def test_closed_breaker_opens_exactly_when_a_plain_model_says_so(config, ops) -> None:
    """Brute force over every call ever made against the ring of buckets."""
    clock, seen = FakeClock(), []
    breaker = CircuitBreaker("m", config, clock=clock, on_transition=seen.append)
    calls: list[tuple[int, bool]] = []  # (bucket, failed) for every call
    consecutive = 0
    for op in ops:
        if isinstance(op, float):
            clock.advance(op)
            continue
        failed = op == "fail"
        permit = breaker.acquire()
        if failed:
            permit.failure()
        else:
            permit.success()
        calls.append((int(clock.now // 1.0), failed))
        consecutive = consecutive + 1 if failed else 0
        current = int(clock.now // 1.0)
        in_window = [f for bucket, f in calls if bucket > current - config.window_seconds]
        n, failures = len(in_window), sum(in_window)
        if consecutive >= config.failure_threshold:
            expected = f"consecutive_failures={consecutive}"
        elif failed and n >= config.min_calls_in_window and failures >= config.error_rate_threshold * n:
            expected = f"error_rate={failures / n:.2f} over {config.window_seconds:g}s ({n} calls)"
        else:
            assert breaker.state is CLOSED and seen == []
            assert breaker.snapshot()["calls_in_window"] == n
            continue
        assert [t.reason for t in seen] == [expected]
        return


@settings(max_examples=200, deadline=None)
@given(
    config=breaker_settings,
    probe_failures=st.integers(0, 3),
    steps=st.lists(st.integers(1, 20).map(lambda quarters: quarters / 4), min_size=1, max_size=12),
)
def test_no_call_goes_through_before_the_open_period_ends(config, probe_failures, steps) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("q", config, clock=clock)
    while breaker.state is CLOSED:
        fail(breaker)
    for _ in range(probe_failures):  # each failed probe starts a fresh period
        clock.advance(config.open_seconds)
        breaker.acquire().failure()
    opened_at = clock.now
    for step in steps:
        clock.advance(step)
        early = clock.now < opened_at + config.open_seconds
        try:
            breaker.acquire().release()
        except CircuitOpenError as error:
            assert early, f"refused at +{clock.now - opened_at}s, open_seconds={config.open_seconds}"
            assert error.retry_after == pytest.approx(opened_at + config.open_seconds - clock.now)
        else:
            assert not early, f"let through at +{clock.now - opened_at}s, open_seconds={config.open_seconds}"
