"""Plans and assignments in memory, for the hot path and the admin API (fed by the Registry)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fila.domain.plans import ACTIVE, CANCELLED, SUSPENDED


@dataclass(slots=True)
class PlanRecord:
    id: str
    slug: str
    terms: dict[str, Any]
    version: int
    created_at: str
    updated_at: str
    active: bool = True
    deleted: bool = False

    def to_public(self) -> dict[str, Any]:
        return {"id": self.id, "slug": self.slug, "version": self.version, "active": self.active,
                "created_at": self.created_at, "updated_at": self.updated_at, **self.terms}


@dataclass(slots=True)
class AssignmentRecord:
    id: str
    api_key_id: str
    plan_id: str
    starts_at: str
    ends_at: str | None
    status: str
    created_at: str
    updated_at: str
    version: int
    reason: str | None = None
    plan_history: list[list[str]] = field(default_factory=list)


@dataclass
class PlanBook:
    plans: dict[str, PlanRecord] = field(default_factory=dict)
    by_slug: dict[str, PlanRecord] = field(default_factory=dict)
    assignments: dict[str, AssignmentRecord] = field(default_factory=dict)
    by_key: dict[str, list[AssignmentRecord]] = field(default_factory=dict)
    ever_assigned: set[str] = field(default_factory=set)

    def attach(self, registry: Any) -> PlanBook:
        for topic, handler in {
            "fila:Plan.Defined": self._plan_defined, "fila:Plan.Updated": self._plan_updated,
            "fila:Plan.Activated": self._plan_flag(active=True),
            "fila:Plan.Deactivated": self._plan_flag(active=False),
            "fila:Plan.Deleted": self._plan_deleted,
            "fila:Assignment.Assigned": self._assigned,
            "fila:Assignment.Suspended": self._status(SUSPENDED),
            "fila:Assignment.Reactivated": self._status(ACTIVE),
            "fila:Assignment.Cancelled": self._status(CANCELLED),
            "fila:Assignment.PlanChanged": self._plan_changed,
            "fila:Assignment.Updated": self._assignment_updated,
        }.items():
            registry.register(topic, handler)
        return self

    # -- queries ---------------------------------------------------------------------------------

    def current_assignment(self, api_key_id: str) -> AssignmentRecord | None:
        """The key's assignment that is not cancelled (there is at most one), else its latest one."""
        history = self.by_key.get(api_key_id)
        if not history:
            return None
        for record in reversed(history):
            if record.status != CANCELLED:
                return record
        return history[-1]

    def live_plan(self, slug: str) -> PlanRecord | None:
        plan = self.by_slug.get(slug)
        return None if plan is None or plan.deleted else plan

    # -- handlers ----------------------------------------------------------------------------------

    def _plan_defined(self, plan_id: str, state: dict[str, Any], version: int) -> None:
        record = PlanRecord(id=plan_id, slug=state["slug"], terms=state["terms"], version=version,
                            created_at=state["at"], updated_at=state["at"])
        self.plans[plan_id] = record
        self.by_slug[record.slug] = record

    def _plan_updated(self, plan_id: str, state: dict[str, Any], version: int) -> None:
        record = self.plans[plan_id]
        record.terms = {**record.terms, **state["changes"]}
        record.version, record.updated_at = version, state["at"]

    def _plan_flag(self, active: bool):
        def handle(plan_id: str, state: dict[str, Any], version: int) -> None:
            record = self.plans[plan_id]
            record.active, record.version, record.updated_at = active, version, state["at"]
        return handle

    def _plan_deleted(self, plan_id: str, state: dict[str, Any], version: int) -> None:
        record = self.plans[plan_id]
        record.deleted, record.active, record.version, record.updated_at = True, False, version, state["at"]

    def _assigned(self, assignment_id: str, state: dict[str, Any], version: int) -> None:
        record = AssignmentRecord(id=assignment_id, api_key_id=state["api_key_id"], plan_id=state["plan_id"],
                                  starts_at=state["starts_at"], ends_at=state["ends_at"], status=ACTIVE,
                                  created_at=state["at"], updated_at=state["at"], version=version,
                                  plan_history=[[state["plan_id"], state["starts_at"]]])
        self.assignments[assignment_id] = record
        self.by_key.setdefault(record.api_key_id, []).append(record)
        self.ever_assigned.add(record.plan_id)

    def _status(self, status: str):
        def handle(assignment_id: str, state: dict[str, Any], version: int) -> None:
            record = self.assignments[assignment_id]
            record.status, record.version, record.updated_at = status, version, state["at"]
            record.reason = state.get("reason")
        return handle

    def _plan_changed(self, assignment_id: str, state: dict[str, Any], version: int) -> None:
        record = self.assignments[assignment_id]
        record.plan_id = state["to_plan_id"]
        record.plan_history = [*record.plan_history, [state["to_plan_id"], state["effective_at"]]]
        record.version, record.updated_at = version, state["at"]
        self.ever_assigned.add(record.plan_id)

    def _assignment_updated(self, assignment_id: str, state: dict[str, Any], version: int) -> None:
        record = self.assignments[assignment_id]
        record.ends_at, record.version, record.updated_at = state["ends_at"], version, state["at"]
