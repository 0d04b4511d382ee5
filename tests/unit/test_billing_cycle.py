"""Billing cycles: the status rules of the aggregate, closing and late requests, and the one fold.

The property test checks three computations of the same bill against each other for random
histories (requests, plan changes, plan edits, cache hits, a close and late requests): the
billing view built page by page into SQLite (random page sizes), ``recompute_cycle`` from the raw
events, and an independent, naive computation in this file (``Model``) written from the rules in
the README with ``Fraction`` arithmetic. No server: the event store is the library's in-memory one.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from eventsourcing.persistence import IntegrityError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fila.adapters.eventstore import TRANSCODER_TOPIC, FilaStore
from fila.domain.billing import CycleBill
from fila.domain.billing_cycle import BillingCycle, cycle_id_for
from fila.domain.billing_fold import TOPICS, BillingFold, figures, recompute_cycle, replay
from fila.domain.cycles import cycle_by_index, cycle_index
from fila.domain.errors import Conflict, InvalidRequest
from fila.domain.ledger import RECORDED_TOPIC, LedgerEntry
from fila.domain.plans import Assignment, Plan, assignment_id_for
from fila.domain.time import iso
from fila.projections.billing import CYCLE_COLUMNS, BillingRecorded, BillingView, cycle_row
from fila.projections.db import SqliteDatabase
from fila.projections.runner import Projector

ANCHOR = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)       # cycle 0: Jan 31 -> Feb 28 (a clamped month)
CYCLE0 = cycle_by_index(ANCHOR, 0)
BASIC = {"name": "Basic", "monthly_price_minor": 1_900, "included_tokens": 100, "input_price_per_million": "200",
         "output_price_per_million": "800", "cache_hit_billing": "fraction", "cache_hit_fraction": "0.5"}


class Log:
    """An in-memory event store and helpers that write through the real aggregates."""

    def __init__(self) -> None:
        self.store = FilaStore(env={"TRANSCODER_TOPIC": TRANSCODER_TOPIC})
        self.key = f"key-{uuid.uuid4().hex[:8]}"
        self.plans: dict[str, Plan] = {}

    def save(self, *aggregates: Any) -> int:
        return self.store.save(*aggregates)[-1].notification.id

    def plan(self, slug: str, terms: dict[str, Any], at: datetime = ANCHOR - timedelta(days=1)) -> Plan:
        plan = Plan.define(slug, terms, at)
        self.save(plan)
        self.plans[slug] = plan
        return plan

    def assign(self, plan: Plan, starts_at: datetime = ANCHOR) -> Assignment:
        assignment = Assignment.assign(assignment_id_for(self.key, 0), self.key, str(plan.id), starts_at, None,
                                       starts_at)
        self.save(assignment)
        return assignment

    def request(self, assignment: Assignment, plan: Plan, at: datetime, prompt: int, completion: int, *,
                hit: bool = False, outcome: str = "ok", entry_id: uuid.UUID | None = None) -> int:
        entry = LedgerEntry(id=entry_id or uuid.uuid4(), api_key_id=self.key, at=iso(at), outcome=outcome,
                            status=200, model="m", prompt_tokens=prompt, completion_tokens=completion,
                            total_tokens=prompt + completion, cache="hit" if hit else "miss", plan_id=str(plan.id),
                            plan_version=plan.version, assignment_id=str(assignment.id))
        return self.save(entry)

    def events(self) -> list[tuple]:
        notes = self.store.recorder.select_notifications(start=0, limit=1_000_000, topics=list(TOPICS),
                                                         inclusive_of_start=False)
        return [(n.id, n.topic, str(n.originator_id), msgspec.json.decode(n.state), n.originator_version)
                for n in notes]


def project(log: Log, page: int) -> dict[str, dict[str, Any]]:
    """The billing view built page by page into a fresh SQLite file: its rows by cycle id."""
    with tempfile.TemporaryDirectory() as folder:
        db = SqliteDatabase(f"sqlite:///{folder}/views.db")
        projector = Projector(db, log.store.recorder, [BillingView()], page=page)
        try:
            projector.catch_up()
            rows = db.read(f"SELECT {', '.join(CYCLE_COLUMNS)} FROM billing_cycles")
        finally:
            projector.close()
            db.close()
    return {row[0]: dict(zip(CYCLE_COLUMNS, row)) for row in rows}


def bill_of(row: dict[str, Any]) -> CycleBill:
    return CycleBill.from_state(msgspec.json.decode(row["state"]))


# -- the aggregate's rules -------------------------------------------------------------------------------


def closed_cycle(now: datetime = CYCLE0.end) -> BillingCycle:
    return BillingCycle.close("a-1", "k-1", 0, CYCLE0.start, CYCLE0.end, by="fila", now=now)


def test_a_cycle_closes_only_once_its_period_has_ended():
    with pytest.raises(Conflict) as refused:
        closed_cycle(now=CYCLE0.end - timedelta(microseconds=1))
    assert refused.value.code == "invalid_transition"
    cycle = closed_cycle()
    assert (cycle.status, cycle.closed_by, cycle.closed_at) == ("closed", "fila", iso(CYCLE0.end))
    assert cycle.id == cycle_id_for("a-1", 0) != cycle_id_for("a-1", 1) != cycle_id_for("a-2", 0)


def test_two_closers_collide_in_the_store_instead_of_closing_twice():
    store = FilaStore(env={"TRANSCODER_TOPIC": TRANSCODER_TOPIC})
    store.save(closed_cycle())
    with pytest.raises(IntegrityError):
        store.save(BillingCycle.close("a-1", "k-1", 0, CYCLE0.start, CYCLE0.end, by="admin",
                                      now=CYCLE0.end + timedelta(days=1)))


def test_statuses_go_closed_billed_paid_each_transition_with_who_and_when():
    cycle = closed_cycle()
    with pytest.raises(Conflict):
        cycle.mark_paid(by="admin", now=CYCLE0.end)          # paid before billed
    cycle.mark_billed(amount_minor=1_234, currency="USD", by="alice", now=CYCLE0.end + timedelta(hours=1))
    with pytest.raises(Conflict):
        cycle.mark_billed(amount_minor=1_234, currency="USD", by="alice", now=CYCLE0.end)
    cycle.adjust(amount_minor=-100, currency="USD", reason="goodwill", by="bob", now=CYCLE0.end)
    cycle.mark_paid(by="carol", now=CYCLE0.end + timedelta(hours=2), reference="wire 42")
    with pytest.raises(Conflict):
        cycle.mark_paid(by="carol", now=CYCLE0.end)
    with pytest.raises(Conflict):
        cycle.adjust(amount_minor=5, currency="USD", reason="too late", by="bob", now=CYCLE0.end)
    events = cycle.collect_events()
    assert [type(e).__name__ for e in events] == ["Closed", "Billed", "Adjusted", "Paid"]
    assert [(e.by, e.at) for e in events[1:]] == [
        ("alice", iso(CYCLE0.end + timedelta(hours=1))), ("bob", iso(CYCLE0.end)),
        ("carol", iso(CYCLE0.end + timedelta(hours=2)))]
    assert events[1].amount_minor == 1_234 and events[3].reference == "wire 42"


def test_an_adjustment_needs_an_amount_and_a_reason():
    cycle = closed_cycle()
    with pytest.raises(InvalidRequest):
        cycle.adjust(amount_minor=0, currency="USD", reason="nothing", by="bob", now=CYCLE0.end)
    with pytest.raises(InvalidRequest):
        cycle.adjust(amount_minor=10, currency="USD", reason="  ", by="bob", now=CYCLE0.end)


# -- closing, and requests that come late ------------------------------------------------------------------


def test_activity_after_the_end_marks_the_cycle_due_and_late_requests_become_an_adjustment_line():
    log = Log()
    plan = log.plan("basic", BASIC)
    assignment = log.assign(plan)
    day = timedelta(days=1)
    log.request(assignment, plan, ANCHOR + day, 60, 30)                    # 90 of 100 included
    log.request(assignment, plan, ANCHOR + 2 * day, 50, 10)                # 10 included, 40 + 10 overage
    trigger = log.request(assignment, plan, CYCLE0.end + day, 5, 5)        # cycle 1: cycle 0 is due
    in_time = log.request(assignment, plan, CYCLE0.end - day, 1_000, 0)    # before Closed: still counts
    cycle0 = str(cycle_id_for(str(assignment.id), 0))

    fold = replay(log.events())
    due = fold.cycles[cycle0]
    assert (due.status, due.close_requested_position) == ("open", trigger)
    assert fold.cycles[str(cycle_id_for(str(assignment.id), 1))].status == "open"
    before = figures(due)
    assert before["overage_input_tokens"] == 40 + 1_000 and before["requests"] == 3

    closed_at = log.save(BillingCycle.close(str(assignment.id), log.key, 0, CYCLE0.start, CYCLE0.end, by="fila",
                                            now=CYCLE0.end + day))
    late = log.request(assignment, plan, CYCLE0.end - timedelta(seconds=1), 3_000, 500, hit=True)
    after_late = log.request(assignment, plan, CYCLE0.end - timedelta(seconds=2), 10, 0)

    bill, contributions = recompute_cycle(log.events(), cycle0)
    closed = figures(replay(log.events()).cycles[cycle0])
    assert {k: v for k, v in closed.items() if k not in ("adjustments_minor", "total_minor")} == \
           {k: v for k, v in before.items() if k not in ("adjustments_minor", "total_minor")}
    # a cache hit on Basic bills half: 1500 input at $200/M = $0.30, 250 output at $800/M = $0.20
    late_lines = [line for line in bill.lines() if line.kind == "adjustment"]
    assert [line.amount.amount_minor for line in late_lines] == [50, 0]
    assert all("late usage" in line.description for line in late_lines)
    assert closed["adjustments_minor"] == 50 and closed["total_minor"] == before["total_minor"] + 50
    kinds = {c["position"]: c["kind"] for c in contributions if "entry_id" in c}
    assert (kinds[in_time], kinds[late], kinds[after_late]) == ("usage", "late_usage", "late_usage")
    assert [c for c in contributions if c["kind"] == "closed"][0]["position"] == closed_at

    rows = project(log, page=2)
    assert rows[cycle0]["status"] == "closed" and rows[cycle0]["late_requests"] == 2
    assert rows[cycle0]["closed_position"] == closed_at
    assert bill_of(rows[cycle0]).lines() == bill.lines()


def test_a_retried_request_is_one_entry_and_is_billed_once():
    log = Log()
    plan = log.plan("basic", BASIC)
    assignment = log.assign(plan)
    entry_id = uuid.uuid4()
    log.request(assignment, plan, ANCHOR + timedelta(hours=1), 500, 500, entry_id=entry_id)
    with pytest.raises(IntegrityError):
        log.request(assignment, plan, ANCHOR + timedelta(hours=2), 500, 500, entry_id=entry_id)
    bill, _ = recompute_cycle(log.events(), cycle_id_for(str(assignment.id), 0))
    assert (bill.requests, bill.input_tokens) == (1, 500)


def test_cycles_follow_the_activity_clock_and_stop_at_the_assignment_end():
    log = Log()
    plan = log.plan("basic", BASIC)
    other = log.plan("other", BASIC)
    idle = Assignment.assign(assignment_id_for("idle-key", 0), "idle-key", str(other.id), ANCHOR, None, ANCHOR)
    log.save(idle)
    assignment = log.assign(plan)
    assignment.cancel("leaving", CYCLE0.end + timedelta(days=40))
    log.save(assignment)
    # one request (dated after the cancellation, as a racing request could be), months later
    log.request(assignment, plan, CYCLE0.end + timedelta(days=100), 1, 1)
    fold = replay(log.events())
    idle_cycles = sorted(c.index for c in fold.cycles.values() if c.assignment_id == str(idle.id))
    busy = sorted(c.index for c in fold.cycles.values() if c.assignment_id == str(assignment.id))
    assert idle_cycles == [0, 1, 2, 3, 4]          # Jan 31 .. the cycle holding the watermark (June 8)
    assert busy == [0, 1, 2, 4]                    # cancelled in its cycle 2; the request has its own cycle
    due = [c.index for c in fold.cycles.values() if c.close_requested_position is not None]
    assert sorted(due) == [0, 0, 1, 1, 2, 2, 3]    # every cycle that ended before the watermark


# -- the property: view == recompute == an independent computation ---------------------------------------


class Model:
    """The README's billing rules, computed naively with Fractions (independent of CycleBill)."""

    def __init__(self, start: datetime, end: datetime) -> None:
        self.start, self.end = start, end
        self.length = Fraction((end - start) // timedelta(microseconds=1))
        self.segments: list[tuple[datetime, dict[str, Any]]] = []
        self.used = 0
        self.overage: dict[tuple, Fraction] = {}
        self.adjustments: list[int] = []

    def set_terms(self, terms: dict[str, Any], at: datetime) -> None:
        at = max(at, self.start)
        if self.segments and terms == self.segments[-1][1]:
            return
        if self.segments and at == self.segments[-1][0]:
            self.segments.pop()
            if self.segments and self.segments[-1][1] == terms:
                return
        self.segments.append((at, terms))

    def _spans(self) -> list[tuple[Fraction, dict[str, Any]]]:
        ends = [s for s, _ in self.segments[1:]] + [self.end]
        return [(Fraction((e - s) // timedelta(microseconds=1)), t) for (s, t), e in zip(self.segments, ends)]

    def allowance(self) -> int:
        return int(sum(t["included"] * span for span, t in self._spans()) // self.length)

    def add(self, terms: dict[str, Any], prompt: int, completion: int, hit: bool) -> None:
        def billable(tokens: int) -> int:
            if not hit or terms["cache"] == "full":
                return tokens
            return 0 if terms["cache"] == "free" else int(tokens * terms["fraction"])
        left = max(0, self.allowance() - self.used)
        bill_in, bill_out = billable(prompt), billable(completion)
        inc_in = min(bill_in, left)
        inc_out = min(bill_out, left - inc_in)
        self.used += inc_in + inc_out
        for kind, tokens, price in (("in", bill_in - inc_in, terms["in"]), ("out", bill_out - inc_out, terms["out"])):
            if tokens:
                key = (kind, terms["plan"], terms["version"], price)
                self.overage[key] = self.overage.get(key, Fraction(0)) + tokens * price / 1_000_000

    @staticmethod
    def cents(amount: Fraction) -> int:          # half-up (away from zero), once
        scaled = amount * 100
        whole = abs(scaled.numerator) * 2 + scaled.denominator
        return whole // (2 * scaled.denominator) * (1 if scaled >= 0 else -1)

    def lines(self) -> list[int]:
        base = [self.cents(t["monthly"] * span / self.length) for span, t in self._spans()]
        return base + [self.cents(v) for v in self.overage.values()] + self.adjustments

    def total(self) -> int:
        return sum(self.lines())

    def copy(self) -> Model:
        twin = Model(self.start, self.end)
        twin.segments, twin.used = list(self.segments), self.used
        twin.overage, twin.adjustments = dict(self.overage), list(self.adjustments)
        return twin


PRICES = ["0", "0.15", "7.77", "13.131313", "200", "999.999999"]     # many leave fractions of a cent
plan_terms = st.fixed_dictionaries({
    "monthly_price_minor": st.integers(0, 20_000), "included_tokens": st.integers(0, 1_500),
    "input_price_per_million": st.sampled_from(PRICES), "output_price_per_million": st.sampled_from(PRICES),
    "cache_hit_billing": st.sampled_from(["full", "free", "fraction"]),
    "cache_hit_fraction": st.sampled_from(["0.5", "0.25", "0.333333"]),
})
operation = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 4_000), st.integers(0, 2_000), st.booleans(), st.integers(0, 90)),
    st.tuples(st.just("change"), st.integers(-3, 30)),
    st.tuples(st.just("edit"), st.integers(0, 1), plan_terms),
)


def model_terms(plan: Plan, version: int, terms: dict[str, Any]) -> dict[str, Any]:
    return {"plan": str(plan.id), "version": version, "monthly": Fraction(terms["monthly_price_minor"], 100),
            "included": terms["included_tokens"], "in": Fraction(Decimal(terms["input_price_per_million"])),
            "out": Fraction(Decimal(terms["output_price_per_million"])), "cache": terms["cache_hit_billing"],
            "fraction": Fraction(Decimal(terms["cache_hit_fraction"]))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=plan_terms, second=plan_terms, operations=st.lists(operation, max_size=25),
       late=st.lists(st.tuples(st.integers(0, 3_000), st.integers(0, 1_000), st.booleans()), max_size=3),
       close=st.booleans(), page=st.integers(1, 7))
def test_the_view_the_auditor_and_an_independent_computation_agree(first, second, operations, late, close, page):
    log = Log()
    plans = [log.plan("p0", {"name": "P0", **first}), log.plan("p1", {"name": "P1", **second})]
    versions = {str(p.id): [(1, ANCHOR - timedelta(days=1), dict(p.terms))] for p in plans}
    current = 0
    changes_so_far: list[tuple[int, datetime]] = []
    assignment = log.assign(plans[0])
    model = Model(CYCLE0.start, CYCLE0.end)

    def known_terms(index: int, moment: datetime) -> dict[str, Any]:
        plan = plans[index]
        chosen = versions[str(plan.id)][0]
        for record in versions[str(plan.id)]:
            if record[1] <= moment:
                chosen = record
        return model_terms(plan, chosen[0], chosen[2])

    opened = False
    clock = CYCLE0.start + timedelta(hours=1)
    last_change = CYCLE0.start
    for op in operations:
        clock += timedelta(hours=7)                          # the log's time: 25 ops stay inside cycle 0
        if op[0] == "request":
            _, prompt, completion, hit, lag_min = op
            at = max(CYCLE0.start, clock - timedelta(minutes=lag_min))    # recorded a bit after it began
            index = current
            plan = plans[index]
            if not opened:                                   # the cycle opens with its first request
                model.set_terms(known_terms(0, CYCLE0.start), CYCLE0.start)
                for idx, eff in changes_so_far:
                    if CYCLE0.start < eff < CYCLE0.end:
                        model.set_terms(known_terms(idx, eff), eff)
                opened = True
            log.request(assignment, plan, at, prompt, completion, hit=hit)
            version = plan.version
            model.add(model_terms(plan, version, versions[str(plan.id)][-1][2]), prompt, completion, hit)
        elif op[0] == "change":
            eff = max(last_change, clock + timedelta(hours=op[1]))
            if eff >= CYCLE0.end:
                continue
            current = 1 - current
            assignment.change_plan(str(plans[current].id), eff, clock)
            log.save(assignment)
            last_change = eff
            changes_so_far.append((current, eff))
            if opened:
                model.set_terms(known_terms(current, eff), eff)
        else:
            _, index, changes = op
            plan = plans[index]
            if plan.update(changes, clock):
                log.save(plan)
                versions[str(plan.id)].append((plan.version, clock, dict(plan.terms)))

    cycle0 = str(cycle_id_for(str(assignment.id), 0))
    if close:
        log.request(assignment, plans[current], CYCLE0.end + timedelta(hours=1), 1, 1)   # cycle 1: 0 is due
        if not opened:
            model.set_terms(known_terms(0, CYCLE0.start), CYCLE0.start)
            for idx, eff in changes_so_far:
                if CYCLE0.start < eff < CYCLE0.end:
                    model.set_terms(known_terms(idx, eff), eff)
            opened = True
        log.save(BillingCycle.close(str(assignment.id), log.key, 0, CYCLE0.start, CYCLE0.end, by="fila",
                                    now=CYCLE0.end + timedelta(hours=2)))
        shadow = model.copy()
        for prompt, completion, hit in late:
            plan = plans[current]
            log.request(assignment, plan, CYCLE0.end - timedelta(minutes=5), prompt, completion, hit=hit)
            before = shadow.total()
            shadow.add(model_terms(plan, plan.version, versions[str(plan.id)][-1][2]), prompt, completion, hit)
            model.adjustments.append(shadow.total() - before)
    if not opened:
        return                                           # nothing made cycle 0 exist: nothing to compare

    bill, _ = recompute_cycle(log.events(), cycle0)
    rows = project(log, page)
    viewed = bill_of(rows[cycle0])
    assert viewed.lines() == bill.lines()
    assert [line.amount.amount_minor for line in bill.lines()] == model.lines()
    assert bill.total().amount_minor == model.total() == rows[cycle0]["total_minor"]
    assert rows[cycle0]["status"] == ("closed" if close else "open")
    # every row of the view, column for column, equals the one a single pass over the log gives
    once = replay(log.events())
    assert rows == {c.id: dict(zip(CYCLE_COLUMNS, cycle_row(c))) for c in once.cycles.values()}
    assert (rows[cycle0]["close_requested_position"] is not None) == close



# -- runs of requests: apply_many folds to exactly what apply does, event by event ---------------------------

run_operation = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 1), st.integers(0, 4_000), st.integers(0, 2_000), st.booleans(),
              st.integers(-600, 60), st.sampled_from(["ok", "ok", "ok", "client_disconnected", "rate_limited"])),
    st.tuples(st.just("burst"), st.integers(0, 1), st.integers(2, 60), st.integers(0, 2_000)),
    st.tuples(st.just("change"), st.integers(0, 1), st.integers(-3, 30)),
    st.tuples(st.just("edit"), st.integers(0, 1), plan_terms),
    st.tuples(st.just("close"), st.integers(0, 1)),
    st.tuples(st.just("jump"), st.integers(1, 40)),
)


def fold_state(fold: Any) -> tuple:
    cycles = {cycle_id: cycle_row(cycle) for cycle_id, cycle in fold.cycles.items() if cycle.bill is not None}
    return cycles, fold.assignments, fold.watermark, sorted(fold._due), sorted(fold._next)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=plan_terms, second=plan_terms, operations=st.lists(run_operation, max_size=40), seed=st.integers(0, 99))
def test_apply_many_folds_runs_of_requests_exactly_as_apply_does_one_by_one(first, second, operations, seed):
    log = Log()
    plans = [log.plan("p0", {"name": "P0", **first}), log.plan("p1", {"name": "P1", **second})]
    anchors = [ANCHOR, ANCHOR + timedelta(days=9, hours=5)]
    keys = [f"{log.key}-{i}" for i in range(2)]
    assignments = [Assignment.assign(assignment_id_for(k, 0), k, str(plans[i].id), a, None, a)
                   for i, (k, a) in enumerate(zip(keys, anchors))]
    log.save(*assignments)
    current = [0, 1]
    last_change = list(anchors)
    closed: set[tuple[int, int]] = set()
    clock = ANCHOR + timedelta(hours=1)
    rng = random.Random(seed)

    def request(i: int, at: datetime, prompt: int, completion: int, hit: bool, outcome: str = "ok") -> None:
        plan = plans[current[i]]
        entry = LedgerEntry(id=uuid.uuid4(), api_key_id=keys[i], at=iso(at), outcome=outcome, status=200, model="m",
                            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                            cache="hit" if hit else "miss", plan_id=str(plan.id), plan_version=plan.version,
                            assignment_id=str(assignments[i].id))
        log.save(entry)

    for op in operations:
        clock += timedelta(minutes=50)
        if op[0] == "request":
            _, i, prompt, completion, hit, lag, outcome = op
            request(i, max(anchors[i] - timedelta(hours=1), clock + timedelta(minutes=lag)), prompt, completion, hit,
                    outcome)
        elif op[0] == "burst":                               # many requests in a row: the runs
            _, i, count, size = op
            for _ in range(count):
                clock += timedelta(seconds=rng.randint(0, 900))
                request(i, clock - timedelta(seconds=rng.randint(0, 300)), rng.randint(0, size), rng.randint(0, size),
                        rng.random() < 0.3)
        elif op[0] == "change":
            _, i, hours = op
            effective = max(clock + timedelta(hours=hours), last_change[i], anchors[i])
            current[i] = 1 - current[i]
            assignments[i].change_plan(str(plans[current[i]].id), effective, clock)
            log.save(assignments[i])
            last_change[i] = effective
        elif op[0] == "edit":
            _, index, changes = op
            if plans[index].update(changes, clock):
                log.save(plans[index])
        elif op[0] == "close":
            i = op[1]
            index = cycle_index(anchors[i], clock) - 1 if clock >= anchors[i] else -1
            if index >= 0 and (i, index) not in closed:
                period = cycle_by_index(anchors[i], index)
                log.save(BillingCycle.close(str(assignments[i].id), keys[i], index, period.start, period.end,
                                            by="fila", now=clock))
                closed.add((i, index))
        else:
            clock += timedelta(days=op[1])

    events = log.events()
    one_by_one = replay(events)
    many = BillingFold()
    many.apply_many(events)
    assert fold_state(many) == fold_state(one_by_one)
    # the view's states: Structs with the fields the fold reads, not dicts
    decode = msgspec.json.Decoder(BillingRecorded).decode
    as_structs = [(p, t, o, decode(msgspec.json.encode(s)) if t == RECORDED_TOPIC else s, v)
                  for p, t, o, s, v in events]
    many = BillingFold()
    many.apply_many(as_structs)
    assert fold_state(many) == fold_state(one_by_one)


def test_a_request_exactly_at_another_cycles_end_makes_it_due_in_the_middle_of_a_run():
    log = Log()
    plan = log.plan("basic", BASIC)
    a = log.assign(plan)
    later = ANCHOR + timedelta(days=9, hours=5)
    b = Assignment.assign(assignment_id_for("other-key", 0), "other-key", str(plan.id), later, None, later)
    log.save(b)
    b_end = cycle_by_index(later, 0).end                       # inside a's cycle 1
    for minutes in (90, 60, 30, 0, -30):
        log.request(a, plan, b_end - timedelta(minutes=minutes), 10, 10)
    events = log.events()
    many = BillingFold()
    many.apply_many(events)
    b0 = many.cycles[str(cycle_id_for(str(b.id), 0))]
    assert b0.close_requested_position == events[-2][0]       # the request at b_end exactly
    assert fold_state(many) == fold_state(replay(events))


def test_a_plan_change_first_in_a_run_reaches_the_open_cycle_the_view_holds_only_in_its_table():
    log = Log()
    basic, pro = log.plan("basic", BASIC), log.plan("pro", dict(BASIC, name="Pro", monthly_price_minor=9_900))
    assignment = log.assign(basic)
    log.request(assignment, basic, ANCHOR + timedelta(days=1), 10, 10)
    with tempfile.TemporaryDirectory() as folder:
        db = SqliteDatabase(f"sqlite:///{folder}/views.db")
        try:
            for page, plan, day in ((50, pro, 10), (1, basic, 15)):   # each run starts at a plan change
                projector = Projector(db, log.store.recorder, [BillingView()], page=page)
                projector.catch_up()
                projector.close()
                assignment.change_plan(str(plan.id), ANCHOR + timedelta(days=day), ANCHOR + timedelta(days=day - 1))
                log.save(assignment)
                log.request(assignment, plan, ANCHOR + timedelta(days=day + 1), 10, 10)
            projector = Projector(db, log.store.recorder, [BillingView()], page=1)
            projector.catch_up()
            projector.close()
            rows = {r[0]: dict(zip(CYCLE_COLUMNS, r)) for r in db.read(f"SELECT {', '.join(CYCLE_COLUMNS)} "
                                                                      "FROM billing_cycles")}
        finally:
            db.close()
    once = replay(log.events())
    assert rows == {c.id: dict(zip(CYCLE_COLUMNS, cycle_row(c))) for c in once.cycles.values()}
    cycle0 = rows[str(cycle_id_for(str(assignment.id), 0))]
    assert len(msgspec.json.decode(cycle0["state"])["segments"]) == 3
