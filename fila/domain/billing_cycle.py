"""A billing cycle's life after its period: closed -> billed -> paid, and adjustments.

A cycle is **open** implicitly: it exists in the billing view from the first activity that
needs it, and no aggregate is stored for it until it is closed. ``Closed`` is the aggregate's
first event; its id is ``cycle_id_for(assignment_id, cycle_index)`` (``uuid5``), so two closers
(the projector after an activity, an admin, two processes) collide in the store instead of
closing twice.

Rules (each transition is an event carrying who and when):

- **close**: only a cycle whose period has ended (``ends_at <= now``); an admin cannot close a
  cycle early (a mid-cycle stop is a plan change or a cancellation, not a close).
- **mark billed**: only a closed cycle; the event records the amount billed (the view's total
  at that moment) so the invoice amount is part of the log.
- **mark paid**: only a billed cycle.
- **adjust**: a signed amount in the cycle's currency with a reason, on a closed or billed
  cycle (a paid cycle is settled: correct the next one). It is shown as its own line; the
  closed figures never change.

A violation is a 409 ``invalid_transition``. Every field is JSON-native (see the transcoder);
times are ISO strings passed in by the caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from fila.domain.errors import Conflict, InvalidRequest
from fila.domain.time import iso, parse_iso

CYCLE_NAMESPACE = uuid5(NAMESPACE_URL, "https://fila.dev/billing-cycle")

OPEN, CLOSED, BILLED, PAID = "open", "closed", "billed", "paid"
STATUSES = (OPEN, CLOSED, BILLED, PAID)

TOPIC_CLOSED = "fila:BillingCycle.Closed"
TOPIC_BILLED = "fila:BillingCycle.Billed"
TOPIC_PAID = "fila:BillingCycle.Paid"
TOPIC_ADJUSTED = "fila:BillingCycle.Adjusted"
CYCLE_TOPICS = (TOPIC_CLOSED, TOPIC_BILLED, TOPIC_PAID, TOPIC_ADJUSTED)

MAX_REASON = 500


def cycle_id_for(assignment_id: str, cycle_index: int) -> UUID:
    """The id of cycle ``cycle_index`` (0, 1, ...) of an assignment: deterministic."""
    return uuid5(CYCLE_NAMESPACE, f"{assignment_id}:{cycle_index}")


def _transition(message: str) -> Conflict:
    return Conflict(message, code="invalid_transition", param="status")


class BillingCycle(Aggregate):
    TOPIC = "fila:BillingCycle"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:BillingCycle.Created"

    @event("Closed", topic=TOPIC_CLOSED)
    def __init__(self, id: UUID, assignment_id: str, api_key_id: str, cycle_index: int, starts_at: str,
                 ends_at: str, by: str, at: str, reason: str = "", chain_head: dict | None = None) -> None:
        self.assignment_id = assignment_id
        self.api_key_id = api_key_id
        self.cycle_index = cycle_index
        self.starts_at = starts_at
        self.ends_at = ends_at
        self.status = CLOSED
        self.closed_by = by
        self.closed_at = at
        self.reason = reason
        self.chain_head = chain_head
        self.billed_minor: int | None = None
        self.adjustments: list[list[Any]] = []

    @classmethod
    def close(cls, assignment_id: str, api_key_id: str, cycle_index: int, starts_at: datetime,
              ends_at: datetime, *, by: str, now: datetime, reason: str = "",
              chain_head: dict[str, Any] | None = None) -> BillingCycle:
        """Close cycle ``cycle_index``; refused while its period has not ended at ``now``."""
        if now < ends_at:
            raise _transition(f"the cycle ends at {iso(ends_at)}: a cycle can only be closed after its period")
        return cls(id=cycle_id_for(assignment_id, cycle_index), assignment_id=assignment_id,
                   api_key_id=api_key_id, cycle_index=cycle_index, starts_at=iso(starts_at),
                   ends_at=iso(ends_at), by=_actor(by), at=iso(now), reason=reason, chain_head=chain_head)

    def mark_billed(self, *, amount_minor: int, currency: str, by: str, now: datetime,
                    reference: str | None = None) -> None:
        if self.status != CLOSED:
            raise _transition(f"only a closed cycle can be marked billed (it is {self.status})")
        self._billed(amount_minor=amount_minor, currency=currency, by=_actor(by), at=iso(now),
                     reference=reference)

    @event("Billed", topic=TOPIC_BILLED)
    def _billed(self, amount_minor: int, currency: str, by: str, at: str, reference: str | None = None) -> None:
        self.status = BILLED
        self.billed_minor = amount_minor

    def mark_paid(self, *, by: str, now: datetime, reference: str | None = None) -> None:
        if self.status != BILLED:
            raise _transition(f"only a billed cycle can be marked paid (it is {self.status})")
        self._paid(by=_actor(by), at=iso(now), reference=reference)

    @event("Paid", topic=TOPIC_PAID)
    def _paid(self, by: str, at: str, reference: str | None = None) -> None:
        self.status = PAID

    def adjust(self, *, amount_minor: int, currency: str, reason: str, by: str, now: datetime) -> None:
        if self.status not in (CLOSED, BILLED):
            raise _transition(f"a {self.status} cycle takes no adjustment; adjust the next cycle")
        if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor == 0:
            raise InvalidRequest("'amount_minor' must be a non-zero integer (minor units, negative for a credit)",
                                 param="amount_minor")
        reason = (reason or "").strip()
        if not reason or len(reason) > MAX_REASON:
            raise InvalidRequest(f"'reason' must be 1 to {MAX_REASON} characters", param="reason")
        self._adjusted(amount_minor=amount_minor, currency=currency, reason=reason, by=_actor(by), at=iso(now))

    @event("Adjusted", topic=TOPIC_ADJUSTED)
    def _adjusted(self, amount_minor: int, currency: str, reason: str, by: str, at: str) -> None:
        self.adjustments = [*self.adjustments, [amount_minor, currency, reason, by, at]]

    @property
    def period_end(self) -> datetime:
        return parse_iso(self.ends_at)


def _actor(by: str) -> str:
    by = (by or "").strip()
    if not by or len(by) > 200:
        raise InvalidRequest("the actor must be 1 to 200 characters", param="X-Fila-Actor")
    return by
