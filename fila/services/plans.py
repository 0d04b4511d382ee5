"""Admin use cases for plans and assignments, and the default plans ``fila seed`` creates."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from fila.domain.errors import Conflict, InvalidRequest, NotFound
from fila.domain.plans import ACTIVE, CANCELLED, Assignment, Plan, assignment_id_for
from fila.projections.planbook import AssignmentRecord, PlanBook, PlanRecord

# The defaults `fila seed` creates (the README has this table).
DEFAULT_PLANS: dict[str, dict[str, Any]] = {
    "free": {"name": "Free", "description": "Try FILA: small limits, hard cap at the included tokens.",
             "monthly_price_minor": 0, "included_tokens": 100_000,
             "input_price_per_million": "0", "output_price_per_million": "0",
             "requests_per_minute": 60, "requests_per_hour": 1_000, "requests_per_day": 5_000,
             "tokens_per_minute": 40_000, "cache_hit_billing": "free", "hard_cap": True},
    "basic": {"name": "Basic", "description": "Small teams.", "monthly_price_minor": 1_900,
              "included_tokens": 2_000_000, "input_price_per_million": "0.20",
              "output_price_per_million": "0.80", "requests_per_minute": 300, "requests_per_hour": 10_000,
              "requests_per_day": 100_000, "tokens_per_minute": 200_000,
              "cache_hit_billing": "fraction", "cache_hit_fraction": "0.5"},
    "pro": {"name": "Pro", "description": "Production apps.", "monthly_price_minor": 9_900,
            "included_tokens": 20_000_000, "input_price_per_million": "0.15",
            "output_price_per_million": "0.60", "requests_per_minute": 1_200, "requests_per_hour": 50_000,
            "requests_per_day": 1_000_000, "tokens_per_minute": 1_000_000,
            "cache_hit_billing": "fraction", "cache_hit_fraction": "0.25"},
    "enterprise": {"name": "Enterprise", "description": "No rate limits; volume overage prices.",
                   "monthly_price_minor": 99_900, "included_tokens": 300_000_000,
                   "input_price_per_million": "0.10", "output_price_per_million": "0.40",
                   "cache_hit_billing": "free"},
}


def _parse_time(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"'{field}' must be an ISO-8601 time such as 2026-01-31T00:00:00Z",
                             param=field) from None
    if at.tzinfo is None:
        raise InvalidRequest(f"'{field}' must carry a timezone (e.g. a trailing Z)", param=field)
    return at.astimezone(UTC)


class PlanService:
    def __init__(self, batcher: Any, registry: Any, book: PlanBook,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.batcher = batcher
        self.registry = registry
        self.book = book
        self.clock = clock or (lambda: datetime.now(UTC))

    async def refresh(self) -> None:
        await self.batcher.run(self.registry.catch_up)

    async def _save(self, *aggregates: Any, conflict: str, param: str | None = None) -> None:
        try:
            await self.batcher.commit(*aggregates)
        except IntegrityError:
            await self.refresh()      # another process wrote first: learn what it wrote
            raise Conflict(conflict, code="conflict", param=param) from None
        await self.refresh()

    async def _load(self, aggregate_id: str) -> Any:
        return await self.batcher.run(self.batcher.store.repository.get, UUID(aggregate_id))

    # -- plans -----------------------------------------------------------------------------------

    def plan(self, ref: str) -> PlanRecord:
        """A plan by id or slug."""
        record = self.book.plans.get(ref) or self.book.by_slug.get(ref)
        if record is None or record.deleted:
            raise NotFound(f"no plan '{ref}'", param="plan", code="plan_not_found")
        return record

    async def create(self, slug: str, terms: dict[str, Any]) -> PlanRecord:
        if slug in self.book.by_slug:
            raise Conflict(f"a plan with slug '{slug}' already exists (slugs are never reused)",
                           param="slug", code="duplicate_slug")
        plan = Plan.define(slug, terms, self.clock())
        await self._save(plan, conflict=f"a plan with slug '{slug}' already exists", param="slug")
        return self.book.plans[str(plan.id)]

    async def _change(self, ref: str, change: Callable[[Plan], Any]) -> PlanRecord:
        record = self.plan(ref)
        plan = await self._load(record.id)
        change(plan)
        await self._save(plan, conflict="the plan changed meanwhile; retry")
        return self.book.plans[record.id]

    async def update(self, ref: str, changes: dict[str, Any]) -> PlanRecord:
        if not changes:
            raise InvalidRequest("nothing to update: send at least one field", code="empty_update")
        return await self._change(ref, lambda plan: plan.update(changes, self.clock()))

    async def activate(self, ref: str) -> PlanRecord:
        return await self._change(ref, lambda plan: plan.activate(self.clock()))

    async def deactivate(self, ref: str) -> PlanRecord:
        return await self._change(ref, lambda plan: plan.deactivate(self.clock()))

    async def delete(self, ref: str) -> PlanRecord:
        record = self.plan(ref)
        return await self._change(ref, lambda plan: plan.delete(record.id in self.book.ever_assigned,
                                                                 self.clock()))

    async def seed(self) -> list[str]:
        """Create the default plans that do not exist yet; returns the slugs created."""
        created = []
        for slug, terms in DEFAULT_PLANS.items():
            if slug not in self.book.by_slug:
                try:
                    await self.create(slug, terms)
                except Conflict:          # another process (a worker starting too) seeded it first
                    if slug in self.book.by_slug:
                        continue
                    raise
                created.append(slug)
        return created

    # -- assignments -------------------------------------------------------------------------------

    def assignment(self, assignment_id: str) -> AssignmentRecord:
        record = self.book.assignments.get(assignment_id)
        if record is None:
            raise NotFound(f"no assignment '{assignment_id}'", param="id", code="assignment_not_found")
        return record

    async def assign(self, api_key_id: str, plan_ref: str, *, starts_at: str | None = None,
                     ends_at: str | None = None) -> AssignmentRecord:
        if api_key_id not in self.registry.keys:
            raise NotFound(f"no API key '{api_key_id}'", param="api_key_id", code="api_key_not_found")
        plan = self.plan(plan_ref)
        if not plan.active:
            raise Conflict(f"plan '{plan.slug}' is deactivated: it takes no new assignments",
                           param="plan", code="plan_inactive")
        current = self.book.current_assignment(api_key_id)
        if current is not None and current.status != CANCELLED:
            raise Conflict(f"the key already has a {current.status} assignment ({current.id}); "
                           "cancel it or change its plan", param="api_key_id", code="assignment_exists")
        now = self.clock()
        start = _parse_time(starts_at, "starts_at") or now
        end = _parse_time(ends_at, "ends_at")
        sequence = len(self.book.by_key.get(api_key_id, ()))
        assignment = Assignment.assign(assignment_id_for(api_key_id, sequence), api_key_id, plan.id,
                                       start, end, now)
        await self._save(assignment, conflict="the key was assigned meanwhile; retry", param="api_key_id")
        return self.book.assignments[str(assignment.id)]

    async def _change_assignment(self, assignment_id: str, change: Callable[[Assignment], Any]) -> AssignmentRecord:
        self.assignment(assignment_id)
        assignment = await self._load(assignment_id)
        change(assignment)
        await self._save(assignment, conflict="the assignment changed meanwhile; retry")
        return self.book.assignments[assignment_id]

    async def suspend(self, assignment_id: str, reason: str) -> AssignmentRecord:
        return await self._change_assignment(assignment_id, lambda a: a.suspend(reason, self.clock()))

    async def reactivate(self, assignment_id: str) -> AssignmentRecord:
        record = self.assignment(assignment_id)
        current = self.book.current_assignment(record.api_key_id)
        if current is not None and current.id != record.id and current.status == ACTIVE:
            raise Conflict("the key has another active assignment", param="api_key_id", code="assignment_exists")
        return await self._change_assignment(assignment_id, lambda a: a.reactivate(self.clock()))

    async def cancel(self, assignment_id: str, reason: str) -> AssignmentRecord:
        return await self._change_assignment(assignment_id, lambda a: a.cancel(reason, self.clock()))

    async def change_plan(self, assignment_id: str, plan_ref: str, effective_at: str | None = None) -> AssignmentRecord:
        plan = self.plan(plan_ref)
        if not plan.active:
            raise Conflict(f"plan '{plan.slug}' is deactivated", param="plan", code="plan_inactive")
        now = self.clock()
        effective = _parse_time(effective_at, "effective_at") or now
        return await self._change_assignment(assignment_id, lambda a: a.change_plan(plan.id, effective, now))

    async def update_assignment(self, assignment_id: str, ends_at: str | None) -> AssignmentRecord:
        end = _parse_time(ends_at, "ends_at")
        return await self._change_assignment(assignment_id, lambda a: a.update(end, self.clock()))
