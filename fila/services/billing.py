"""Billing and usage for the admin API and for clients: cycles, their transitions, reports, usage.

Reads come from the projection views (``billing_cycles``; ``token_usage_log`` and ``usage_daily``
through ``fila.projections.usage``). Every read first waits, bounded, until the billing view has
projected the log's head as it was when the read began, and every admin write waits for its own
event to be projected before answering (read-your-writes); after ``wait_s`` it answers with what
the view holds, with ``as_of_position`` saying how far that is.

``CycleCloser`` is the projector's process step: after the projector catches up, it stores the
``Closed`` event of each cycle the fold marked due for closing (``close_requested_position``). Its
id is deterministic, so a second closer (another process, a rebuild replaying the trigger, an
admin) collides in the store and nothing is closed twice.

:func:`recompute_cycle` (the auditor's replay from raw events) lives in
``fila.domain.billing_fold`` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import structlog
from eventsourcing.persistence import IntegrityError

from fila.domain.billing import CycleBill
from fila.domain.billing_cycle import OPEN, STATUSES, BillingCycle, cycle_id_for
from fila.domain.billing_fold import micros, recompute_cycle
from fila.domain.cycles import cycle_by_index, cycle_index
from fila.domain.errors import Conflict, InvalidRequest, NotFound
from fila.domain.money import Money
from fila.domain.plans import terms_of
from fila.domain.time import iso, parse_iso
from fila.projections import usage as usage_views
from fila.projections.billing import CYCLE_COLUMNS, BillingView
from fila.projections.db import Database

__all__ = ["BillingService", "CycleCloser", "recompute_cycle"]

log = structlog.get_logger("fila.billing")
_decode = msgspec.json.Decoder().decode

VIEW = BillingView.name
TABLE = "billing_cycles"
PUBLIC_COLUMNS = tuple(c for c in CYCLE_COLUMNS if c not in ("state", "shadow", "starts_us", "ends_us"))
AMOUNTS = ("base_minor", "overage_input_minor", "overage_output_minor", "adjustments_minor", "total_minor")
REPORT_COLUMNS = ("id", "api_key_id", "assignment_id", "plan_slug", "status", "starts_at", "ends_at", "requests",
                  "input_tokens", "output_tokens", "cache_hits", "overage_input_tokens", "overage_output_tokens",
                  "overage_tokens", "base_minor", "overage_input_minor", "overage_output_minor", "adjustments_minor",
                  "total_minor", "currency")
SUMMED = ("cycles", "requests", "input_tokens", "output_tokens", "cache_hits", "overage_input_tokens",
          "overage_output_tokens", "overage_tokens", *AMOUNTS)
REPORT_ROWS_MAX = 100_000


def money(minor: int, currency: str) -> dict[str, Any]:
    return {"amount_minor": minor, "currency": currency, "amount": f"{Money(minor, currency).to_decimal():.2f}"}


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return usage_views.usage_csv(rows, columns)


def _time_param(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        return parse_iso(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO-8601 date or a datetime with a timezone, got {value!r}",
                             param=name) from None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row[c] for c in PUBLIC_COLUMNS}
    out["amounts"] = {name.removesuffix("_minor"): money(row[name], row["currency"]) for name in AMOUNTS}
    out["close_pending"] = row["status"] == OPEN and row["close_requested_position"] is not None
    return out


class CycleCloser:
    """Stores the ``Closed`` event of every cycle the billing view marked due (see the module docstring)."""

    def __init__(self, store: Any, db: Database, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.db = db
        self.clock = clock or (lambda: datetime.now(UTC))

    def run_once(self, limit: int = 1000) -> int:
        if not self.db.table_exists(TABLE):
            return 0
        rows = self.db.read(f"SELECT id, assignment_id, api_key_id, cycle_index, starts_at, ends_at FROM {TABLE} "
                            "WHERE status = 'open' AND close_requested_position IS NOT NULL "
                            "ORDER BY ends_us, id LIMIT ?", (limit,))
        closed = 0
        head = _chain_head(self.db) if rows else None
        for cycle_id, assignment_id, api_key_id, index, starts_at, ends_at in rows:
            try:
                cycle = BillingCycle.close(assignment_id, api_key_id, int(index), parse_iso(starts_at),
                                           parse_iso(ends_at), by="fila", now=self.clock(),
                                           reason="activity after the cycle's end", chain_head=head)
            except Conflict:       # this host's clock is behind the activity's: a later pass closes it
                continue
            try:
                self.store.save(cycle)
            except IntegrityError:  # closed already (an admin, another process, an earlier pass)
                continue
            closed += 1
            log.info("cycle_closed", cycle_id=cycle_id, by="fila")
        return closed


def _chain_head(db: Database) -> dict[str, Any] | None:
    try:
        from fila.projections.chain import chain_head
    except ImportError:   # the audit chain is optional
        return None
    return chain_head(db)


class BillingService:
    def __init__(self, *, batcher: Any, projector: Any, db: Database, book: Any,
                 clock: Callable[[], datetime] | None = None, wait_s: float = 5.0) -> None:
        self.batcher = batcher
        self.projector = projector
        self.db = db
        self.book = book
        self.clock = clock or (lambda: datetime.now(UTC))
        self.wait_s = wait_s

    # -- read-your-writes --------------------------------------------------------------------------

    async def caught_up(self, position: int | None = None, timeout: float | None = None) -> int:
        """Wait (bounded) until the billing view has projected ``position`` (default: the log's head)."""
        if position is None:
            position = await self.batcher.run(self.projector.head)
        deadline = time.monotonic() + (self.wait_s if timeout is None else timeout)
        while True:
            current = await self.batcher.run(self.projector.position, VIEW)
            if current >= position or time.monotonic() >= deadline:
                return current
            await asyncio.sleep(0.005)

    # -- cycles: reads ---------------------------------------------------------------------------------

    def _where(self, api_key_id: str | None = None, assignment_id: str | None = None, plan: str | None = None,
               status: str | None = None, since: str | None = None,
               until: str | None = None) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}", param="status")
        if plan is not None:
            record = self.book.plans.get(plan) or self.book.by_slug.get(plan)
            if record is None:
                raise NotFound(f"no plan '{plan}'", param="plan", code="plan_not_found")
            plan = record.id
        for column, value in (("api_key_id", api_key_id), ("assignment_id", assignment_id), ("plan_id", plan),
                              ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        start, end = _time_param(since, "since"), _time_param(until, "until")
        if start is not None:      # the period filter keeps the cycles overlapping [since, until)
            where.append("ends_us > ?")
            params.append(micros(start))
        if end is not None:
            where.append("starts_us < ?")
            params.append(micros(end))
        return where, params

    def _select(self, where: list[str], params: list[Any], *, order: str = "starts_us DESC, id DESC",
                limit: int | None = None) -> list[dict[str, Any]]:
        sql = (f"SELECT {', '.join(CYCLE_COLUMNS)} FROM {TABLE}" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY {order}" + (" LIMIT ?" if limit is not None else ""))
        rows = self.db.read(sql, (*params, limit) if limit is not None else tuple(params))
        return [dict(zip(CYCLE_COLUMNS, row)) for row in rows]

    async def list_cycles(self, *, cursor: str | None = None, limit: int = 50, **filters: str | None) -> dict[str, Any]:
        if not 1 <= limit <= 500:
            raise InvalidRequest("'limit' must be between 1 and 500", param="limit")
        where, params = self._where(**filters)
        if cursor:
            try:
                starts_us, cycle_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
                starts = int(starts_us)
            except ValueError:
                raise InvalidRequest("'cursor' is not one this API gave", param="cursor") from None
            where.append("(starts_us < ? OR (starts_us = ? AND id < ?))")
            params += [starts, starts, cycle_id]
        position = await self.caught_up()
        rows = await self.batcher.run(lambda: self._select(where, params, limit=limit + 1))
        items = [_public(r) for r in rows[:limit]]
        following = None
        if len(rows) > limit:
            last = rows[limit - 1]
            following = base64.urlsafe_b64encode(f"{last['starts_us']}|{last['id']}".encode()).decode()
        return {"items": items, "next": following, "as_of_position": position}

    async def _row(self, cycle_id: str) -> dict[str, Any]:
        try:
            cycle_id = str(UUID(cycle_id))
        except ValueError:
            raise InvalidRequest(f"{cycle_id!r} is not a valid cycle id", param="id") from None
        rows = await self.batcher.run(lambda: self._select(["id = ?"], [cycle_id]))
        if not rows:
            raise NotFound(f"no billing cycle {cycle_id}", param="id", code="cycle_not_found")
        return rows[0]

    async def cycle(self, cycle_id: str, *, position: int | None = None) -> dict[str, Any]:
        """One cycle with its line items (as of the view having projected ``position``, default the head)."""
        as_of = await self.caught_up(position)
        row = await self._row(cycle_id)
        bill = CycleBill.from_state(_decode(row["state"]))
        out = _public(row)
        out["lines"] = [{"kind": line.kind, "description": line.description, "quantity": line.quantity,
                         **money(line.amount.amount_minor, line.amount.currency)} for line in bill.lines()]
        out["segments"] = [{"plan_id": t.plan_id, "plan_slug": t.plan_slug, "plan_version": t.plan_version,
                            "starts_at": iso(p.start), "ends_at": iso(p.end)} for p, t in bill.segments()]
        out["as_of_position"] = as_of
        return out

    # -- cycles: transitions ---------------------------------------------------------------------------

    async def _commit(self, aggregate: Any, conflict: str) -> int:
        try:
            recordings = await self.batcher.commit(aggregate)
        except IntegrityError:
            raise Conflict(conflict, code="invalid_transition", param="status") from None
        return recordings[-1].notification.id

    async def _load(self, row: dict[str, Any]) -> BillingCycle:
        def load() -> BillingCycle | None:
            try:
                return self.batcher.store.repository.get(UUID(row["id"]))
            except Exception as error:  # AggregateNotFoundError; named differently across versions
                if type(error).__name__ == "AggregateNotFoundError":
                    return None
                raise
        cycle = await self.batcher.run(load)
        if cycle is None:
            raise Conflict(f"the cycle is {row['status']}: close it first", code="invalid_transition",
                           param="status")
        return cycle

    async def close(self, cycle_id: str, by: str) -> dict[str, Any]:
        await self.caught_up()
        row = await self._row(cycle_id)
        if row["status"] != OPEN:
            raise Conflict(f"the cycle is already {row['status']}", code="invalid_transition", param="status")
        head = await self.batcher.run(_chain_head, self.db)
        cycle = BillingCycle.close(row["assignment_id"], row["api_key_id"], int(row["cycle_index"]),
                                   parse_iso(row["starts_at"]), parse_iso(row["ends_at"]), by=by, now=self.clock(),
                                   reason="closed by an admin", chain_head=head)
        position = await self._commit(cycle, "the cycle was closed meanwhile")
        log.info("cycle_closed", cycle_id=row["id"], by=by)
        return await self.cycle(row["id"], position=position)

    async def mark_billed(self, cycle_id: str, by: str, reference: str | None = None) -> dict[str, Any]:
        await self.caught_up()
        row = await self._row(cycle_id)
        cycle = await self._load(row)
        cycle.mark_billed(amount_minor=row["total_minor"], currency=row["currency"], by=by, now=self.clock(),
                          reference=reference)
        position = await self._commit(cycle, "the cycle changed meanwhile; retry")
        return await self.cycle(row["id"], position=position)

    async def mark_paid(self, cycle_id: str, by: str, reference: str | None = None) -> dict[str, Any]:
        row = await self._row(cycle_id)
        cycle = await self._load(row)
        cycle.mark_paid(by=by, now=self.clock(), reference=reference)
        position = await self._commit(cycle, "the cycle changed meanwhile; retry")
        return await self.cycle(row["id"], position=position)

    async def adjust(self, cycle_id: str, amount_minor: int, reason: str, by: str) -> dict[str, Any]:
        row = await self._row(cycle_id)
        cycle = await self._load(row)
        cycle.adjust(amount_minor=amount_minor, currency=row["currency"], reason=reason, by=by, now=self.clock())
        position = await self._commit(cycle, "the cycle changed meanwhile; retry")
        return await self.cycle(row["id"], position=position)

    # -- cycles: report and stats ---------------------------------------------------------------------------

    async def report(self, group_by: str = "cycle", fmt: str = "json", **filters: str | None) -> tuple[str, Any]:
        """(media type, body): per cycle, per plan (the plan in force at the cycle's end) or per month."""
        if group_by not in ("cycle", "plan", "period"):
            raise InvalidRequest("'group_by' must be one of cycle, plan, period", param="group_by")
        if fmt not in ("json", "csv"):
            raise InvalidRequest("'format' must be json or csv", param="format")
        where, params = self._where(**filters)
        await self.caught_up()
        rows = await self.batcher.run(lambda: self._select(where, params, order="starts_us, id",
                                                           limit=REPORT_ROWS_MAX))
        if group_by == "cycle":
            items = [{c: r[c] for c in REPORT_COLUMNS} for r in rows]
            columns = list(REPORT_COLUMNS)
        else:
            groups: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rows:
                label = (r["plan_slug"] or "-") if group_by == "plan" else r["starts_at"][:7]
                item = groups.setdefault((label, r["currency"]), {
                    group_by: label, **({"plan_id": r["plan_id"]} if group_by == "plan" else {}),
                    "currency": r["currency"], **dict.fromkeys(SUMMED, 0)})
                item["cycles"] += 1
                for name in SUMMED[1:]:
                    item[name] += r[name] or 0
            items = [groups[k] for k in sorted(groups)]
            columns = [group_by, *(["plan_id"] if group_by == "plan" else []), "currency", *SUMMED]
        for item in items:
            item["total"] = f"{Money(item['total_minor'], item['currency']).to_decimal():.2f}"
        columns.append("total")
        if fmt == "csv":
            return "text/csv; charset=utf-8", _csv(items, columns)
        totals: dict[str, int] = {}
        for item in items:
            totals[item["currency"]] = totals.get(item["currency"], 0) + item["total_minor"]
        return "application/json", {"group_by": group_by, "items": items,
                                    "totals": [money(m, c) for c, m in sorted(totals.items())]}

    async def stats(self) -> dict[str, Any]:
        """Revenue of the cycles starting this UTC month, its overage part, and what is owed (closed or billed)."""
        now = self.clock()
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        next_month = month_start.replace(year=month_start.year + month_start.month // 12,
                                         month=month_start.month % 12 + 1)
        await self.caught_up()

        def read() -> tuple[list[tuple], list[tuple]]:
            month = self.db.read(f"SELECT currency, COUNT(*), SUM(total_minor), "
                                 f"SUM(overage_input_minor + overage_output_minor) FROM {TABLE} "
                                 "WHERE starts_us >= ? AND starts_us < ? GROUP BY currency ORDER BY currency",
                                 (micros(month_start), micros(next_month)))
            by_status = self.db.read(f"SELECT status, currency, COUNT(*), SUM(total_minor) FROM {TABLE} "
                                     "GROUP BY status, currency ORDER BY status, currency")
            return month, by_status

        month, by_status = await self.batcher.run(read)
        unpaid = [(c, int(n), int(total)) for status, c, n, total in by_status if status in ("closed", "billed")]
        unpaid_by_currency: dict[str, list[int]] = {}
        for currency, n, total in unpaid:
            acc = unpaid_by_currency.setdefault(currency, [0, 0])
            acc[0] += n
            acc[1] += total
        return {
            "month": month_start.strftime("%Y-%m"),
            "revenue_this_month": [money(int(total), c) for c, _, total, _ in month],
            "overage_revenue_this_month": [money(int(over), c) for c, _, _, over in month],
            "cycles_this_month": sum(int(n) for _, n, _, _ in month),
            "unpaid": [dict(money(total, c), cycles=n) for c, (n, total) in sorted(unpaid_by_currency.items())],
            "cycles_by_status": {s: sum(int(n) for status, _, n, _ in by_status if status == s) for s in STATUSES},
        }

    # -- usage ------------------------------------------------------------------------------------------------

    @staticmethod
    def _usage_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as error:
            text = str(error)
            param = next((p for p in ("since", "until", "limit", "order", "group_by") if text.startswith(p)), None)
            raise InvalidRequest(text, param=param) from None

    async def usage_log(self, **query: Any) -> dict[str, Any]:
        await self.caught_up()
        page = await self.batcher.run(lambda: self._usage_call(usage_views.usage_log, self.db, **query))
        return {"items": page["data"], "next": page["next_cursor"]}

    async def usage_stats(self, group_by: str, **query: Any) -> dict[str, Any]:
        await self.caught_up()
        items = await self.batcher.run(lambda: self._usage_call(usage_views.usage_stats, self.db, group_by, **query))
        return {"group_by": group_by, "items": items}

    async def usage_report(self, group_by: str | None = None, **query: Any) -> str:
        """CSV: the request log (every matching row, oldest first), or the stats per ``group_by``."""
        if group_by is not None:
            return usage_views.usage_csv((await self.usage_stats(group_by, **query))["items"])
        await self.caught_up()

        def read() -> str:
            rows: list[dict[str, Any]] = []
            cursor = None
            while len(rows) < REPORT_ROWS_MAX:
                page = self._usage_call(usage_views.usage_log, self.db, cursor=cursor, limit=10_000, order="asc",
                                        **query)
                rows += page["data"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            return usage_views.usage_csv(rows, list(usage_views.LOG_READ_COLUMNS))
        return await self.batcher.run(read)

    # -- the current cycle of a key ---------------------------------------------------------------------------

    async def key_usage(self, api_key_id: str, *, wait_for: int | None = None) -> dict[str, Any]:
        """Included, used, remaining and overage so far in the key's current cycle."""
        as_of = await self.caught_up(wait_for, timeout=min(self.wait_s, 2.0))
        out: dict[str, Any] = {"object": "usage", "api_key_id": api_key_id, "as_of_position": as_of}
        assignment = self.book.current_assignment(api_key_id)
        now = self.clock()
        starts_at = parse_iso(assignment.starts_at) if assignment is not None else None
        if assignment is None or starts_at is None or now < starts_at or assignment.status == "cancelled":
            return dict(out, plan=None, cycle=None, included_tokens=0, used_tokens=0, remaining_tokens=0,
                        overage_tokens=0, overage_input_tokens=0, overage_output_tokens=0, requests=0)
        index = cycle_index(starts_at, now)
        cycle_id = str(cycle_id_for(assignment.id, index))
        rows = await self.batcher.run(lambda: self._select(["id = ?"], [cycle_id]))
        if rows:
            row = rows[0]
            bill = CycleBill.from_state(_decode(row["state"]))
            status = row["status"]
        else:                 # no activity has made the cycle exist yet: its bill is the base fee alone
            period = cycle_by_index(starts_at, index)
            plan = self.book.plans.get(_plan_at(assignment.plan_history, period.start))
            if plan is None:
                return dict(out, plan=None, cycle=None)
            terms = terms_of(plan.id, plan.slug, plan.version, plan.terms)
            bill = CycleBill(period, terms.currency)
            bill.set_terms(terms, period.start)
            status = OPEN
        lines = bill.lines()
        overage = sum(line.amount.amount_minor for line in lines if line.kind.startswith("overage"))
        segments = bill.segments()
        return dict(out, plan=segments[-1][1].plan_slug if segments else None, assignment_id=assignment.id,
                    cycle={"id": cycle_id, "starts_at": iso(bill.period.start), "ends_at": iso(bill.period.end),
                           "status": status},
                    included_tokens=bill.included_tokens,
                    used_tokens=bill.billable_input_tokens + bill.billable_output_tokens,
                    included_used=bill.included_used, remaining_tokens=bill.included_remaining,
                    overage_tokens=bill.overage_input_tokens + bill.overage_output_tokens,
                    overage_input_tokens=bill.overage_input_tokens, overage_output_tokens=bill.overage_output_tokens,
                    requests=bill.requests, input_tokens=bill.input_tokens, output_tokens=bill.output_tokens,
                    cache_hits=bill.cache_hits, overage_amount=money(overage, bill.currency),
                    amount_so_far=money(bill.total().amount_minor, bill.currency))


def _plan_at(history: list[list[str]], moment: datetime) -> str:
    current = history[0][0]
    for plan_id, effective_at in history:
        if parse_iso(effective_at) <= moment:
            current = plan_id
    return current
