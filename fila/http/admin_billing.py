"""Billing cycles and token usage (admin token), and a key's current cycle (admin, and the client itself).

Routes: ``/admin/billing/cycles`` (list, filter, paginate), ``/report``, ``/stats``, ``/{id}`` (with
line items), ``/{id}/close``, ``/{id}/mark-billed``, ``/{id}/mark-paid``, ``/{id}/adjustments``;
``/admin/usage`` (the request log), ``/stats``, ``/report`` (CSV); ``/admin/api-keys/{id}/usage``;
``/v1/usage`` (the calling key). Writes answer the cycle as it is after the write (read-your-writes).
The actor recorded with a transition is the ``X-Fila-Actor`` header, else "admin".
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from fila.domain.errors import InvalidRequest
from fila.http.admin_keys import _admin, decode_body, json
from fila.http.auth import client_key

CYCLE_FILTERS = ("api_key_id", "assignment_id", "plan", "status", "since", "until")
USAGE_FILTERS = ("api_key_id", "model", "outcome", "since", "until")


class Transition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reference: str | None = None


class Adjustment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount_minor: int
    reason: str


def _actor(request: Request) -> str:
    return (request.headers.get("x-fila-actor") or "admin").strip() or "admin"


def _query(request: Request, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: request.query_params.get(name) for name in names}


def _int(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer", param=name) from None


def _text(body: str, media_type: str) -> Response:
    return Response(body, media_type=media_type)


# -- cycles ----------------------------------------------------------------------------------------


@get("/admin/billing/cycles", summary="List billing cycles (?api_key_id, plan, status, since, until, cursor, limit)")
async def list_cycles(request: Request) -> Response:
    container = _admin(request)
    return json(await container.billing.list_cycles(cursor=request.query_params.get("cursor"),
                                                    limit=_int(request, "limit", 50),
                                                    **_query(request, CYCLE_FILTERS)))


@get("/admin/billing/cycles/report", summary="Billing report per cycle, plan or month (?group_by, format=json|csv)")
async def cycles_report(request: Request) -> Response:
    container = _admin(request)
    media, body = await container.billing.report(request.query_params.get("group_by", "cycle"),
                                                 request.query_params.get("format", "json"),
                                                 **_query(request, CYCLE_FILTERS))
    return json(body) if media == "application/json" else _text(body, media)


@get("/admin/billing/cycles/stats", summary="Revenue this month, overage revenue, unpaid")
async def cycles_stats(request: Request) -> Response:
    container = _admin(request)
    return json(await container.billing.stats())


@get("/admin/billing/cycles/{cycle_id:str}", summary="One billing cycle with its line items")
async def show_cycle(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    return json(await container.billing.cycle(cycle_id))


@post("/admin/billing/cycles/{cycle_id:str}/close", status_code=200, summary="Close a cycle whose period has ended")
async def close_cycle(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    return json(await container.billing.close(cycle_id, _actor(request)))


@post("/admin/billing/cycles/{cycle_id:str}/mark-billed", status_code=200, summary="Mark a closed cycle billed")
async def mark_billed(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), Transition, allow_empty=True)
    return json(await container.billing.mark_billed(cycle_id, _actor(request), body.reference))


@post("/admin/billing/cycles/{cycle_id:str}/mark-paid", status_code=200, summary="Mark a billed cycle paid")
async def mark_paid(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), Transition, allow_empty=True)
    return json(await container.billing.mark_paid(cycle_id, _actor(request), body.reference))


@post("/admin/billing/cycles/{cycle_id:str}/adjustments", status_code=200,
      summary="Add an adjustment line (minor units; negative for a credit) to a closed or billed cycle")
async def adjust_cycle(request: Request, cycle_id: FromPath[str]) -> Response:
    container = _admin(request)
    body = decode_body(await request.body(), Adjustment)
    return json(await container.billing.adjust(cycle_id, body.amount_minor, body.reason, _actor(request)))


# -- usage -------------------------------------------------------------------------------------------


def _usage_query(request: Request) -> dict[str, Any]:
    return {k: v for k, v in _query(request, USAGE_FILTERS).items() if v is not None}


@get("/admin/usage", summary="The token usage log (?api_key_id, model, outcome, since, until, cursor, limit, order)")
async def usage_log(request: Request) -> Response:
    container = _admin(request)
    cursor = _int(request, "cursor", None)
    return json(await container.billing.usage_log(cursor=cursor, limit=_int(request, "limit", 100),
                                                  order=request.query_params.get("order", "desc"),
                                                  **_usage_query(request)))


@get("/admin/usage/stats", summary="Token usage per api_key, model or day (?group_by)")
async def usage_stats(request: Request) -> Response:
    container = _admin(request)
    query = _usage_query(request)
    query.pop("outcome", None)
    return json(await container.billing.usage_stats(request.query_params.get("group_by", "api_key"), **query))


@get("/admin/usage/report", summary="Token usage as CSV: the log, or the stats per ?group_by")
async def usage_report(request: Request) -> Response:
    container = _admin(request)
    query = _usage_query(request)
    group_by = request.query_params.get("group_by")
    if group_by is not None:
        query.pop("outcome", None)
    return _text(await container.billing.usage_report(group_by, **query), "text/csv; charset=utf-8")


@get("/admin/api-keys/{key_id:str}/usage", summary="A key's usage in its current billing cycle")
async def key_usage(request: Request, key_id: FromPath[str]) -> Response:
    container = _admin(request)
    record = container.keys.get(key_id)
    return json(await container.billing.key_usage(record.id))


@get("/v1/usage", summary="The calling key's current cycle: included, used, remaining, overage so far")
async def my_usage(request: Request) -> Response:
    container = request.app.state.container
    key = await client_key(request, container)
    return json(await container.billing.key_usage(key.id, wait_for=container.batcher.last_notification_id))


ROUTES = [list_cycles, cycles_report, cycles_stats, show_cycle, close_cycle, mark_billed, mark_paid, adjust_cycle,
          usage_log, usage_stats, usage_report, key_usage, my_usage]
