"""The billing view: one row per billing cycle, built by THE billing fold (``fila.domain.billing_fold``).

Each page loads the state the page's events need (the cycles and assignments they name, the
cycles the activity clock makes due, every plan version), runs the fold over the events in
log order, and upserts what changed, all inside the page's transaction. So a crash or a
replayed page leaves exactly the previous page boundary, and the rows after any sequence of
pages equal the rows of one pass over the log (a rebuild), column for column.

Tables (each + the rebuild suffix):

* ``billing_cycles``       a row per cycle: status, period, counters, amounts per kind of line,
  who closed / billed / paid it and when, ``close_requested_position`` (due for closing: the
  projector's closer stores the ``Closed`` event), ``state`` (the ``CycleBill`` as JSON, resumed
  by the next page and read for the line items) and ``shadow`` (prices late requests).
* ``billing_assignments``  what the fold needs of each assignment (anchor, end, plan history,
  latest cycle).
* ``billing_plan_terms``   every plan version's terms, so a request is priced by the version it
  recorded and a base fee by the version in force.
* ``billing_meta``         the activity clock (``watermark``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import msgspec

from fila.domain.billing import CycleBill
from fila.domain.billing_cycle import TOPIC_CLOSED
from fila.domain.billing_fold import (ASSIGNMENT_TOPICS, TOPICS, AssignmentState, BillingFold,
                                      CycleState, figures, micros)
from fila.domain.cycles import Period
from fila.domain.ledger import BILLABLE_OUTCOMES, RECORDED_TOPIC
from fila.domain.time import iso, parse_iso
from fila.projections.db import Tx
from fila.projections.runner import Note, Run, Step, View

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_CHUNK = 500
HOLD_AHEAD = timedelta(days=1)   # how far past the activity clock _hold loads what can become due
_LONG_AGO = datetime(1, 1, 1, tzinfo=UTC)
_EVENT = attrgetter("id", "topic", "originator_id", "state", "version")   # a Note as the fold takes an event

CYCLE_FIGURES = ("plan_id", "plan_slug", "plan_version", "requests", "cache_hits", "input_tokens", "output_tokens",
                 "billable_input_tokens", "billable_output_tokens", "included_tokens", "included_used",
                 "overage_input_tokens", "overage_output_tokens", "overage_tokens", "base_minor",
                 "overage_input_minor", "overage_output_minor", "adjustments_minor", "total_minor", "currency")
CYCLE_STATUS = ("status", "late_requests", "unbilled_requests", "close_requested_position", "closed_position",
                "closed_at", "closed_by", "billed_at", "billed_by", "billed_minor", "paid_at", "paid_by",
                "paid_reference", "opened_position", "updated_position")
CYCLE_COLUMNS = ("id", "assignment_id", "cycle_index", "api_key_id", "starts_at", "ends_at", "starts_us", "ends_us",
                 *CYCLE_FIGURES, *CYCLE_STATUS, "state", "shadow")
ASSIGNMENT_COLUMNS = ("id", "api_key_id", "starts_at", "starts_us", "ends_at", "status", "cancelled_at",
                      "plan_history", "last_index", "next_us", "updated_position")
PLAN_COLUMNS = ("plan_id", "version", "slug", "at", "terms")

_INTS = {"plan_version", "requests", "cache_hits", "input_tokens", "output_tokens", "billable_input_tokens",
         "billable_output_tokens", "included_tokens", "included_used", "overage_input_tokens",
         "overage_output_tokens", "overage_tokens", "base_minor", "overage_input_minor", "overage_output_minor",
         "adjustments_minor", "total_minor", "late_requests", "unbilled_requests", "close_requested_position",
         "closed_position", "billed_minor", "opened_position", "updated_position", "cycle_index", "starts_us",
         "ends_us"}


class BillingRecorded(msgspec.Struct, kw_only=True, gc=False):
    """The fields of ``fila:LedgerEntry.Recorded`` the fold reads (the rest is skipped when decoding)."""

    api_key_id: str = ""
    at: str = ""
    outcome: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache: str = "none"
    plan_id: str | None = None
    plan_version: int | None = None
    assignment_id: str | None = None


def _utc_time(text: str) -> datetime:
    """``parse_iso(text.replace("Z", "+00:00"))`` (what the fold reads a request time as), made
    cheaper for the times FILA writes (``iso()``: already UTC)."""
    if "Z" not in text:
        at = datetime.fromisoformat(text)
        if at.tzinfo is UTC:
            return at
    return parse_iso(text.replace("Z", "+00:00"))


def _ddl_type(column: str) -> str:
    return "BIGINT" if column in _INTS else "TEXT"


class BillingView(View):
    name = "billing"
    topics = TOPICS
    tables = ("billing_cycles", "billing_assignments", "billing_plan_terms", "billing_meta")
    state_types = {RECORDED_TOPIC: BillingRecorded}

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        c, a, p, m = (f"{t}{suffix}" for t in self.tables)
        cycle_cols = ", ".join(f"{col} {_ddl_type(col)}" for col in CYCLE_COLUMNS if col != "id")
        return [
            f"CREATE TABLE IF NOT EXISTS {c} (id TEXT PRIMARY KEY, {cycle_cols})",
            f"CREATE INDEX IF NOT EXISTS {c}_key_idx ON {c} (api_key_id, starts_us)",
            f"CREATE INDEX IF NOT EXISTS {c}_due_idx ON {c} (status, ends_us)",
            f"CREATE INDEX IF NOT EXISTS {c}_assignment_idx ON {c} (assignment_id, cycle_index)",
            f"CREATE INDEX IF NOT EXISTS {c}_starts_idx ON {c} (starts_us)",
            f"CREATE TABLE IF NOT EXISTS {a} (id TEXT PRIMARY KEY, api_key_id TEXT NOT NULL, starts_at TEXT NOT NULL, "
            "starts_us BIGINT NOT NULL, ends_at TEXT, status TEXT NOT NULL, cancelled_at TEXT, "
            "plan_history TEXT NOT NULL, last_index BIGINT NOT NULL, next_us BIGINT, updated_position BIGINT NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {a}_next_idx ON {a} (next_us)",
            f"CREATE TABLE IF NOT EXISTS {p} (plan_id TEXT NOT NULL, version BIGINT NOT NULL, slug TEXT NOT NULL, "
            "at TEXT NOT NULL, terms TEXT NOT NULL, PRIMARY KEY (plan_id, version))",
            f"CREATE TABLE IF NOT EXISTS {m} (name TEXT PRIMARY KEY, value TEXT)",
        ]

    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        self.stage(notes, suffix, Run(tx.fetchall))(tx)

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        """The fold carries its state from page to page of a run: after the first page it reads only
        what it has never held (see ``Run``), and the page's step writes what the page changed."""
        fold = run.state.get("fold")
        if fold is None:
            fold = run.state["fold"] = TableFold(run.read, suffix)
        fold.preload(notes)
        fold.apply_many(map(_EVENT, notes))
        return fold.flush()


def views() -> list[View]:
    return [BillingView()]


# -- rows <-> state ---------------------------------------------------------------------------------


def cycle_row(cycle: CycleState) -> tuple:
    assert cycle.bill is not None
    values: dict[str, Any] = {
        "id": cycle.id, "assignment_id": cycle.assignment_id, "cycle_index": cycle.index,
        "api_key_id": cycle.api_key_id, "starts_at": iso(cycle.period.start), "ends_at": iso(cycle.period.end),
        "starts_us": micros(cycle.period.start), "ends_us": micros(cycle.period.end), **figures(cycle),
        "state": _encode(cycle.bill.to_state()).decode(),
        "shadow": _encode(cycle.shadow.to_state()).decode() if cycle.shadow is not None else None,
    }
    for name in CYCLE_STATUS:
        values[name] = getattr(cycle, name)
    return tuple(values[c] for c in CYCLE_COLUMNS)


def cycle_from_row(row: Sequence[Any]) -> CycleState:
    r = dict(zip(CYCLE_COLUMNS, row))
    cycle = CycleState(
        id=r["id"], assignment_id=r["assignment_id"], api_key_id=r["api_key_id"], index=int(r["cycle_index"]),
        period=Period(parse_iso(r["starts_at"]), parse_iso(r["ends_at"])),
        bill=CycleBill.from_state(_decode(r["state"])),
        shadow=CycleBill.from_state(_decode(r["shadow"])) if r["shadow"] else None)
    for name in CYCLE_STATUS:
        setattr(cycle, name, r[name])
    return cycle


def _assignment_row(a: AssignmentState) -> tuple:
    history = _encode([[plan_id, iso(at)] for plan_id, at in a.plan_history]).decode()
    upcoming = a.next_start()
    return (a.id, a.api_key_id, iso(a.starts_at), micros(a.starts_at), iso(a.ends_at) if a.ends_at else None,
            a.status, iso(a.cancelled_at) if a.cancelled_at else None, history, a.last_index,
            micros(upcoming) if upcoming is not None else None, a.updated_position)


def _assignment_from_row(row: Sequence[Any]) -> AssignmentState:
    r = dict(zip(ASSIGNMENT_COLUMNS, row))
    return AssignmentState(
        id=r["id"], api_key_id=r["api_key_id"], starts_at=parse_iso(r["starts_at"]),
        ends_at=parse_iso(r["ends_at"]) if r["ends_at"] else None, status=r["status"],
        cancelled_at=parse_iso(r["cancelled_at"]) if r["cancelled_at"] else None,
        plan_history=[(plan_id, parse_iso(at)) for plan_id, at in _decode(r["plan_history"])],
        last_index=int(r["last_index"]), updated_position=int(r["updated_position"]))


def _upsert_sql(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(set(values))
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


class TableFold(BillingFold):
    """The fold over a run of pages, its state read from the view's tables (what it does not hold
    yet) through ``read``, and what each page changed written back by the page's step."""

    def __init__(self, read: Callable[[str, Sequence[Any]], list[tuple]], suffix: str = "") -> None:
        super().__init__()
        self.read = read
        self._started = False
        self.t_cycles, self.t_assignments, self.t_plans, self.t_meta = (
            f"{t}{suffix}" for t in BillingView.tables)
        self._dirty_cycles: dict[str, CycleState] = {}
        self._dirty_assignments: dict[str, AssignmentState] = {}
        self._stored_versions: set[tuple[str, int]] = set()
        self._stored_watermark: datetime | None = None
        self._times: dict[str, datetime] = {}   # the first page's request times, parsed once by preload
        self._held_until = _LONG_AGO            # nothing held yet: the first request has _hold load
        self._held_us: int | None = None        # ... and what it loaded (ends and starts up to here)
        self._plans_held: set[str] = set()      # assignments whose open cycles are all held

    # -- hooks ---------------------------------------------------------------------------------------

    def _load_assignment(self, assignment_id: str) -> AssignmentState | None:
        rows = self.read(f"SELECT {', '.join(ASSIGNMENT_COLUMNS)} FROM {self.t_assignments} WHERE id = ?",
                         (assignment_id,))
        return _assignment_from_row(rows[0]) if rows else None

    def _load_cycle(self, cycle_id: str) -> CycleState | None:
        rows = self.read(f"SELECT {', '.join(CYCLE_COLUMNS)} FROM {self.t_cycles} WHERE id = ?", (cycle_id,))
        return cycle_from_row(rows[0]) if rows else None

    def _request_time(self, text: Any) -> datetime | None:
        at = self._times.get(text)
        if at is not None or not isinstance(text, str):
            return at
        try:
            return _utc_time(text)
        except ValueError:
            return None

    def _hold(self, clock: datetime) -> None:
        """Load the open cycles not yet due that end, and the assignments whose next cycle starts,
        before a day past ``clock`` (those the fold does not hold are as committed: no page in
        flight has changed them)."""
        bound = clock + HOLD_AHEAD
        high = micros(bound)
        after, params = ("", ()) if self._held_us is None else (" AND {} > ?", (self._held_us,))
        due = self._load_cycles("status = 'open' AND close_requested_position IS NULL AND ends_us <= ?"
                                + after.format("ends_us"), (high, *params))
        self._load_assignments(c.assignment_id for c in due)
        for cycle in due:
            self._push_due(cycle)
        starting = self.read(f"SELECT id FROM {self.t_assignments} WHERE next_us <= ?" + after.format("next_us"),
                             (high, *params))
        self._load_assignments(r[0] for r in starting)
        for (assignment_id,) in starting:
            self._push_next(self.assignments[assignment_id])
        self._held_us, self._held_until = high, bound

    def _plan_changed(self, position: int, assignment_id: str, state: Any, version: int | None) -> None:
        if assignment_id not in self._plans_held:     # the change applies to every open cycle
            self._load_cycles("status = 'open' AND assignment_id = ?", (assignment_id,))
            self._plans_held.add(assignment_id)
        super()._plan_changed(position, assignment_id, state, version)

    def _mark(self, obj: AssignmentState | CycleState) -> None:
        if isinstance(obj, CycleState):
            self._dirty_cycles[obj.id] = obj
        else:
            self._dirty_assignments[obj.id] = obj

    # -- before and after the page -----------------------------------------------------------------------

    def _load_assignments(self, ids: Iterable[str]) -> None:
        for chunk in _chunks(i for i in ids if i not in self.assignments):
            marks = ", ".join("?" * len(chunk))
            for row in self.read(f"SELECT {', '.join(ASSIGNMENT_COLUMNS)} FROM {self.t_assignments} "
                                 f"WHERE id IN ({marks})", chunk):
                self.assignments[row[0]] = _assignment_from_row(row)

    def _load_cycles(self, where: str, params: Sequence[Any]) -> list[CycleState]:
        rows = self.read(f"SELECT {', '.join(CYCLE_COLUMNS)} FROM {self.t_cycles} WHERE {where}", params)
        return [self._register(cycle_from_row(row)) if row[0] not in self.cycles else self.cycles[row[0]]
                for row in rows]

    def preload(self, notes: Sequence[Note]) -> None:
        """On the run's first page, load the activity clock, every plan version, and in a few queries
        what the page will touch (later, the fold loads any miss one by one, and _hold what the
        activity clock can make due)."""
        self._times.clear()
        if self._started:
            return
        self._started = True
        rows = self.read(f"SELECT value FROM {self.t_meta} WHERE name = 'watermark'", ())
        self.watermark = self._stored_watermark = parse_iso(rows[0][0]) if rows and rows[0][0] else None
        for plan_id, version, slug, at, terms in self.read(
                f"SELECT {', '.join(PLAN_COLUMNS)} FROM {self.t_plans} ORDER BY plan_id, version", ()):
            self.plans.add(plan_id, int(version), parse_iso(at), slug, _decode(terms))
            self._stored_versions.add((plan_id, int(version)))

        assignment_ids: set[str] = set()
        cycle_ids: set[str] = set()
        entries: list[tuple[str, datetime]] = []
        times = self._times
        for note in notes:
            if note.topic == RECORDED_TOPIC:
                state = note.state
                text = state.at
                try:
                    at = times[text] = _utc_time(text)
                except ValueError:
                    continue
                if state.outcome in BILLABLE_OUTCOMES and state.assignment_id and state.plan_id:
                    entries.append((state.assignment_id, at))
            elif note.topic in ASSIGNMENT_TOPICS:
                assignment_ids.add(note.originator_id)
            else:
                cycle_ids.add(note.originator_id)
                if note.topic == TOPIC_CLOSED and isinstance(note.state, dict):
                    assignment_ids.add(str(note.state.get("assignment_id")))
        self._load_assignments(assignment_ids.union(e[0] for e in entries))
        counted: dict[str, tuple[datetime, datetime]] = {}    # the span of the cycle last counted, by assignment
        for assignment_id, at in entries:
            span = counted.get(assignment_id)
            if span is not None and span[0] <= at < span[1]:
                continue
            assignment = self.assignments.get(assignment_id)
            if assignment is not None and at >= assignment.starts_at:
                cycle_ids.add(self.cycle_id_at(assignment, at))
                span = self._spans[assignment_id]
                counted[assignment_id] = (span[0], span[1])
        for chunk in _chunks(i for i in cycle_ids if i not in self.cycles):
            self._load_cycles(f"id IN ({', '.join('?' * len(chunk))})", chunk)

    def flush(self) -> Step:
        """The rows the page changed, as a step writing them (the fold takes them as written)."""
        cycles = [cycle_row(c) for _, c in sorted(self._dirty_cycles.items())]
        assignments = [_assignment_row(a) for _, a in sorted(self._dirty_assignments.items())]
        self._dirty_cycles.clear()
        self._dirty_assignments.clear()
        new_versions = [(plan_id, v.version, v.slug, iso(v.at), _encode(v.terms).decode())
                        for plan_id, versions in sorted(self.plans.versions.items()) for v in versions
                        if (plan_id, v.version) not in self._stored_versions]
        self._stored_versions.update((row[0], row[1]) for row in new_versions)
        watermark = None
        if self.watermark is not None and self.watermark != self._stored_watermark:
            watermark = self._stored_watermark = self.watermark
        t_cycles, t_assignments, t_plans, t_meta = self.t_cycles, self.t_assignments, self.t_plans, self.t_meta

        def write(tx: Tx) -> None:
            if cycles:
                tx.executemany(_upsert_sql(t_cycles, CYCLE_COLUMNS, ("id",)), cycles)
            if assignments:
                tx.executemany(_upsert_sql(t_assignments, ASSIGNMENT_COLUMNS, ("id",)), assignments)
            if new_versions:
                tx.insert_many(t_plans, PLAN_COLUMNS, new_versions, key=("plan_id", "version"))
            if watermark is not None:
                tx.execute(_upsert_sql(t_meta, ("name", "value"), ("name",)), ("watermark", iso(watermark)))

        return write
