"""Circuit breaker for the calls to one upstream, used from one asyncio loop (no threads).

Written here because purgatory, aiobreaker, pybreaker and circuitbreaker (PyPI) only trip on
consecutive failures: none has an error-rate-over-a-window rule, an injectable clock and a hook.

CLOSED opens after ``failure_threshold`` consecutive failures, or when the window holds at least
``min_calls_in_window`` calls and a fraction >= ``error_rate_threshold`` of them failed. OPEN fails
fast for ``open_seconds``, then (checked lazily) turns HALF_OPEN: ``half_open_probes`` calls at a
time, ``success_to_close`` successes close it, a failure re-opens it. The window is a ring of ~1 s
buckets, so memory does not grow with the call rate; a call may leave it up to one bucket early.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass

HALF_OPEN_RETRY_AFTER = 1.0  # retry hint when every half-open probe slot is taken


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN  # faster


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5  # consecutive failures that open it
    error_rate_threshold: float = 0.5  # fraction of failed calls in the window that opens it
    window_seconds: float = 30.0
    min_calls_in_window: int = 20  # the rate rule needs at least this many calls in the window
    open_seconds: float = 10.0  # time spent open before half-open probes are allowed
    half_open_probes: int = 1  # concurrent probe calls allowed while half-open
    success_to_close: int = 1  # successful probes needed to close

    def __post_init__(self) -> None:
        if min(astuple(self)) <= 0:  # an error_rate_threshold above 1 turns the rate rule off
            raise ValueError(f"every breaker setting must be > 0: {self}")


@dataclass(frozen=True)
class Transition:
    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str  # "consecutive_failures=5", "error_rate=0.62 over 30s (31 calls)", "probe_failed", ...
    at: float  # the clock reading when the change was made


class CircuitOpenError(Exception):
    """The call must fail fast: the breaker is open, or every half-open probe slot is taken."""

    def __init__(self, breaker: str, retry_after: float) -> None:
        super().__init__(breaker, retry_after)
        self.breaker, self.retry_after = breaker, retry_after

    def __str__(self) -> str:  # formatted only when shown: failing fast stays cheap
        return f"circuit {self.breaker!r} is open; retry after {self.retry_after:.2f}s"


class Permit:
    """Leave for one call; the first outcome reported counts. As a context manager, unless an outcome
    was reported: an escaping ``Exception`` is a failure, a clean exit a success, and a
    ``BaseException`` (``CancelledError``: the client left, the upstream is not to blame) a release."""

    __slots__ = ("_breaker", "_generation", "_done")

    def __init__(self, breaker: CircuitBreaker, generation: int) -> None:
        self._breaker, self._generation, self._done = breaker, generation, False

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._succeeded(self._generation)

    def neutral(self) -> None:
        """The upstream refused the request (a 4xx): proof it is up, so it counts as a success."""
        self.success()

    def failure(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._failed(self._generation)

    def release(self) -> None:
        """No outcome (e.g. the client cancelled): frees a half-open probe slot, counts nothing."""
        if not self._done:
            self._done = True
            self._breaker._released(self._generation)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is None:
            self.success()
        elif issubclass(exc_type, Exception):
            self.failure()
        else:
            self.release()


class _ProbePermit(Permit):
    __slots__ = ()

    def __del__(self) -> None:  # a half-open probe dropped without an outcome gives its slot back
        self.release()


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings = BreakerSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name, self.settings = name, settings
        self._clock, self._on_transition = clock, on_transition
        self._state = _CLOSED
        self._generation = 0  # bumped by every transition: outcomes of older permits are ignored
        self._consecutive_failures = self._probes_in_flight = self._probe_successes = 0
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._buckets = max(1, min(math.ceil(settings.window_seconds), 600))
        self._bucket_width = settings.window_seconds / self._buckets
        self._reset_window(int(clock() // self._bucket_width))

    @property
    def state(self) -> BreakerState:
        return self._poll(self._clock())

    def acquire(self) -> Permit:
        """A permit for one call, or CircuitOpenError if the call must fail fast."""
        if self._state is _CLOSED:
            return Permit(self, self._generation)
        wait = self.retry_after()
        if wait > 0:
            raise CircuitOpenError(self.name, wait)
        self._probes_in_flight += 1  # HALF_OPEN with a free slot: this call is a probe
        return _ProbePermit(self, self._generation)

    def retry_after(self) -> float:
        """Seconds until a call would be let through: 0.0 if one would be now."""
        now = self._clock()
        state = self._poll(now)
        if state is _OPEN:
            return self._open_until - now
        full = state is _HALF_OPEN and self._probes_in_flight >= self.settings.half_open_probes
        return HALF_OPEN_RETRY_AFTER if full else 0.0

    def snapshot(self) -> dict[str, object]:
        """Plain values for /ready and metrics."""
        retry_after = self.retry_after()
        self._advance(int(self._clock() // self._bucket_width))
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "calls_in_window": self._window_calls,
            "failures_in_window": self._window_failures,
            "opened_at": self._opened_at,
            "probes_in_flight": self._probes_in_flight,
            "retry_after": retry_after,
        }

    def _succeeded(self, generation: int) -> None:
        if generation != self._generation:
            return
        if self._state is _CLOSED:
            self._consecutive_failures = 0
            self._record(self._clock(), failed=False)
            return
        self._probes_in_flight -= 1
        self._probe_successes += 1
        if self._probe_successes >= self.settings.success_to_close:
            self._transition(_CLOSED, "probe_succeeded", self._clock())

    def _failed(self, generation: int) -> None:
        if generation != self._generation:
            return
        now = self._clock()
        if self._state is _HALF_OPEN:
            self._transition(_OPEN, "probe_failed", now)
            return
        self._consecutive_failures += 1
        self._record(now, failed=True)
        s, calls, failures = self.settings, self._window_calls, self._window_failures
        if self._consecutive_failures >= s.failure_threshold:
            self._transition(_OPEN, f"consecutive_failures={self._consecutive_failures}", now)
        elif calls >= s.min_calls_in_window and failures >= s.error_rate_threshold * calls:
            reason = f"error_rate={failures / calls:.2f} over {s.window_seconds:g}s ({calls} calls)"
            self._transition(_OPEN, reason, now)

    def _released(self, generation: int) -> None:
        if generation == self._generation and self._state is _HALF_OPEN:
            self._probes_in_flight -= 1

    def _poll(self, now: float) -> BreakerState:
        """The state at ``now``: OPEN turns HALF_OPEN once ``open_seconds`` have elapsed."""
        if self._state is _OPEN and now >= self._open_until:
            self._transition(_HALF_OPEN, "open_timeout_elapsed", now)
        return self._state

    def _record(self, now: float, *, failed: bool) -> None:
        if now >= self._next_bucket_at:
            self._advance(int(now // self._bucket_width))
        self._calls[self._slot] += 1
        self._window_calls += 1
        if failed:
            self._failures[self._slot] += 1
            self._window_failures += 1

    def _advance(self, index: int) -> None:
        """Make bucket ``index`` current, emptying those that leave the window (none if time went back)."""
        n, calls, failures = self._buckets, self._calls, self._failures
        for i in range(max(self._bucket_index + 1, index - n + 1), index + 1):
            self._window_calls -= calls[i % n]
            self._window_failures -= failures[i % n]
            calls[i % n] = failures[i % n] = 0
        if index > self._bucket_index:
            self._bucket_index, self._slot = index, index % n
            self._next_bucket_at = (index + 1) * self._bucket_width

    def _reset_window(self, index: int) -> None:
        self._calls, self._failures = [0] * self._buckets, [0] * self._buckets
        self._window_calls = self._window_failures = 0
        self._bucket_index, self._slot = index, index % self._buckets
        self._next_bucket_at = (index + 1) * self._bucket_width

    def _transition(self, to_state: BreakerState, reason: str, now: float) -> None:
        """Change the state completely, then tell the hook: a hook that raises leaves it sound."""
        from_state, self._state = self._state, to_state
        self._generation += 1
        self._probes_in_flight = self._probe_successes = 0
        if to_state is _OPEN:
            self._opened_at, self._open_until = now, now + self.settings.open_seconds
        elif to_state is _CLOSED:
            self._opened_at, self._consecutive_failures = None, 0
            self._reset_window(int(now // self._bucket_width))
        if self._on_transition is not None:
            self._on_transition(Transition(self.name, from_state, to_state, reason, now))
