"""THE billing fold: plan, assignment, ledger and billing-cycle events in log order -> cycle bills.

One piece of code decides every bill. The billing view (``fila.projections.billing``) runs it
page by page with its state kept in tables; the auditor runs it from raw events alone with
:func:`recompute_cycle`. A bill depends only on the events and their log order, never on a
clock, so both always agree (the tests check it, and an independent computation too).

Rules (copied into the README):

- **Cycles.** Monthly, anchored on the assignment's ``starts_at`` (``fila.domain.cycles``); cycle
  ``k`` has the id ``cycle_id_for(assignment_id, k)``. The cycle a request belongs to is decided
  by the request's time (the ledger entry's ``at``), never by when it was recorded.
- **The activity clock.** The latest request time seen in the log (any key: every recorded
  request, billable or not) is the *watermark*. There is no cron: a cycle comes into existence
  when the watermark (or one of its own requests) reaches its start, and a cycle whose end the
  watermark has reached is marked *due for closing*; the projector then stores its ``Closed``
  event (``fila.services.billing.CycleCloser``), which opens the way for the next. An
  assignment's cycles exist from its start while it lasts: none starts at or after its
  ``ends_at`` or its cancellation (a started cycle is billed in full; suspension does not stop
  billing).
- **Closing.** A cycle is open until its ``Closed`` event in the log (written by the projector
  after activity past its end, or by an admin once its period has ended). Its figures are those
  of the requests recorded **before that event** in the log; they never change afterwards.
- **Late requests.** A request of a closed cycle recorded after its ``Closed`` event is billed as
  its own adjustment line ("late usage"): its price is what it would have added had it come in
  time (the difference of a shadow bill that takes the late requests), so the closed figures
  stay as they were and the sum over the lines is the amount owed.
- **Terms.** Overage is priced by the plan version the request recorded (``plan_id``,
  ``plan_version``). The base fee of a plan segment (the cycle start, or a plan change's
  ``effective_at``) uses the version of that plan in force at the segment's start, by the
  edits' times (its first version if it did not exist yet). A plan change applies to the open
  cycles it falls in or before; a closed cycle is never re-priced.
- **Billable requests.** Outcomes ``ok`` and ``client_disconnected`` that name an assignment and
  a plan; a cache hit (``cache == "hit"``) is billed as its plan says. A request the rules cannot
  bill (its plan version unknown, another currency) is counted in ``unbilled_requests``.
- **Admin adjustments** (``Adjusted`` events) are lines of their own; ``Billed`` and ``Paid`` only
  change the status (``Billed`` records the amount billed).

Idempotency is the log's: a retried request is one ledger entry (its id comes from the
Idempotency-Key), so it is billed once.
"""

from __future__ import annotations

import heapq
from functools import lru_cache, partial
from operator import attrgetter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fila.domain.billing import CycleBill, Terms, Usage
from fila.domain.billing_cycle import (BILLED, CLOSED, CYCLE_TOPICS, OPEN, PAID, TOPIC_ADJUSTED, TOPIC_BILLED,
                                       TOPIC_CLOSED, TOPIC_PAID, cycle_id_for)
from fila.domain.cycles import Period, cycle_by_index, cycle_index
from fila.domain.ledger import BILLABLE_OUTCOMES, RECORDED_TOPIC
from fila.domain.money import Money
from fila.domain.plans import terms_of
from fila.domain.time import iso, parse_iso

__all__ = ["TOPICS", "AssignmentState", "BillingFold", "CycleState", "PlanTerms", "figures", "recompute_cycle",
           "replay"]

PLAN_DEFINED, PLAN_UPDATED = "fila:Plan.Defined", "fila:Plan.Updated"
PLAN_TOPICS = (PLAN_DEFINED, PLAN_UPDATED, "fila:Plan.Activated", "fila:Plan.Deactivated", "fila:Plan.Deleted")
ASSIGNED, PLAN_CHANGED = "fila:Assignment.Assigned", "fila:Assignment.PlanChanged"
ASSIGNMENT_TOPICS = (ASSIGNED, PLAN_CHANGED, "fila:Assignment.Suspended", "fila:Assignment.Reactivated",
                     "fila:Assignment.Cancelled", "fila:Assignment.Updated")
TOPICS = (RECORDED_TOPIC, *PLAN_TOPICS, *ASSIGNMENT_TOPICS, *CYCLE_TOPICS)

_US = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LONG_AGO = datetime(1, 1, 1, tzinfo=UTC)
_NEVER = datetime.max.replace(tzinfo=UTC)


def micros(moment: datetime) -> int:
    """Epoch microseconds of an aware datetime (exact; used for ordering and SQL comparisons)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@lru_cache(maxsize=1 << 16)
def _cycle_id(assignment_id: str, index: int) -> str:
    """``str(cycle_id_for(assignment_id, index))``, remembered: the fold asks for it on every request."""
    return str(cycle_id_for(assignment_id, index))


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_iso(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _getter(state: Any) -> Callable[[str, Any], Any]:
    if isinstance(state, Mapping):
        return state.get
    return partial(getattr, state)   # get(name, default) -> getattr(state, name, default), in C


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# what the fold reads of a request, and the defaults it reads when a field is missing
_REQUEST = ("at", "outcome", "assignment_id", "plan_id", "plan_version", "prompt_tokens", "completion_tokens", "cache")
_REQUEST_DEFAULTS = (None, None, None, None, None, 0, 0, "none")
_request_fields = attrgetter(*_REQUEST)


def _request(state: Any) -> tuple:
    """A request's ``_REQUEST`` fields, ``state`` being a dict or an object (read as ``_getter`` reads)."""
    get = _getter(state)
    return tuple(get(name, default) for name, default in zip(_REQUEST, _REQUEST_DEFAULTS))


# -- plan terms by version ------------------------------------------------------------------------


@dataclass(slots=True)
class PlanVersion:
    version: int
    at: datetime
    slug: str
    terms: dict[str, Any]


class PlanTerms:
    """Every version of every plan: the terms of a version, or in force at a moment."""

    def __init__(self) -> None:
        self.versions: dict[str, list[PlanVersion]] = {}
        self._terms: dict[tuple[str, int], Terms | None] = {}
        self._by_version: dict[tuple[str, int], Terms | None] = {}   # terms_of_version, until the next add

    def add(self, plan_id: str, version: int, at: datetime, slug: str, terms: dict[str, Any]) -> PlanVersion:
        record = PlanVersion(version, at, slug, terms)
        self._by_version.clear()
        versions = self.versions.setdefault(plan_id, [])
        versions.append(record)
        versions.sort(key=lambda v: v.version)
        return record

    def latest(self, plan_id: str) -> PlanVersion | None:
        versions = self.versions.get(plan_id)
        return versions[-1] if versions else None

    def _of(self, plan_id: str, record: PlanVersion | None, version: int) -> Terms | None:
        if record is None:
            return None
        key = (plan_id, version)
        if key not in self._terms:
            try:
                self._terms[key] = terms_of(plan_id, record.slug, version, record.terms)
            except (KeyError, TypeError, ValueError):
                self._terms[key] = None
        return self._terms[key]

    def terms_of_version(self, plan_id: str, version: int) -> Terms | None:
        """The terms of ``version`` (the latest version at or below it that is known)."""
        key = (plan_id, version)
        if key in self._by_version:
            return self._by_version[key]
        chosen = None
        for record in self.versions.get(plan_id, ()):
            if record.version <= version:
                chosen = record
        terms = self._by_version[key] = self._of(plan_id, chosen, chosen.version) if chosen else None
        return terms

    def terms_at(self, plan_id: str, moment: datetime) -> Terms | None:
        """The terms of the version in force at ``moment`` by edit time (the first version before it existed)."""
        versions = self.versions.get(plan_id)
        if not versions:
            return None
        chosen = versions[0]
        for record in versions:
            if record.at <= moment:
                chosen = record
        return self._of(plan_id, chosen, chosen.version)


# -- state ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class AssignmentState:
    id: str
    api_key_id: str
    starts_at: datetime
    ends_at: datetime | None
    status: str = "active"
    cancelled_at: datetime | None = None
    plan_history: list[tuple[str, datetime]] = field(default_factory=list)
    last_index: int = -1            # the latest cycle that exists (-1: none yet)
    updated_position: int = 0

    def plan_at(self, moment: datetime) -> str:
        current = self.plan_history[0][0]
        for plan_id, effective_at in self.plan_history:
            if effective_at <= moment:
                current = plan_id
        return current

    def next_start(self) -> datetime | None:
        """When the next cycle starts, if the assignment lasts that long (None: it ends before)."""
        live = self.last_live_index()
        if live is not None and self.last_index >= live:
            return None
        return cycle_by_index(self.starts_at, self.last_index + 1).start

    def last_live_index(self) -> int | None:
        """The last cycle that starts before the assignment's end (None: no end; -1: no cycle)."""
        bounds = [b for b in (self.ends_at, self.cancelled_at) if b is not None]
        if not bounds:
            return None
        bound = min(bounds)
        return -1 if bound <= self.starts_at else cycle_index(self.starts_at, bound - _US)


@dataclass(slots=True)
class CycleState:
    id: str
    assignment_id: str
    api_key_id: str
    index: int
    period: Period
    bill: CycleBill | None          # None when the fold does not track this cycle's money
    status: str = OPEN
    shadow: CycleBill | None = None  # prices late requests (see the module docstring)
    close_requested_position: int | None = None
    closed_position: int | None = None
    closed_at: str | None = None
    closed_by: str | None = None
    billed_at: str | None = None
    billed_by: str | None = None
    billed_minor: int | None = None
    paid_at: str | None = None
    paid_by: str | None = None
    paid_reference: str | None = None
    late_requests: int = 0
    unbilled_requests: int = 0
    opened_position: int = 0
    updated_position: int = 0


def figures(cycle: CycleState) -> dict[str, Any]:
    """The figures of a cycle's bill: counters, the plan in force at its end, amounts per kind of line."""
    bill = cycle.bill
    assert bill is not None, "an untracked cycle has no figures"
    sums = {"base": 0, "overage_input": 0, "overage_output": 0, "adjustment": 0}
    for line in bill.lines():
        sums[line.kind] += line.amount.amount_minor
    segments = bill.segments()
    last = segments[-1][1] if segments else None
    return {
        "plan_id": last.plan_id if last else None, "plan_slug": last.plan_slug if last else None,
        "plan_version": last.plan_version if last else None,
        "requests": bill.requests, "cache_hits": bill.cache_hits, "input_tokens": bill.input_tokens,
        "output_tokens": bill.output_tokens, "billable_input_tokens": bill.billable_input_tokens,
        "billable_output_tokens": bill.billable_output_tokens, "included_tokens": bill.included_tokens,
        "included_used": bill.included_used, "overage_input_tokens": bill.overage_input_tokens,
        "overage_output_tokens": bill.overage_output_tokens,
        "overage_tokens": bill.overage_input_tokens + bill.overage_output_tokens,
        "base_minor": sums["base"], "overage_input_minor": sums["overage_input"],
        "overage_output_minor": sums["overage_output"], "adjustments_minor": sums["adjustment"],
        "total_minor": sum(sums.values()), "currency": bill.currency,
    }


@dataclass(slots=True)
class _Run:
    """Consecutive requests of one assignment, plan version and cycle, tallied together."""

    key: tuple[str, str, int]       # assignment id, plan id, plan version
    cycle: CycleState
    terms: Terms
    low: datetime                   # the request times the run takes: low <= at < high
    high: datetime
    requests: list[tuple[int, int, bool]] = field(default_factory=list)
    position: int = 0               # the last request's


# -- the fold ------------------------------------------------------------------------------------------


class BillingFold:
    """Applies events in log order; see the module docstring for the rules.

    The state lives in dicts. A subclass may keep it elsewhere by overriding ``_load_assignment``
    and ``_load_cycle`` (asked once per id, on a miss) and ``_mark`` (told what changed), and by
    registering every open cycle the watermark can make due (``_push_due``) and every assignment
    whose next cycle it can make start (``_push_next``) before the watermark reaches them
    (``_hold``), and the open cycles of an assignment before a plan change names it (``_register``).
    """

    def __init__(self, *, track: Callable[[str], bool] | None = None,
                 on_contribution: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.plans = PlanTerms()
        self.assignments: dict[str, AssignmentState] = {}
        self.cycles: dict[str, CycleState] = {}
        self.by_assignment: dict[str, dict[int, CycleState]] = {}
        self.watermark: datetime | None = None
        self._missing: set[str] = set()
        self._due: list[tuple[int, str]] = []        # heap of (end us, cycle id): open, not requested
        self._next: list[tuple[int, str]] = []       # heap of (next cycle's start us, assignment id)
        self._spans: dict[str, tuple[datetime, datetime, int, datetime]] = {}   # see _index_of
        # below this activity clock the fold holds every open cycle that can become due and every
        # assignment whose next cycle can start (a subclass loading its state lazily keeps it
        # lower and raises it in _hold)
        self._held_until = _NEVER
        self._track = track
        self._contribute = on_contribution
        self._handlers: dict[str, Callable[[int, str, Any, int | None], None]] = {
            RECORDED_TOPIC: self._recorded,
            ASSIGNED: self._assigned, PLAN_CHANGED: self._plan_changed,
            "fila:Assignment.Suspended": self._assignment_status("suspended"),
            "fila:Assignment.Reactivated": self._assignment_status("active"),
            "fila:Assignment.Cancelled": self._cancelled, "fila:Assignment.Updated": self._assignment_updated,
            TOPIC_CLOSED: self._closed, TOPIC_BILLED: self._billed, TOPIC_PAID: self._paid,
            TOPIC_ADJUSTED: self._adjusted,
            PLAN_DEFINED: self._plan_defined,
            **{topic: self._plan_versioned for topic in PLAN_TOPICS if topic != PLAN_DEFINED},
        }

    # -- storage hooks -------------------------------------------------------------------------------

    def _load_assignment(self, assignment_id: str) -> AssignmentState | None:
        return None

    def _load_cycle(self, cycle_id: str) -> CycleState | None:
        return None

    def _mark(self, obj: AssignmentState | CycleState) -> None:
        pass

    def _hold(self, clock: datetime) -> None:
        """Register what the activity clock can make due or start up to past ``clock`` (``_push_due``,
        ``_push_next``) and raise ``_held_until`` above ``clock``. The dicts hold everything."""
        self._held_until = _NEVER

    def assignment(self, assignment_id: str) -> AssignmentState | None:
        found = self.assignments.get(assignment_id)
        if found is None and assignment_id not in self._missing:
            found = self._load_assignment(assignment_id)
            if found is None:
                self._missing.add(assignment_id)
            else:
                self.assignments[assignment_id] = found
        return found

    def cycle(self, cycle_id: str) -> CycleState | None:
        found = self.cycles.get(cycle_id)
        if found is None and cycle_id not in self._missing:
            found = self._load_cycle(cycle_id)
            if found is None:
                self._missing.add(cycle_id)
            else:
                self._register(found)
        return found

    def _register(self, cycle: CycleState) -> CycleState:
        existing = self.cycles.get(cycle.id)
        if existing is not None:
            return existing
        self.cycles[cycle.id] = cycle
        self._missing.discard(cycle.id)
        self.by_assignment.setdefault(cycle.assignment_id, {})[cycle.index] = cycle
        return cycle

    def _push_due(self, cycle: CycleState) -> None:
        if cycle.status == OPEN and cycle.close_requested_position is None:
            heapq.heappush(self._due, (micros(cycle.period.end), cycle.id))

    def _push_next(self, assignment: AssignmentState) -> None:
        upcoming = assignment.next_start()
        if upcoming is not None:
            heapq.heappush(self._next, (micros(upcoming), assignment.id))

    def tracked(self, cycle_id: str) -> bool:
        return self._track is None or self._track(cycle_id)

    def _note(self, cycle: CycleState, item: dict[str, Any]) -> None:
        if self._contribute is not None and cycle.bill is not None:
            self._contribute(cycle.id, item)

    def _touch(self, obj: AssignmentState | CycleState, position: int) -> None:
        obj.updated_position = position
        self._mark(obj)

    # -- applying --------------------------------------------------------------------------------------

    def apply(self, position: int, topic: str, originator_id: str, state: Any, version: int | None = None) -> None:
        """Apply one event (its state as a dict, or an object with the same attributes)."""
        handler = self._handlers.get(topic)
        if handler is not None:
            handler(position, str(originator_id), state, version)

    def apply_many(self, events: Iterable[tuple[int, str, str, Any, int | None]]) -> None:
        """``apply`` each ``(position, topic, originator_id, state, version)`` in order: the same state.

        Faster over the log's common case, runs of requests: consecutive requests billed to one
        open cycle under one plan version are tallied together (``CycleBill.tally_many``) while the
        activity clock stays short of the next cycle end or start it waits for; requests that bill
        nothing only move the clock. Anything else (a first request of a cycle, a plan change, a
        request that makes a cycle due ...) goes through ``apply``. Contributions need ``apply``.
        """
        if self._contribute is not None:
            for event in events:
                self.apply(*event)
            return
        request_time = self._request_time
        run: _Run | None = None
        requests: list[tuple[int, int, bool]] = []     # the run's
        low = high = _NEVER
        limit = self._clock_limit()
        watermark = self.watermark                      # self.watermark, kept here until apply needs it
        for position, topic, entry_id, state, version in events:
            if topic == RECORDED_TOPIC:
                try:
                    fields = _request_fields(state)
                except AttributeError:                 # a dict, or an object missing some
                    fields = _request(state)
                text, outcome, assignment_id, plan_id, plan_version, prompt, completion, cache = fields
                at = request_time(text)
                if at is None:
                    continue                           # apply ignores it too
                clock = at if watermark is None or at > watermark else watermark
                if clock < limit:                      # else cycles become due or start: apply, one by one
                    if not (outcome in BILLABLE_OUTCOMES and assignment_id and plan_id):
                        watermark = clock
                        continue
                    if not isinstance(plan_version, int):
                        plan_version = 1
                    if not (run is not None and low <= at < high and entry_id and assignment_id == run.key[0]
                            and plan_id == run.key[1] and plan_version == run.key[2]):
                        if run is not None:
                            self._tally(run)
                        run = self._run((assignment_id, plan_id, plan_version), at) if entry_id else None
                        if run is not None:
                            requests, low, high = run.requests, run.low, run.high
                    if run is not None:
                        watermark = clock
                        requests.append((prompt if type(prompt) is int and prompt > 0 else _count(prompt),
                                         completion if type(completion) is int and completion > 0
                                         else _count(completion), cache == "hit"))
                        run.position = position
                        continue
            if run is not None:
                self._tally(run)
                run = None
            self.watermark = watermark
            self.apply(position, topic, entry_id, state, version)
            watermark = self.watermark
            limit = self._clock_limit()
        if run is not None:
            self._tally(run)
        self.watermark = watermark

    def _clock_limit(self) -> datetime:
        """The earliest activity clock at which ``_recorded`` has more to do than bill: ``_close_due``
        has work, or ``_hold`` (``_NEVER``: none)."""
        tops = [heap[0][0] for heap in (self._due, self._next) if heap]
        return min(_EPOCH + min(tops) * _US, self._held_until) if tops else self._held_until

    def _run(self, key: tuple[str, str, int], at: datetime) -> _Run | None:
        """A run of requests billed as ``_bill`` would bill a request of ``key`` at ``at``, if ``_bill``
        would simply tally it into an open cycle that exists (else None: ``apply`` takes it)."""
        assignment_id, plan_id, version = key
        assignment = self.assignment(assignment_id)
        if assignment is None or at < assignment.starts_at:
            return None
        index = self._index_of(assignment, at)
        if index > assignment.last_index:
            return None
        cycle = self.cycle(_cycle_id(assignment_id, index))
        if cycle is None or cycle.status != OPEN or cycle.bill is None:
            return None
        terms = self.plans.terms_of_version(plan_id, version)
        if terms is None:
            return None
        span = self._spans[assignment_id]        # the requests _index_of puts in this cycle, and tally takes
        low, high = max(span[0], cycle.period.start), min(span[1], cycle.period.end)
        return _Run(key, cycle, terms, low, high) if low <= at < high else None

    def _tally(self, run: _Run) -> None:
        cycle = run.cycle
        assert cycle.bill is not None
        try:
            cycle.bill.tally_many(run.requests, run.terms)
        except ValueError:                       # as _bill: every one of them unbilled
            cycle.unbilled_requests += len(run.requests)
        self._touch(cycle, run.position)

    # plans

    def _plan_defined(self, position: int, plan_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        if self.plans.latest(plan_id) is None and isinstance(get("terms", None), Mapping):
            self.plans.add(plan_id, version or 1, _time(get("at", None)) or _LONG_AGO, get("slug", "") or "?",
                           dict(get("terms", None)))

    def _plan_versioned(self, position: int, plan_id: str, state: Any, version: int | None) -> None:
        """Updated (terms change), Activated, Deactivated, Deleted: a new version of the plan."""
        get = _getter(state)
        latest = self.plans.latest(plan_id)
        if latest is None:
            return
        changes = get("changes", None)
        terms = {**latest.terms, **changes} if isinstance(changes, Mapping) else latest.terms
        self.plans.add(plan_id, version or latest.version + 1, _time(get("at", None)) or latest.at, latest.slug, terms)

    # assignments

    def _assigned(self, position: int, assignment_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        starts_at = _time(get("starts_at", None))
        if starts_at is None or assignment_id in self.assignments:
            return
        assignment = AssignmentState(assignment_id, get("api_key_id", ""), starts_at, _time(get("ends_at", None)),
                                     plan_history=[(get("plan_id", ""), starts_at)])
        self.assignments[assignment_id] = assignment
        self._missing.discard(assignment_id)
        self._touch(assignment, position)
        self._advance(assignment, position)

    def _plan_changed(self, position: int, assignment_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        assignment = self.assignment(assignment_id)
        effective_at = _time(get("effective_at", None))
        plan_id = get("to_plan_id", None)
        if assignment is None or effective_at is None or not plan_id:
            return
        assignment.plan_history.append((plan_id, effective_at))
        self._touch(assignment, position)
        for cycle in sorted(self.by_assignment.get(assignment_id, {}).values(), key=lambda c: c.index):
            if cycle.status != OPEN or cycle.period.end <= effective_at:
                continue
            if cycle.bill is not None:
                terms = self.plans.terms_at(plan_id, max(effective_at, cycle.period.start))
                applied = terms is not None
                if terms is not None:
                    try:
                        cycle.bill.set_terms(terms, effective_at)
                    except ValueError:
                        applied = False
                self._note(cycle, {"kind": "plan_change", "position": position, "plan_id": plan_id,
                                   "plan_version": terms.plan_version if terms else None,
                                   "effective_at": iso(effective_at), "applied": applied})
            self._touch(cycle, position)

    def _assignment_status(self, status: str) -> Callable[[int, str, Any, int | None], None]:
        def handle(position: int, assignment_id: str, state: Any, version: int | None) -> None:
            assignment = self.assignment(assignment_id)
            if assignment is not None:
                assignment.status = status
                self._touch(assignment, position)
        return handle

    def _cancelled(self, position: int, assignment_id: str, state: Any, version: int | None) -> None:
        assignment = self.assignment(assignment_id)
        if assignment is not None:
            assignment.status = "cancelled"
            assignment.cancelled_at = _time(_getter(state)("at", None))
            self._touch(assignment, position)

    def _assignment_updated(self, position: int, assignment_id: str, state: Any, version: int | None) -> None:
        assignment = self.assignment(assignment_id)
        if assignment is not None:
            assignment.ends_at = _time(_getter(state)("ends_at", None))
            self._touch(assignment, position)
            self._push_next(assignment)     # a later end may let more cycles start

    # cycles come into existence

    def _advance(self, assignment: AssignmentState, position: int) -> None:
        """Bring ``assignment``'s cycles up to the one holding the watermark (within its life)."""
        if self.watermark is None or self.watermark < assignment.starts_at:
            self._push_next(assignment)
            return
        target = cycle_index(assignment.starts_at, self.watermark)
        live = assignment.last_live_index()
        if live is not None:
            target = min(target, live)
        if target > assignment.last_index:
            self._ensure(assignment, target, position)

    def _ensure(self, assignment: AssignmentState, upto: int, position: int) -> None:
        for index in range(assignment.last_index + 1, upto + 1):
            self._open(assignment, index, position)
        if upto > assignment.last_index:
            assignment.last_index = upto
            self._touch(assignment, position)
            self._push_next(assignment)

    def _open(self, assignment: AssignmentState, index: int, position: int) -> CycleState:
        cycle_id = _cycle_id(assignment.id, index)
        existing = self.cycle(cycle_id)
        if existing is not None:
            return existing
        period = cycle_by_index(assignment.starts_at, index)
        bill = None
        if self.tracked(cycle_id):
            first = self.plans.terms_at(assignment.plan_at(period.start), period.start)
            bill = CycleBill(period, first.currency if first else "USD")
            changes = [(first, period.start)] + [
                (self.plans.terms_at(plan_id, at), at) for plan_id, at in assignment.plan_history[1:]
                if period.start < at < period.end]
            for terms, at in changes:
                if terms is not None:
                    try:
                        bill.set_terms(terms, at)
                    except ValueError:
                        pass
        cycle = self._register(CycleState(cycle_id, assignment.id, assignment.api_key_id, index, period, bill,
                                          opened_position=position))
        self._touch(cycle, position)
        if bill is not None:
            for segment, terms in bill.segments():
                self._note(cycle, {"kind": "segment", "position": position, "plan_id": terms.plan_id,
                                   "plan_version": terms.plan_version, "starts_at": iso(segment.start)})
        self._push_due(cycle)
        return cycle

    def _close_due(self, position: int) -> None:
        """Mark every open cycle the watermark has passed as due for closing; open what follows."""
        if self.watermark is None:
            return
        now = micros(self.watermark)
        while self._next and self._next[0][0] <= now:
            upcoming, assignment_id = heapq.heappop(self._next)
            assignment = self.assignment(assignment_id)
            if assignment is None:
                continue
            current = assignment.next_start()
            if current is not None and micros(current) == upcoming:   # else a stale entry: skip it
                self._advance(assignment, position)
        while self._due and self._due[0][0] <= now:
            _, cycle_id = heapq.heappop(self._due)
            cycle = self.cycle(cycle_id)
            if cycle is None or cycle.status != OPEN or cycle.close_requested_position is not None:
                continue
            cycle.close_requested_position = position
            self._touch(cycle, position)

    # requests

    def _recorded(self, position: int, entry_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        at = self._request_time(get("at", None))
        if at is None:
            return
        if self.watermark is None or at > self.watermark:
            self.watermark = at
        if self.watermark >= self._held_until:
            self._hold(self.watermark)
        assignment_id, plan_id = get("assignment_id", None), get("plan_id", None)
        if get("outcome", None) in BILLABLE_OUTCOMES and assignment_id and plan_id:
            self._bill(position, entry_id, at, get, assignment_id, plan_id)
        self._close_due(position)

    def _request_time(self, text: Any) -> datetime | None:
        """A ``Recorded`` event's ``at`` as a UTC datetime (None: not a time)."""
        return _time(text)

    def _index_of(self, assignment: AssignmentState, at: datetime) -> int:
        """``cycle_index(assignment.starts_at, at)``, remembering the last cycle's bounds per assignment
        (requests come nearly in time order, so this is a comparison, not calendar arithmetic)."""
        span = self._spans.get(assignment.id)
        if span is not None and span[0] <= at < span[1] and span[3] == assignment.starts_at:
            return span[2]
        index = cycle_index(assignment.starts_at, at)
        period = cycle_by_index(assignment.starts_at, index)
        self._spans[assignment.id] = (period.start, period.end, index, assignment.starts_at)
        return index

    def cycle_id_at(self, assignment: AssignmentState, at: datetime) -> str:
        """The id of ``assignment``'s cycle holding ``at`` (at or after its start)."""
        return _cycle_id(assignment.id, self._index_of(assignment, at))

    def _bill(self, position: int, entry_id: str, at: datetime, get: Callable[[str, Any], Any],
              assignment_id: str, plan_id: str) -> None:
        assignment = self.assignment(assignment_id)
        if assignment is None or at < assignment.starts_at:
            return
        index = self._index_of(assignment, at)
        if index > assignment.last_index:
            live = assignment.last_live_index()
            self._ensure(assignment, index if live is None else min(index, live), position)
        cycle = self.cycle(_cycle_id(assignment_id, index))
        if cycle is None:    # a request after the assignment's end: billed in its own cycle all the same
            cycle = self._open(assignment, index, position)
        self._touch(cycle, position)
        if cycle.bill is None:
            return
        version = get("plan_version", None)
        terms = self.plans.terms_of_version(plan_id, version if isinstance(version, int) else 1)
        item: dict[str, Any] = {} if self._contribute is None else {
            "kind": "usage" if cycle.status == OPEN else "late_usage", "position": position, "entry_id": entry_id,
            "at": iso(at), "plan_id": plan_id, "plan_version": version}
        input_tokens, output_tokens = _count(get("prompt_tokens", 0)), _count(get("completion_tokens", 0))
        cache_hit = get("cache", "none") == "hit"
        try:
            if terms is None:
                raise ValueError(f"plan {plan_id} version {version} is unknown")
            if not entry_id:
                raise ValueError("entry_id must not be empty")
            if cycle.status == OPEN:   # what Usage checks holds here: ``at`` is UTC, the counts are counts
                figures = cycle.bill.tally(at, input_tokens, output_tokens, cache_hit, terms)
                if self._contribute is None:    # the view: no outcome needed
                    return
                bill_in, bill_out, inc_in, inc_out, _ = figures
            else:
                outcome = self._late(cycle, Usage(entry_id, at, input_tokens, output_tokens, cache_hit), terms)
                bill_in, bill_out = outcome.billable_input_tokens, outcome.billable_output_tokens
                inc_in, inc_out = outcome.included_input_tokens, outcome.included_output_tokens
        except ValueError as error:
            cycle.unbilled_requests += 1
            self._note(cycle, dict(item, kind="unbilled", reason=str(error)))
            return
        if self._contribute is None:
            return
        over_in, over_out = bill_in - inc_in, bill_out - inc_out
        item.update(input_tokens=input_tokens, output_tokens=output_tokens, cache_hit=cache_hit,
                    billable_input_tokens=bill_in, billable_output_tokens=bill_out,
                    included_input_tokens=inc_in, included_output_tokens=inc_out,
                    overage_input_tokens=over_in, overage_output_tokens=over_out,
                    overage_input_cost=str(terms.input_price.cost(over_in)),
                    overage_output_cost=str(terms.output_price.cost(over_out)))
        self._note(cycle, item)

    def _late(self, cycle: CycleState, usage: Usage, terms: Terms) -> Any:
        assert cycle.bill is not None
        if cycle.shadow is None:
            cycle.shadow = CycleBill.from_state(cycle.bill.to_state())
        before = cycle.shadow.total()
        outcome = cycle.shadow.add(usage, terms)
        amount = cycle.shadow.total() - before
        cycle.bill.adjust(amount, f"late usage: request {usage.entry_id} of {iso(usage.at)} "
                                  f"({usage.input_tokens} input + {usage.output_tokens} output tokens"
                                  f"{', cache hit' if usage.cache_hit else ''}) recorded after the cycle closed",
                          usage.at)
        cycle.late_requests += 1
        return outcome

    # the cycle's own events

    def _cycle_of_event(self, cycle_id: str, get: Callable[[str, Any], Any], position: int) -> CycleState | None:
        cycle = self.cycle(cycle_id)
        if cycle is None:   # closed before anything made it exist here: make it (and those before it)
            assignment = self.assignment(get("assignment_id", None) or "")
            index = get("cycle_index", None)
            if assignment is not None and isinstance(index, int) and index > assignment.last_index:
                self._ensure(assignment, index, position)
                cycle = self.cycle(cycle_id)
        return cycle

    def _closed(self, position: int, cycle_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        cycle = self._cycle_of_event(cycle_id, get, position)
        if cycle is None or cycle.status != OPEN:
            return
        cycle.status, cycle.closed_position = CLOSED, position
        cycle.closed_at, cycle.closed_by = get("at", None), get("by", None)
        self._touch(cycle, position)
        self._note(cycle, {"kind": "closed", "position": position, "by": cycle.closed_by, "at": cycle.closed_at})

    def _billed(self, position: int, cycle_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        cycle = self.cycle(cycle_id)
        if cycle is None:
            return
        cycle.status, cycle.billed_at, cycle.billed_by = BILLED, get("at", None), get("by", None)
        cycle.billed_minor = get("amount_minor", None)
        self._touch(cycle, position)
        self._note(cycle, {"kind": "billed", "position": position, "by": cycle.billed_by, "at": cycle.billed_at,
                           "amount_minor": cycle.billed_minor})

    def _paid(self, position: int, cycle_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        cycle = self.cycle(cycle_id)
        if cycle is None:
            return
        cycle.status, cycle.paid_at, cycle.paid_by = PAID, get("at", None), get("by", None)
        cycle.paid_reference = get("reference", None)
        self._touch(cycle, position)
        self._note(cycle, {"kind": "paid", "position": position, "by": cycle.paid_by, "at": cycle.paid_at})

    def _adjusted(self, position: int, cycle_id: str, state: Any, version: int | None) -> None:
        get = _getter(state)
        cycle = self.cycle(cycle_id)
        at = _time(get("at", None))
        if cycle is None or at is None:
            return
        self._touch(cycle, position)
        if cycle.bill is None:
            return
        item = {"kind": "adjustment", "position": position, "amount_minor": get("amount_minor", None),
                "currency": get("currency", None), "reason": get("reason", None), "by": get("by", None)}
        try:
            cycle.bill.adjust(Money(get("amount_minor", None), get("currency", None)),
                              f"{get('reason', '')} (adjustment by {get('by', '?')})", at)
        except ValueError as error:
            item = dict(item, kind="adjustment_refused", error=str(error))
        self._note(cycle, item)


# -- the auditor's entry points ----------------------------------------------------------------------


def replay(events: Iterable[tuple], *, track: Callable[[str], bool] | None = None,
           on_contribution: Callable[[str, dict[str, Any]], None] | None = None) -> BillingFold:
    """Fold ``events`` (see :func:`recompute_cycle`) from nothing; the fold holds every cycle."""
    fold = BillingFold(track=track, on_contribution=on_contribution)
    for item in events:
        position, topic, originator_id, state = item[0], item[1], item[2], item[3]
        fold.apply(position, topic, str(originator_id), state, item[4] if len(item) > 4 else None)
    return fold


def recompute_cycle(events: Iterable[tuple], cycle_id: Any) -> tuple[CycleBill, list[dict[str, Any]]]:
    """One cycle's bill derived from raw events only, by the same rules as the billing view.

    ``events``: ``(position, topic, originator_id, state)`` tuples, optionally with a fifth item,
    the originator version, in log order (notification id order), where ``state`` is the stored
    event's decoded JSON (a dict). Give it every event of the topics in :data:`TOPICS`
    (``fila:LedgerEntry.Recorded``, ``fila:Plan.*``, ``fila:Assignment.*``, ``fila:BillingCycle.*``);
    other topics are ignored. Every ``Recorded`` event matters, not only this cycle's: the
    activity clock (the latest request time) decides when cycles come into existence and are
    due for closing. Without versions, a plan's version is counted from its events.

    Returns the cycle's ``CycleBill`` (``lines()``, ``total()``, counters; the same as the view's
    row, see :func:`figures`) and its contributions in log order: one dict per event that touched
    it, ``kind`` one of ``segment``, ``plan_change``, ``usage``, ``late_usage``, ``unbilled``,
    ``adjustment``, ``adjustment_refused``, ``closed``, ``billed``, ``paid``, each with its
    ``position`` (usage items carry the entry id, tokens, billable / included / overage tokens and
    exact costs as decimal strings). Raises ``KeyError`` if the events never make the cycle exist.
    """
    target = str(cycle_id)
    contributions: list[dict[str, Any]] = []

    def collect(cid: str, item: dict[str, Any]) -> None:
        if cid == target:
            contributions.append(item)

    fold = replay(events, track=lambda cid: cid == target, on_contribution=collect)
    cycle = fold.cycles.get(target)
    if cycle is None or cycle.bill is None:
        raise KeyError(f"no billing cycle {target} in these events")
    return cycle.bill, contributions
