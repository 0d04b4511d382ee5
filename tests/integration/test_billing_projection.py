"""The billing view on PostgreSQL: built under concurrent traffic through the batcher while its
projector crashes mid-page and is replaced, then rebuilt from scratch (every row identical, and
identical to the auditor's replay); and an admin's transitions read back at once (read-your-writes).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from eventsourcing.persistence import IntegrityError

from fila.adapters.batcher import Batcher
from fila.adapters.eventstore import open_store
from fila.domain.billing_cycle import cycle_id_for
from fila.domain.billing_fold import TOPICS, recompute_cycle, replay
from fila.domain.errors import Conflict
from fila.domain.ledger import LedgerEntry
from fila.domain.plans import Assignment, Plan, assignment_id_for
from fila.domain.time import iso
from fila.projections.billing import CYCLE_COLUMNS, BillingView, cycle_row
from fila.projections.db import open_database
from fila.projections.planbook import PlanBook
from fila.projections.runner import Projector, Run, Step
from fila.services.billing import BillingService, CycleCloser
from tests.support import FakeClock

TERMS = {"name": "Metered", "monthly_price_minor": 1_900, "included_tokens": 5_000,
         "input_price_per_million": "20", "output_price_per_million": "80", "cache_hit_billing": "fraction",
         "cache_hit_fraction": "0.5"}
ANCHORS = [datetime(2025, 1, 31, tzinfo=UTC), datetime(2025, 2, 15, 9, 30, tzinfo=UTC),
           datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 28, 23, 0, tzinfo=UTC),
           datetime(2025, 2, 1, tzinfo=UTC)]   # the last key never makes a request
TABLES = {"billing_cycles": "id", "billing_assignments": "id", "billing_plan_terms": "plan_id, version",
          "billing_meta": "name"}


class CrashingBillingView(BillingView):
    """The billing view, failing after it has written its third page (the page must roll back)."""

    def __init__(self) -> None:
        self.pages = 0

    def stage(self, notes: list, suffix: str, run: Run) -> Step:
        write = super().stage(notes, suffix, run)

        def crash_on_the_third(tx: Any) -> None:
            write(tx)
            self.pages += 1
            if self.pages == 3:
                raise RuntimeError("the projector dies mid-page")
        return crash_on_the_third


class SlowBillingView(BillingView):
    def stage(self, notes: list, suffix: str, run: Run) -> Step:
        write = super().stage(notes, suffix, run)

        def slowly(tx: Any) -> None:
            time.sleep(0.2)
            write(tx)
        return slowly


class Following:
    """A projector following the log in a thread, closing due cycles after each catch-up."""

    def __init__(self, db: Any, store: Any, view: BillingView, closer: CycleCloser | None = None) -> None:
        self.projector = Projector(db, store.recorder, [view], page=25, poll_interval=0.02)
        self.stop = threading.Event()
        on_idle = (lambda applied: closer.run_once()) if closer is not None else None
        self.thread = threading.Thread(target=self.projector.follow, args=(self.stop,),
                                       kwargs={"on_idle": on_idle}, daemon=True)
        self.thread.start()

    def kill(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.projector.close()


def snapshot(db: Any) -> dict[str, list[tuple]]:
    return {table: db.read(f"SELECT * FROM {table} ORDER BY {key}") for table, key in TABLES.items()}


def entry(key: str, assignment: Assignment, plan: Plan, at: datetime, rng: random.Random,
          entry_id: uuid.UUID | None = None, outcome: str = "ok") -> LedgerEntry:
    prompt, completion = rng.randint(0, 900), rng.randint(0, 400)
    return LedgerEntry(id=entry_id or uuid.uuid4(), api_key_id=key, at=iso(at), outcome=outcome, status=200,
                       model="gpt-test", prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion, cache="hit" if rng.random() < 0.2 else "miss",
                       plan_id=str(plan.id), plan_version=plan.version, assignment_id=str(assignment.id))


async def test_the_view_built_under_traffic_through_crashes_and_restarts_equals_a_rebuild_and_the_replay(pg_url):
    rng = random.Random(7)
    store = open_store(pg_url)
    batcher = Batcher(store, max_size=50, max_wait=0.002)
    batcher.start()
    db = open_database(pg_url)
    closer = CycleCloser(store, db)
    try:
        slug = uuid.uuid4().hex[:8]
        basic = Plan.define(f"basic-{slug}", TERMS, ANCHORS[2] - timedelta(days=1))
        pro = Plan.define(f"pro-{slug}", dict(TERMS, name="Pro", monthly_price_minor=9_900, included_tokens=20_000),
                          ANCHORS[2] - timedelta(days=1))
        keys = [f"key-{i}-{slug}" for i in range(len(ANCHORS))]
        assignments = [Assignment.assign(assignment_id_for(k, 0), k, str(basic.id), start, None, start)
                       for k, start in zip(keys, ANCHORS)]
        await batcher.commit(basic, pro, *assignments)

        first = Following(db, store, CrashingBillingView())
        clock = datetime(2025, 3, 1, tzinfo=UTC)
        committed: dict[str, LedgerEntry] = {}
        retries = 0
        plans_of = {str(basic.id): basic, str(pro.id): pro}

        async def wave(size: int) -> None:
            nonlocal clock, retries
            batch = []
            for _ in range(size):
                clock += timedelta(hours=4, minutes=rng.randint(0, 60))
                i = rng.randrange(4)
                plan = plans_of[assignments[i].plan_id]
                at = max(ANCHORS[i], clock - timedelta(minutes=rng.randint(0, 30)))
                if committed and rng.random() < 0.1:         # a client retry with the same Idempotency-Key
                    previous = rng.choice(list(committed.values()))
                    batch.append(entry(previous.api_key_id, assignments[keys.index(previous.api_key_id)], plan,
                                       at, rng, entry_id=previous.id))
                    continue
                outcome = "ok" if rng.random() < 0.9 else rng.choice(["upstream_error", "rate_limited"])
                batch.append(entry(keys[i], assignments[i], plan, at, rng, outcome=outcome))
            results = await asyncio.gather(*(batcher.commit(e) for e in batch), return_exceptions=True)
            for e, result in zip(batch, results):
                if isinstance(result, IntegrityError):
                    retries += 1
                else:
                    assert not isinstance(result, BaseException), result
                    committed[str(e.id)] = e

        for _ in range(4):
            await wave(40)
        assignments[1].change_plan(str(pro.id), clock + timedelta(days=3), clock)     # mid-cycle upgrade
        basic.update({"input_price_per_million": "25"}, clock)                         # a price edit: version 2
        await batcher.commit(assignments[1], basic)
        for _ in range(2):
            await wave(40)
        await asyncio.to_thread(first.projector.wait_for, "billing", batcher.last_notification_id, 10)
        first.kill()                                              # killed while traffic goes on
        assert first.projector.views[0].pages >= 3                 # it did die, and came back
        for _ in range(2):
            await wave(40)
        second = Following(db, store, BillingView(), closer)
        for _ in range(3):
            await wave(40)

        def settled() -> bool:
            head = store.recorder.max_notification_id()
            if not second.projector.wait_for("billing", head, 10):
                return False
            return closer.run_once() == 0 and store.recorder.max_notification_id() == head

        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(settled):
            assert time.monotonic() < deadline, "the projector did not settle"
        # late requests: dated in cycles that have been closed meanwhile
        closed_cycles = db.read("SELECT assignment_id, starts_at FROM billing_cycles WHERE status = 'closed' "
                                "ORDER BY ends_us, id")
        assert closed_cycles, "activity after cycle ends must have closed some cycles"
        late = []
        for assignment_id, starts_at in closed_cycles[:3]:
            i = [str(a.id) for a in assignments].index(assignment_id)
            late.append(entry(keys[i], assignments[i], basic, datetime.fromisoformat(starts_at) + timedelta(hours=1),
                              rng))
        await batcher.commit(*late)
        committed.update({str(e.id): e for e in late})
        await asyncio.to_thread(second.projector.wait_for, "billing", batcher.last_notification_id, 10)
        second.kill()

        incremental = snapshot(db)
        cycles = {row[0]: dict(zip(CYCLE_COLUMNS, row)) for row in db.read(
            f"SELECT {', '.join(CYCLE_COLUMNS)} FROM billing_cycles")}
        billable = [e for e in committed.values() if e.outcome == "ok"]
        assert retries > 0
        assert sum(c["requests"] + c["late_requests"] for c in cycles.values()) == len(billable)
        assert sum(c["late_requests"] for c in cycles.values()) == len(late)
        assert any(len(msgspec.json.decode(c["state"])["segments"]) == 2 for c in cycles.values())
        idle = [c for c in cycles.values() if c["assignment_id"] == str(assignments[4].id)]
        assert len(idle) >= 2 and all(c["requests"] == 0 and c["base_minor"] == 1_900 for c in idle)

        rebuilder = Projector(db, store.recorder, [BillingView()], page=1_000)
        rebuilder.rebuild()
        rebuilder.close()
        assert snapshot(db) == incremental

        notes = store.recorder.select_notifications(start=0, limit=1_000_000, topics=list(TOPICS),
                                                    inclusive_of_start=False)
        events = [(n.id, n.topic, str(n.originator_id), msgspec.json.decode(n.state), n.originator_version)
                  for n in notes]
        once = replay(events)
        assert {c.id: dict(zip(CYCLE_COLUMNS, cycle_row(c))) for c in once.cycles.values()} == cycles
        for cycle_id in sorted(cycles)[:4]:
            bill, _ = recompute_cycle(events, cycle_id)
            assert bill.total().amount_minor == cycles[cycle_id]["total_minor"]
    finally:
        await asyncio.to_thread(batcher.close)
        db.close()


async def test_an_admins_transitions_are_read_back_at_once(pg_url):
    store = open_store(pg_url)
    batcher = Batcher(store)
    batcher.start()
    db = open_database(pg_url)
    follower = Following(db, store, SlowBillingView())    # 0.2 s a page: reading without waiting sees old rows
    clock = FakeClock(datetime(2025, 1, 20, tzinfo=UTC))
    service = BillingService(batcher=batcher, projector=follower.projector, db=db, book=PlanBook(), clock=clock)
    try:
        plan = Plan.define(f"p-{uuid.uuid4().hex[:8]}", TERMS, datetime(2025, 1, 1, tzinfo=UTC))
        start = datetime(2025, 1, 10, tzinfo=UTC)
        assignment = Assignment.assign(assignment_id_for("k", 0), "k", str(plan.id), start, None, start)
        await batcher.commit(plan, assignment)
        rng = random.Random(1)
        await batcher.commit(*(entry("k", assignment, plan, start + timedelta(days=d), rng) for d in range(1, 5)))
        listed = await service.list_cycles(api_key_id="k")
        [cycle] = listed["items"]
        assert (cycle["status"], cycle["requests"]) == ("open", 4)
        cycle_id = cycle["id"]
        assert cycle_id == str(cycle_id_for(str(assignment.id), 0))

        with pytest.raises(Conflict):                 # the period has not ended yet
            await service.close(cycle_id, "alice")
        with pytest.raises(Conflict):                 # not closed: cannot be billed
            await service.mark_billed(cycle_id, "alice")
        clock.now = datetime(2025, 2, 10, 0, 0, 1, tzinfo=UTC)
        closed = await service.close(cycle_id, "alice")
        assert (closed["status"], closed["closed_by"]) == ("closed", "alice")
        assert (await service.list_cycles(api_key_id="k", status="closed"))["items"][0]["id"] == cycle_id
        billed = await service.mark_billed(cycle_id, "bob", "INV-1")
        assert (billed["status"], billed["billed_by"], billed["billed_minor"]) == ("billed", "bob",
                                                                                   closed["total_minor"])
        adjusted = await service.adjust(cycle_id, -150, "goodwill credit", "bob")
        assert adjusted["total_minor"] == closed["total_minor"] - 150
        assert adjusted["lines"][-1]["amount_minor"] == -150
        paid = await service.mark_paid(cycle_id, "carol", "wire 42")
        assert (paid["status"], paid["paid_by"], paid["paid_reference"]) == ("paid", "carol", "wire 42")
        assert paid["requests"] == 4 and paid["closed_at"] == iso(clock.now)
        with pytest.raises(Conflict):
            await service.close(cycle_id, "alice")
        stats = await service.stats()
        assert stats["cycles_by_status"]["paid"] == 1 and stats["unpaid"] == []
    finally:
        follower.kill()
        await asyncio.to_thread(batcher.close)
        db.close()
