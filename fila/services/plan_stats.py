"""Usage figures for the admin stats: tokens and requests this cycle, revenue so far.

Read from the ledger itself, correct rather than fast: each call first reads what is new in
the log (``fila:LedgerEntry.Recorded`` and the plan events, from a kept position) and then
recomputes the figures from what it holds. A later change will read the projection views
(``fila.projections.usage``) instead; the shapes returned here are what the admin API shows.

Rules:

- **This cycle** of an assignment is its monthly cycle (anchored on ``starts_at``,
  ``fila.domain.cycles.cycle_for``) that contains now; an assignment not started yet has none.
- **Requests and tokens this cycle** count the billable entries (outcomes ``ok`` and
  ``client_disconnected``) whose time falls in their assignment's current cycle, under the plan
  the entry recorded (``plan_id``): a request made on Basic before a switch to Pro counts for
  Basic. Refusals and upstream failures are not counted.
- **Revenue so far** of a plan sums, over the assignments that are active and in force now and
  whose plan in force now is this plan, the total of their current cycle's bill as
  ``fila.domain.billing.CycleBill`` computes it: the **full** monthly base price of the cycle
  (never prorated by elapsed time: a started cycle is owed; prorated only where a plan change
  splits the cycle) plus the overage of the requests recorded so far in it, each priced by the
  plan version it recorded (``terms_of``), cache hits (entry ``cache == "hit"``) billed by the
  plan's cache rule. Suspended, cancelled and ended assignments add nothing.

Memory: the billable entries of each assignment from its current cycle on (older ones are
dropped when a computation passes them), plus every plan version's terms.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from fila.domain.billing import CycleBill, Terms, Usage
from fila.domain.cycles import Period, cycle_for
from fila.domain.ledger import BILLABLE_OUTCOMES, RECORDED_TOPIC
from fila.domain.money import CurrencyMismatch, Money
from fila.domain.plans import ACTIVE, CANCELLED, SUSPENDED, terms_of
from fila.domain.time import iso, parse_iso
from fila.projections.planbook import AssignmentRecord, PlanBook
from fila.services.admission import plan_in_force

log = structlog.get_logger("fila.plan_stats")

PLAN_TOPICS = ("fila:Plan.Defined", "fila:Plan.Updated", "fila:Plan.Activated", "fila:Plan.Deactivated",
               "fila:Plan.Deleted")
STATUSES = (ACTIVE, SUSPENDED, CANCELLED)


class _Recorded(msgspec.Struct):
    """The fields of a ledger entry the figures need (the others are skipped when decoding)."""

    at: str
    outcome: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache: str = "none"
    plan_id: str | None = None
    plan_version: int | None = None
    assignment_id: str | None = None


_decode_entry = msgspec.json.Decoder(_Recorded).decode
_decode = msgspec.json.Decoder().decode


@dataclass(slots=True, frozen=True)
class _Entry:
    id: str
    at: datetime
    plan_id: str
    plan_version: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cache_hit: bool


@dataclass(slots=True)
class _Figures:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache_hits: int = 0

    def add(self, entry: _Entry) -> None:
        self.requests += 1
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.total_tokens += entry.total_tokens
        self.cache_hits += entry.cache_hit

    def to_public(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "cache_hits": self.cache_hits}


@dataclass(slots=True)
class _Snapshot:
    """Figures per plan id, as of one moment."""

    at: datetime
    position: int
    usage: dict[str, _Figures] = field(default_factory=dict)
    revenue: dict[str, dict[str, int]] = field(default_factory=dict)   # plan id -> currency -> minor


def assignment_counts(book: PlanBook, plan_id: str | None = None) -> dict[str, int]:
    """Assignments by status (of one plan, by each one's latest plan, or of all); plus ``total``."""
    counts = dict.fromkeys(STATUSES, 0)
    for record in list(book.assignments.values()):
        if plan_id is None or record.plan_id == plan_id:
            counts[record.status] = counts.get(record.status, 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def _money(currency: str, minor: int) -> dict[str, Any]:
    return {"amount_minor": minor, "currency": currency, "amount": f"{Money(minor, currency).to_decimal():.2f}"}


class PlanStats:
    """Reads the log from a kept position; computes per-plan figures on demand."""

    def __init__(self, recorder: Any, registry: Any, book: PlanBook, run: Callable[..., Any],
                 clock: Callable[[], datetime] | None = None, page: int = 1000) -> None:
        self.recorder = recorder
        self.registry = registry
        self.book = book
        self.run = run                   # runs a sync function off the event loop (Batcher.run)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.page = page
        self.position = 0
        self._lock = threading.Lock()
        self._entries: dict[str, list[_Entry]] = {}          # assignment id -> billable entries, log order
        self._versions: dict[str, list[tuple[int, datetime, str, dict[str, Any]]]] = {}  # plan id -> versions
        self._terms: dict[tuple[str, int], Terms] = {}

    # -- the admin API's two questions -------------------------------------------------------------

    async def plan_usage(self, plan_id: str) -> dict[str, Any]:
        snapshot = await self.run(self._snapshot)
        currency = self.book.plans[plan_id].terms["currency"] if plan_id in self.book.plans else "USD"
        revenue = dict(snapshot.revenue.get(plan_id, {}))
        result = {"this_cycle": snapshot.usage.get(plan_id, _Figures()).to_public(),
                  "revenue_so_far": _money(currency, revenue.pop(currency, 0)),
                  "as_of": iso(snapshot.at), "ledger_position": snapshot.position}
        if revenue:   # only if the plan's currency was edited while a cycle was open
            result["revenue_other_currencies"] = [_money(c, m) for c, m in sorted(revenue.items())]
        return result

    async def assignment_usage(self) -> dict[str, Any]:
        snapshot = await self.run(self._snapshot)
        total = _Figures()
        for figures in snapshot.usage.values():
            for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cache_hits"):
                setattr(total, name, getattr(total, name) + getattr(figures, name))
        revenue: dict[str, int] = {}
        for by_currency in snapshot.revenue.values():
            for currency, minor in by_currency.items():
                revenue[currency] = revenue.get(currency, 0) + minor
        return {"this_cycle": total.to_public(),
                "revenue_so_far": [_money(c, m) for c, m in sorted(revenue.items())],
                "as_of": iso(snapshot.at), "ledger_position": snapshot.position}

    # -- reading the log (synchronous: runs on a store reader thread) --------------------------------

    def catch_up(self) -> int:
        with self._lock:
            topics = [RECORDED_TOPIC, *PLAN_TOPICS]
            while True:
                notes = self.recorder.select_notifications(start=self.position, limit=self.page, topics=topics,
                                                           inclusive_of_start=False)
                for note in notes:
                    if note.topic == RECORDED_TOPIC:
                        self._recorded(str(note.originator_id), _decode_entry(note.state))
                    else:
                        self._plan_event(note.topic, str(note.originator_id), note.originator_version,
                                         _decode(note.state))
                    self.position = note.id
                if len(notes) < self.page:
                    return self.position

    def _recorded(self, entry_id: str, state: _Recorded) -> None:
        if state.outcome not in BILLABLE_OUTCOMES or state.assignment_id is None or state.plan_id is None:
            return
        self._entries.setdefault(state.assignment_id, []).append(_Entry(
            id=entry_id, at=parse_iso(state.at), plan_id=state.plan_id, plan_version=state.plan_version or 1,
            prompt_tokens=state.prompt_tokens, completion_tokens=state.completion_tokens,
            total_tokens=state.total_tokens, cache_hit=state.cache == "hit"))

    def _plan_event(self, topic: str, plan_id: str, version: int, state: dict[str, Any]) -> None:
        at = parse_iso(state["at"])
        versions = self._versions.setdefault(plan_id, [])
        if topic == "fila:Plan.Defined":
            versions.append((version, at, state["slug"], dict(state["terms"])))
        elif versions:
            _, _, slug, terms = versions[-1]
            if topic == "fila:Plan.Updated":
                terms = {**terms, **state["changes"]}
            versions.append((version, at, slug, terms))

    # -- terms -------------------------------------------------------------------------------------

    def _terms_of_version(self, plan_id: str, version: int) -> Terms | None:
        terms = self._terms.get((plan_id, version))
        if terms is None:
            candidates = [v for v in self._versions.get(plan_id, ()) if v[0] <= version]
            if not candidates:
                return None
            _, _, slug, raw = candidates[-1]
            terms = self._terms[(plan_id, version)] = terms_of(plan_id, slug, version, raw)
        return terms

    def _terms_at(self, plan_id: str, moment: datetime) -> Terms | None:
        """The terms of the plan's version in force at ``moment`` (its first one before it existed)."""
        versions = self._versions.get(plan_id)
        if not versions:
            return None
        chosen = versions[0][0]
        for number, at, _, _ in versions:
            if at <= moment:
                chosen = number
        return self._terms_of_version(plan_id, chosen)

    # -- figures -----------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        self.registry.catch_up()      # assignments the new entries name are known before counting
        position = self.catch_up()
        now = self.clock()
        snapshot = _Snapshot(at=now, position=position)
        with self._lock:
            for record in list(self.book.assignments.values()):
                starts_at = parse_iso(record.starts_at)
                if now < starts_at:
                    continue
                period = cycle_for(starts_at, now)
                entries = [e for e in self._entries.get(record.id, ()) if e.at >= period.start]
                if entries or record.id in self._entries:
                    self._entries[record.id] = entries        # earlier cycles never count again
                entries = [e for e in entries if e.at < period.end]
                for entry in entries:
                    snapshot.usage.setdefault(entry.plan_id, _Figures()).add(entry)
                if record.status == ACTIVE and (record.ends_at is None or now < parse_iso(record.ends_at)):
                    total = self._cycle_total(record, period, entries)
                    if total is not None:
                        by_currency = snapshot.revenue.setdefault(plan_in_force(record, now), {})
                        by_currency[total.currency] = by_currency.get(total.currency, 0) + total.amount_minor
        return snapshot

    def _cycle_total(self, record: AssignmentRecord, period: Period, entries: list[_Entry]) -> Money | None:
        """The bill of ``record``'s cycle ``period`` so far (base fee(s) and overage)."""
        first = self._terms_at(plan_in_force(record, period.start), period.start)
        if first is None:
            return None
        bill = CycleBill(period, first.currency)
        try:
            bill.set_terms(first, period.start)
            for plan_id, effective_at in record.plan_history[1:]:
                at = parse_iso(effective_at)
                if period.start < at < period.end:
                    terms = self._terms_at(plan_id, at)
                    if terms is not None:
                        bill.set_terms(terms, at)
            for entry in entries:
                terms = self._terms_of_version(entry.plan_id, entry.plan_version)
                if terms is not None:
                    bill.add(Usage(entry.id, entry.at, entry.prompt_tokens, entry.completion_tokens,
                                   entry.cache_hit), terms)
        except CurrencyMismatch:   # a plan whose currency changed mid-cycle: no single bill to show
            log.warning("cycle_bill_mixed_currencies", assignment_id=record.id)
            return None
        return bill.total()
