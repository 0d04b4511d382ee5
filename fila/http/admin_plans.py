"""/admin/plans: list, create, show, update, delete, activate, deactivate, stats (admin token).

``{ref}`` is a plan's id or its slug. Plan terms are a free object checked by the domain
(``fila.domain.plans.validate_terms``), so a bad one is a 400 naming the field. Lists page
with an opaque cursor (``?limit=`` 1..500, default 100; ``?cursor=`` the previous ``next``),
in a stable order: created_at, then id. The helpers here serve /admin/assignments too.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import FromPath

from fila.domain.errors import InvalidRequest
from fila.domain.time import parse_iso
from fila.http.admin_keys import _admin, decode_body, json
from fila.services.plan_stats import assignment_counts

DEFAULT_LIMIT, MAX_LIMIT = 100, 500


# -- shared by the admin controllers ---------------------------------------------------------------

def decode(raw: bytes, kind: Any, *, allow_empty: bool = False) -> Any:
    """``decode_body``, and an unknown field is named in ``field`` too."""
    try:
        return decode_body(raw, kind, allow_empty=allow_empty)
    except InvalidRequest as error:
        if error.param is None and "unknown field `" in error.message:
            error.param = error.message.split("unknown field `", 1)[1].split("`", 1)[0]
        raise


def decode_object(raw: bytes) -> dict[str, Any]:
    return decode(raw, dict[str, Any])


def _order(record: Any) -> tuple[datetime, str]:
    return parse_iso(record.created_at), record.id


def _cursor_of(record: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([record.created_at, record.id])).decode().rstrip("=")


def _after(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, record_id = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)),
                                                    type=tuple[str, str])
        return parse_iso(created_at), record_id
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidRequest("'cursor' is not a cursor this API gave out (use the 'next' of a list)",
                             param="cursor", code="invalid_cursor") from None


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIMIT}", param="limit")
    return int(raw)


def paginate(request: Request, records: Iterable[Any], public: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """One page of ``records`` (anything with ``created_at`` and ``id``): ``{"items", "next"}``."""
    limit = _limit(request)
    ordered = sorted(records, key=_order)
    cursor = request.query_params.get("cursor")
    if cursor:
        after = _after(cursor)
        ordered = [record for record in ordered if _order(record) > after]
    items = ordered[:limit]
    return {"items": [public(record) for record in items],
            "next": _cursor_of(items[-1]) if len(ordered) > limit else None}


def query_choice(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name)
    if value is not None and value not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}", param=name)
    return value


# -- plans ---------------------------------------------------------------------------------------

@get("/admin/plans", summary="List plans (deleted ones are left out); ?active=true|false")
async def list_plans(request: Request) -> Response:
    container = _admin(request)
    active = query_choice(request, "active", ("true", "false"))
    plans = [p for p in list(container.plans.plans.values())
             if not p.deleted and (active is None or p.active == (active == "true"))]
    return json(paginate(request, plans, lambda plan: plan.to_public()))


@post("/admin/plans", status_code=201, summary="Create a plan: {slug, name, ...terms}")
async def create_plan(request: Request) -> Response:
    container = _admin(request)
    body = decode_object(await request.body())
    if "slug" not in body:
        raise InvalidRequest("'slug' is required", param="slug", code="missing_field")
    slug = body.pop("slug")
    record = await container.plan_service.create(slug, body)
    return json(record.to_public(), 201)


@get("/admin/plans/{ref:str}", summary="Show a plan (by id or slug)")
async def show_plan(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    return json(container.plan_service.plan(ref).to_public())


@patch("/admin/plans/{ref:str}", summary="Change any subset of a plan's terms (a new plan version)")
async def update_plan(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode_object(await request.body())
    return json((await container.plan_service.update(ref, body)).to_public())


@delete("/admin/plans/{ref:str}", status_code=200,
        summary="Delete a plan that was never assigned (otherwise 409: deactivate it)")
async def delete_plan(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    record = await container.plan_service.delete(ref)
    return json(dict(record.to_public(), deleted=True))


@post("/admin/plans/{ref:str}/activate", status_code=200, summary="Let a plan take new assignments")
async def activate_plan(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    return json((await container.plan_service.activate(ref)).to_public())


@post("/admin/plans/{ref:str}/deactivate", status_code=200,
      summary="Stop a plan taking new assignments (existing ones keep it)")
async def deactivate_plan(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    return json((await container.plan_service.deactivate(ref)).to_public())


@get("/admin/plans/{ref:str}/stats",
     summary="Assignments by status, tokens and requests this cycle, revenue so far")
async def plan_stats(request: Request, ref: FromPath[str]) -> Response:
    container = _admin(request)
    plan = container.plan_service.plan(ref)
    usage = await container.plan_usage(plan.id)
    return json({"plan_id": plan.id, "slug": plan.slug,
                 "assignments": assignment_counts(container.plans, plan.id), **usage})


ROUTES = [list_plans, create_plan, show_plan, update_plan, delete_plan, activate_plan, deactivate_plan,
          plan_stats]
