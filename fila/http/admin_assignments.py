"""/admin/assignments: put keys on plans, and suspend, reactivate, cancel, change plan (admin token).

An assignment answers with its plan's slug (``plan``) and its history of plans
(``plan_history``: ``{plan, plan_id, effective_at}``). Lists page like /admin/plans and take
``?api_key_id=``, ``?plan=`` (slug or id) and ``?status=`` filters.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, patch, post
from litestar.params import FromPath

from fila.domain.errors import NotFound
from fila.domain.plans import ACTIVE, CANCELLED, SUSPENDED
from fila.http.admin_keys import _admin, json
from fila.http.admin_plans import decode, paginate, query_choice
from fila.projections.planbook import AssignmentRecord, PlanBook
from fila.services.plan_stats import assignment_counts

Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class CreateAssignment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_key_id: str
    plan: str
    starts_at: str | None = None
    ends_at: str | None = None


class UpdateAssignment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ends_at: str | None          # required: null clears it


class Suspend(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Reason


class Cancel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Reason = "cancelled by an admin"


class ChangePlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    plan: str
    effective_at: str | None = None


class Empty(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


def assignment_public(record: AssignmentRecord, book: PlanBook) -> dict[str, Any]:
    def slug(plan_id: str) -> str | None:
        plan = book.plans.get(plan_id)
        return plan.slug if plan else None

    return {"id": record.id, "api_key_id": record.api_key_id, "plan": slug(record.plan_id),
            "plan_id": record.plan_id, "status": record.status, "starts_at": record.starts_at,
            "ends_at": record.ends_at, "reason": record.reason,
            "plan_history": [{"plan": slug(plan_id), "plan_id": plan_id, "effective_at": at}
                             for plan_id, at in record.plan_history],
            "created_at": record.created_at, "updated_at": record.updated_at, "version": record.version}


def _answer(container: Any, record: AssignmentRecord, status: int = 200) -> Response:
    return json(assignment_public(record, container.plans), status)


def _page(request: Request, container: Any, records: list[AssignmentRecord]) -> Response:
    return json(paginate(request, records, lambda record: assignment_public(record, container.plans)))


@get("/admin/assignments", summary="List assignments; ?api_key_id=, ?plan= (slug or id), ?status=")
async def list_assignments(request: Request) -> Response:
    container = _admin(request)
    status = query_choice(request, "status", (ACTIVE, SUSPENDED, CANCELLED))
    plan_ref = request.query_params.get("plan")
    plan_id = container.plan_service.plan(plan_ref).id if plan_ref is not None else None
    key_id = request.query_params.get("api_key_id")
    if key_id is not None and key_id not in container.registry.keys:
        raise NotFound(f"no API key '{key_id}'", param="api_key_id", code="api_key_not_found")
    records = [r for r in list(container.plans.assignments.values())
               if (status is None or r.status == status) and (plan_id is None or r.plan_id == plan_id)
               and (key_id is None or r.api_key_id == key_id)]
    return _page(request, container, records)


@post("/admin/assignments", status_code=201,
      summary="Put a key on a plan: {api_key_id, plan, starts_at?, ends_at?}")
async def create_assignment(request: Request) -> Response:
    container = _admin(request)
    body = decode(await request.body(), CreateAssignment)
    record = await container.plan_service.assign(body.api_key_id, body.plan, starts_at=body.starts_at,
                                                 ends_at=body.ends_at)
    return _answer(container, record, 201)


@get("/admin/assignments/stats",
     summary="Assignments by status and plan, tokens and requests this cycle, revenue so far")
async def assignment_stats(request: Request) -> Response:
    container = _admin(request)
    by_plan = {plan.slug: assignment_counts(container.plans, plan.id)
               for plan in list(container.plans.plans.values()) if plan.id in container.plans.ever_assigned}
    usage = await container.assignment_usage_stats()
    return json({"assignments": assignment_counts(container.plans), "by_plan": by_plan, **usage})


@get("/admin/assignments/{assignment_id:str}", summary="Show an assignment")
async def show_assignment(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    return _answer(container, container.plan_service.assignment(assignment_id))


@patch("/admin/assignments/{assignment_id:str}", summary="Change an assignment's end: {ends_at}")
async def update_assignment(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode(await request.body(), UpdateAssignment)
    return _answer(container, await container.plan_service.update_assignment(assignment_id, body.ends_at))


@post("/admin/assignments/{assignment_id:str}/suspend", status_code=200,
      summary="Suspend an active assignment (its key gets 403): {reason}")
async def suspend_assignment(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode(await request.body(), Suspend)
    return _answer(container, await container.plan_service.suspend(assignment_id, body.reason))


@post("/admin/assignments/{assignment_id:str}/reactivate", status_code=200,
      summary="Reactivate a suspended assignment (a cancelled one cannot be)")
async def reactivate_assignment(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    decode(await request.body(), Empty, allow_empty=True)
    return _answer(container, await container.plan_service.reactivate(assignment_id))


@post("/admin/assignments/{assignment_id:str}/cancel", status_code=200,
      summary="Cancel an assignment for good: {reason?}")
async def cancel_assignment(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode(await request.body(), Cancel, allow_empty=True)
    return _answer(container, await container.plan_service.cancel(assignment_id, body.reason))


@post("/admin/assignments/{assignment_id:str}/change-plan", status_code=200,
      summary="Move an assignment to another plan: {plan, effective_at?} (the bill prorates)")
async def change_plan(request: Request, assignment_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode(await request.body(), ChangePlan)
    return _answer(container, await container.plan_service.change_plan(assignment_id, body.plan,
                                                                        body.effective_at))


@get("/admin/api-keys/{key_id:str}/assignments", summary="A key's assignments, oldest first")
async def key_assignments(request: Request, key_id: FromPath[str]) -> Response:
    container = _admin(request)
    key = container.keys.get(key_id)
    return _page(request, container, list(container.plans.by_key.get(key.id, ())))


ROUTES = [list_assignments, create_assignment, assignment_stats, show_assignment, update_assignment,
          suspend_assignment, reactivate_assignment, cancel_assignment, change_plan, key_assignments]
