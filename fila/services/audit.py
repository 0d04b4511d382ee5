"""The auditor: hash-chain verification and cycle replay, from the raw events alone.

**verify** walks the stored events (``recorder.select_notifications``) and the ``audit_chain``
rows (``fila.projections.chain``) in step, by notification id, in windows of ``page`` ids:

- a chained event whose stored bytes (or id, originator, version, topic) hash differently ->
  **altered**;
- a chain row with no stored event -> **deleted** (named from the chain row);
- a stored event inside the chained range with no chain row -> **unchained** (inserted after
  the chain passed its position, or its chain row removed);
- a chain row whose link is not ``sha256(previous link + its event hash)`` -> **broken link**
  (the chain table itself was edited: rows removed or rewritten);
- a head recorded by a closed billing cycle that the chain no longer has -> **head mismatch**
  (the chain was recomputed after the cycle closed).

Stored events after the chain's head are fine: they are counted as "not yet chained".
Gaps in notification ids are normal (a rolled-back insert consumes an id) and never assumed away.

**replay** recomputes one billing cycle with THE billing fold (``fila.domain.billing_fold``, the
code the billing view runs, as ``recompute_cycle`` does) over the raw events read through the
recorder, lists every event that touched the cycle with the bill's running figures after it,
and compares the result with the cycle's row in the billing view, column by column. A
difference is explained with what can be proven from the events:

- the view lags (its row's ``updated_position`` is before the cycle's last event) and agrees
  with the events up to there -> the later events are listed;
- a running figure (requests, tokens, overage, total) whose value in the view is the replay's
  after some event -> the events after that point which change it are listed (the view leaves
  them out, or its value was set by hand);
- no prefix of the events gives the view's value -> said so; a total that is not the sum of
  the row's own amounts is named as an edit of the row, which no event accounts for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from fila.domain.billing_cycle import TOPIC_CLOSED, cycle_id_for
from fila.domain.billing_fold import TOPICS, BillingFold, figures
from fila.domain.errors import InvalidRequest, NotFound
from fila.domain.ledger import RECORDED_TOPIC
from fila.domain.time import iso, parse_iso
from fila.projections.billing import CYCLE_FIGURES, CYCLE_STATUS
from fila.projections.chain import GENESIS, TABLE, chain_head, event_hash, link_hash
from fila.projections.db import Database

MAX_LISTED = 1000          # problems listed per report (all are counted)


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str                   # altered | deleted | unchained | broken_link | head_mismatch
    notification_id: int
    originator_id: str | None = None
    originator_version: int | None = None
    topic: str | None = None
    detail: str = ""


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    stored_events: int               # stored events examined (up to the log's head when the walk began)
    chained_events: int              # chain rows examined
    verified_events: int             # events present in both whose hashes match
    not_yet_chained: int             # stored events after the chain's head: fine
    chain_head: dict[str, Any] | None
    log_head: int
    counts: dict[str, int]           # problems by kind
    problems: list[Problem]          # the first MAX_LISTED, in log order
    recorded_heads_checked: int = 0


def verify(db: Database, recorder: Any, *, page: int = 10_000,
           recorded_heads: Iterable[tuple[str, int, str]] = ()) -> VerifyReport:
    """Check every stored event against the hash chain; see the module docstring.

    ``recorded_heads``: (source, position, link_hash) triples recorded elsewhere (closed billing
    cycles); each must still be the chain's link at that position.
    """
    head = chain_head(db)
    head_position = head["position"] if head else 0
    log_head = recorder.max_notification_id() or 0
    end = max(log_head, head_position)       # deleted events at the end of the log are past log_head
    counts = {"altered": 0, "deleted": 0, "unchained": 0, "broken_link": 0, "head_mismatch": 0}
    problems: list[Problem] = []

    def report(problem: Problem) -> None:
        counts[problem.kind] += 1
        if len(problems) < MAX_LISTED:
            problems.append(problem)

    stored = chained = verified = pending = 0
    previous_link = GENESIS
    sql = (f"SELECT notification_id, link_hash, event_hash, originator_id, originator_version, topic "
           f"FROM {TABLE} WHERE notification_id > ? AND notification_id <= ? ORDER BY notification_id")
    has_chain = head is not None
    for position, stop, events in _pages(recorder, end, page, [], db):
        links = db.read(sql, (position, stop)) if has_chain else []
        by_id = {row[0]: row for row in links}
        for n in events:
            stored += 1
            row = by_id.pop(n.id, None)
            if row is None:
                if n.id > head_position:
                    pending += 1
                else:
                    report(Problem(kind="unchained", notification_id=n.id, originator_id=str(n.originator_id),
                                   originator_version=n.originator_version, topic=n.topic,
                                   detail="stored inside the chained range but not chained"))
                continue
            digest = event_hash(n.id, str(n.originator_id), n.originator_version, n.topic, n.state)
            if digest != row[2]:
                was = "" if (row[3], row[4], row[5]) == (str(n.originator_id), n.originator_version, n.topic) \
                    else f"; chained as {row[5]} of {row[3]} v{row[4]}"
                report(Problem(kind="altered", notification_id=n.id, originator_id=str(n.originator_id),
                               originator_version=n.originator_version, topic=n.topic,
                               detail=f"stored event hashes to {digest[:16]}..., chained as {row[2][:16]}...{was}"))
            else:
                verified += 1
        for nid, _, _, originator, version, topic in by_id.values():    # chained, no longer stored
            report(Problem(kind="deleted", notification_id=nid, originator_id=originator,
                           originator_version=version, topic=topic, detail="chained but no longer stored"))
        for nid, link, digest, originator, version, topic in links:
            chained += 1
            if link_hash(previous_link, digest) != link:
                report(Problem(kind="broken_link", notification_id=nid, originator_id=originator,
                               originator_version=version, topic=topic,
                               detail="link does not follow from the previous link and this event's hash"))
            previous_link = link
    problems.sort(key=lambda p: p.notification_id)
    checked = 0
    for source, at, expected in recorded_heads:
        checked += 1
        rows = db.read(f"SELECT link_hash FROM {TABLE} WHERE notification_id = ?", (at,)) if has_chain else []
        if not rows or rows[0][0] != expected:
            report(Problem(kind="head_mismatch", notification_id=at,
                           detail=f"{source} recorded chain head {expected[:16]}... at {at}; the chain has "
                                  + (f"{rows[0][0][:16]}..." if rows else "no link there")))
    return VerifyReport(ok=not any(counts.values()), stored_events=stored, chained_events=chained,
                        verified_events=verified, not_yet_chained=pending, chain_head=head, log_head=log_head,
                        counts=counts, problems=problems, recorded_heads_checked=checked)


def recorded_chain_heads(recorder: Any, *, page: int = 10_000) -> list[tuple[str, int, str]]:
    """(source, position, link_hash) of every chain head a closed billing cycle recorded."""
    heads = []
    position = 0
    while True:
        notes = recorder.select_notifications(start=position, limit=page, topics=[TOPIC_CLOSED],
                                              inclusive_of_start=False)
        for n in notes:
            head = _decode(n.state).get("chain_head")
            if isinstance(head, dict) and isinstance(head.get("position"), int) and head.get("link_hash"):
                heads.append((f"cycle {n.originator_id} (closed at notification {n.id})", head["position"],
                              head["link_hash"]))
        if len(notes) < page:
            return heads
        position = notes[-1].id


# -- replay ------------------------------------------------------------------------------------------------

IDENTITY = ("assignment_id", "api_key_id", "cycle_index", "starts_at", "ends_at")
COMPARED = (*IDENTITY, *CYCLE_FIGURES, *CYCLE_STATUS)
# figures known after every contribution (a differing one is traced to the events around it):
# kept as the bill's running figures, or summed from the usage events' own fields
RUNNING = {"requests": "running_requests", "input_tokens": "running_input_tokens",
           "output_tokens": "running_output_tokens", "included_used": "running_included_used",
           "overage_tokens": "running_overage_tokens", "total_minor": "running_total_minor"}
SUMMED = {"cache_hits": "cache_hit", "billable_input_tokens": "billable_input_tokens",
          "billable_output_tokens": "billable_output_tokens", "overage_input_tokens": "overage_input_tokens",
          "overage_output_tokens": "overage_output_tokens"}
LISTED = 20                # events listed per difference (all are counted)

_decode = msgspec.json.Decoder().decode


class _Recorded(msgspec.Struct):
    """The fields of ``fila:LedgerEntry.Recorded`` the billing fold reads (the rest is skipped)."""

    at: str = ""
    outcome: str = ""
    api_key_id: str = ""
    assignment_id: str | None = None
    plan_id: str | None = None
    plan_version: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache: str = "none"


class _Tick(msgspec.Struct):
    """Another assignment's request: to this cycle only its time matters (it moves the activity clock)."""

    at: str


_decode_recorded = msgspec.json.Decoder(_Recorded).decode


class Contribution(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event that touched the cycle, with the bill's running figures after it."""

    position: int
    kind: str               # segment, plan_change, usage, late_usage, unbilled, adjustment, closed, billed, paid
    running_requests: int
    running_input_tokens: int
    running_output_tokens: int
    running_included_used: int
    running_overage_tokens: int
    running_total_minor: int
    entry_id: str | None = None
    at: str | None = None
    plan_id: str | None = None
    plan_version: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_hit: bool | None = None
    billable_input_tokens: int | None = None
    billable_output_tokens: int | None = None
    included_input_tokens: int | None = None
    included_output_tokens: int | None = None
    overage_input_tokens: int | None = None
    overage_output_tokens: int | None = None
    overage_input_cost: str | None = None      # exact, major units
    overage_output_cost: str | None = None
    amount_minor: int | None = None            # adjustments; the amount a Billed event records
    detail: str | None = None


class EventRef(msgspec.Struct, kw_only=True, omit_defaults=True):
    position: int
    kind: str
    entry_id: str | None = None


class Difference(msgspec.Struct, kw_only=True):
    field: str
    view: Any
    replay: Any
    explanation: str
    events: list[EventRef]       # the events responsible, as far as they can be told (first LISTED)
    events_total: int


class ReplayReport(msgspec.Struct, kw_only=True):
    cycle_id: str
    agrees: bool                 # no difference from the billing view (vacuously, when not compared)
    compared: bool               # False when as_of left events out: the view holds the bill as of now
    as_of: str | None
    log_head: int                # the replay read the log up to here
    events_read: int
    events_excluded: int         # events after as_of
    figures: dict[str, Any]      # the recomputed row (identity, figures, status), as the view's columns
    lines: list[dict[str, Any]]
    contributions: list[Contribution]
    view: dict[str, Any] | None  # the billing view's row (the compared columns)
    differences: list[Difference]
    notes: list[str]
    seconds: float = 0.0


def _view_row(db: Database, cycle_id: str) -> dict[str, Any] | None:
    if not db.table_exists("billing_cycles"):
        return None
    rows = db.read(f"SELECT {', '.join(COMPARED)} FROM billing_cycles WHERE id = ?", (cycle_id,))
    return dict(zip(COMPARED, rows[0])) if rows else None


def _assignment_of(cycle_id: str, view: dict[str, Any] | None, recorder: Any, page: int) -> str | None:
    """The assignment the cycle belongs to, proven by its id (``cycle_id_for``), or None (unknown).

    Hints come from the view's row or the cycle's ``Closed`` event; a hint counts only if it
    reproduces the cycle's id, so a tampered view cannot steer the replay.
    """
    hints = []
    if view is not None:
        hints.append((view.get("assignment_id"), view.get("cycle_index")))
    position = 0
    while not any(_proves(cycle_id, *hint) for hint in hints):
        notes = recorder.select_notifications(start=position, limit=page, topics=[TOPIC_CLOSED],
                                              inclusive_of_start=False)
        for n in notes:
            if str(n.originator_id) == cycle_id:
                state = _decode(n.state)
                hints.append((state.get("assignment_id"), state.get("cycle_index")))
        if len(notes) < page:
            break
        position = notes[-1].id
    return next((str(a) for a, index in hints if _proves(cycle_id, a, index)), None)


def _proves(cycle_id: str, assignment_id: Any, index: Any) -> bool:
    return (isinstance(assignment_id, str) and isinstance(index, int) and not isinstance(index, bool)
            and str(cycle_id_for(assignment_id, index)) == cycle_id)


def _when(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_iso(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _detail(item: dict[str, Any]) -> str | None:
    kind = item["kind"]
    if kind == "segment":
        return f"plan {item.get('plan_id')} v{item.get('plan_version')} in force from {item.get('starts_at')}"
    if kind == "plan_change":
        applied = "" if item.get("applied") else " (not applied)"
        return (f"plan change to {item.get('plan_id')} v{item.get('plan_version')} effective "
                f"{item.get('effective_at')}{applied}")
    if kind in ("adjustment", "adjustment_refused"):
        refused = f" refused: {item.get('error')}" if kind == "adjustment_refused" else ""
        return (f"{item.get('amount_minor')} {item.get('currency')} minor: {item.get('reason')} "
                f"(by {item.get('by')}){refused}")
    if kind in ("closed", "billed", "paid"):
        amount = f", amount {item.get('amount_minor')} minor" if kind == "billed" else ""
        return f"{kind} by {item.get('by')} at {item.get('at')}{amount}"
    if kind == "unbilled":
        return str(item.get("reason"))
    return None


def replay(recorder: Any, db: Database, cycle_id: str, as_of: str | datetime | None = None, *,
           page: int = 10_000) -> ReplayReport:
    """Recompute one cycle from the raw events (never from a view) and compare with the billing view.

    Reads every event of the billing fold's topics through ``recorder.select_notifications``
    (decoded with msgspec, no mapper), up to the log's head when the replay began, excluding
    events whose own time ``at`` is after ``as_of``. Another assignment's request is passed to
    the fold as its time alone (the activity clock is all it can change of this cycle); the
    assignment is the one the cycle's id proves. Raises ``NotFound`` if the events never make the
    cycle exist.
    """
    started = time.perf_counter()
    target = str(cycle_id)
    cutoff = _when(as_of) if isinstance(as_of, str) else as_of
    if as_of is not None and (cutoff is None or cutoff.tzinfo is None):
        raise InvalidRequest(f"as_of must be an ISO-8601 datetime with a timezone, got {as_of!r}", param="as_of")
    log_head = recorder.max_notification_id() or 0
    view = _view_row(db, target)
    ours = _assignment_of(target, view, recorder, page)

    contributions: list[Contribution] = []
    fold: BillingFold

    def collect(cid: str, item: dict[str, Any]) -> None:
        if cid != target:
            return
        bill = fold.cycles[target].bill
        sums = {"running_requests": bill.requests, "running_input_tokens": bill.input_tokens,
                "running_output_tokens": bill.output_tokens, "running_included_used": bill.included_used,
                "running_overage_tokens": bill.overage_input_tokens + bill.overage_output_tokens,
                "running_total_minor": bill.total_minor}
        if item["kind"] in ("usage", "late_usage"):     # every key is a field: the hot path
            contributions.append(Contribution(**item, **sums))
            return
        get = item.get
        contributions.append(Contribution(
            position=item["position"], kind=item["kind"], **sums, entry_id=get("entry_id"), at=get("at"),
            plan_id=get("plan_id"), plan_version=get("plan_version"), amount_minor=get("amount_minor"),
            detail=_detail(item)))

    fold = BillingFold(track=lambda cid: cid == target, on_contribution=collect)
    view_position = view.get("updated_position") if view else None
    at_view_position: dict[str, Any] | None = None
    read = excluded = 0
    undecodable: list[EventRef] = []
    for _, _, notes in _pages(recorder, log_head, page, list(TOPICS), db):
        for n in notes:
            read += 1
            try:
                if n.topic == RECORDED_TOPIC:
                    state: Any = _decode_recorded(n.state)
                    if ours is not None and state.assignment_id != ours:
                        state = _Tick(state.at)
                    moment = state.at
                else:
                    state = _decode(n.state)
                    moment = state.get("at") if isinstance(state, dict) else None
            except (msgspec.DecodeError, msgspec.ValidationError):
                undecodable.append(EventRef(position=n.id, kind=n.topic, entry_id=n.originator_id))
                continue
            if cutoff is not None:
                when = _when(moment)
                if when is not None and when > cutoff:
                    excluded += 1
                    continue
            if view_position is not None and at_view_position is None and n.id > view_position:
                at_view_position = _row_of(fold, target)
            fold.apply(n.id, n.topic, n.originator_id, state, n.originator_version)

    cycle = fold.cycles.get(target)
    if cycle is None or cycle.bill is None:
        when = f" as of {iso(cutoff)}" if cutoff is not None else ""
        raise NotFound(f"no billing cycle {target} in the event log{when}", code="cycle_not_found")
    replayed = _row_of(fold, target)
    assert replayed is not None
    if view_position is not None and at_view_position is None:
        at_view_position = replayed
    notes: list[str] = []
    compared = cutoff is None or excluded == 0
    differences: list[Difference] = []
    if not compared:
        notes.append(f"{excluded} events after {iso(cutoff)} were left out: the billing view holds the bill "
                     "as of now, so it is not compared")
    elif view is None:
        differences.append(Difference(field="row", view=None, replay="present", events_total=len(contributions),
                                      explanation="the billing view has no row for this cycle",
                                      events=_refs(contributions[:LISTED])))
    else:
        differences = _compare(view, replayed, at_view_position, contributions, log_head)
    if undecodable:   # whatever else agrees, a bill without these events proves nothing
        differences.insert(0, Difference(
            field="events", view=None, replay=None, events=undecodable[:LISTED], events_total=len(undecodable),
            explanation=f"{len(undecodable)} stored events of the billing topics cannot be decoded and were left "
                        "out of the replay (altered after they were stored? run fila audit verify)"))
    for item in contributions:
        if item.kind == "billed" and item.amount_minor is not None and item.amount_minor != item.running_total_minor:
            notes.append(f"the Billed event at position {item.position} records {item.amount_minor} minor units; "
                         f"the events before it give {item.running_total_minor} (the view may have lagged when "
                         "the cycle was billed)")
    return ReplayReport(
        cycle_id=target, agrees=not differences, compared=compared,
        as_of=iso(cutoff) if cutoff is not None else None, log_head=log_head,
        events_read=read, events_excluded=excluded, figures=replayed,
        lines=[{"kind": line.kind, "description": line.description, "quantity": line.quantity,
                "amount_minor": line.amount.amount_minor} for line in cycle.bill.lines()],
        contributions=contributions, view=view, differences=differences, notes=notes,
        seconds=round(time.perf_counter() - started, 3))


class _Row(NamedTuple):
    """One stored event as the audit reads it (the recorder's Notification, originator id as text)."""

    id: int
    originator_id: str
    originator_version: int
    topic: str
    state: bytes


def _pages(recorder: Any, head: int, page: int, topics: list[str],
           db: Database | None = None) -> Iterator[tuple[int, int, Sequence[_Row]]]:
    """``(start, stop, events)``: the events of ``topics`` (all: ``[]``) with ids in ``(start, stop]``, a window
    of ``page`` ids at a time up to ``head`` (the query's work is bounded whatever the planner thinks; gaps
    are fine), the next window read while this one is used. With ``db`` on the event store's own
    PostgreSQL database, the same query as the recorder's is read with a binary cursor into tuples
    (``Database.select_events``, the projector's reader: about 3x less work than Notifications)."""
    direct = (db is not None and db.dialect == "postgres" and hasattr(recorder, "events_table_name")
              and hasattr(getattr(recorder, "datastore", None), "schema"))

    def fetch(start: int) -> Sequence[_Row]:
        stop = min(head, start + page)
        if direct:
            assert db is not None
            rows = db.select_events(recorder.datastore.schema, recorder.events_table_name, start, stop, page,
                                    topics or None)
            return list(map(_Row._make, rows))
        notes = recorder.select_notifications(start=start, limit=page, stop=stop, topics=topics,
                                              inclusive_of_start=False)
        return [_Row(n.id, str(n.originator_id), n.originator_version, n.topic, n.state) for n in notes]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fila-audit-read") as reader:
        position = 0
        pending = reader.submit(fetch, position) if head > 0 else None
        while pending is not None:
            notes = pending.result()
            start, position = position, position + page
            pending = reader.submit(fetch, position) if position < head else None
            yield start, min(head, position), notes


def _row_of(fold: BillingFold, cycle_id: str) -> dict[str, Any] | None:
    """The cycle as the view's columns would hold it now (identity, figures, status)."""
    cycle = fold.cycles.get(cycle_id)
    if cycle is None or cycle.bill is None:
        return None
    row: dict[str, Any] = {"assignment_id": cycle.assignment_id, "api_key_id": cycle.api_key_id,
                           "cycle_index": cycle.index, "starts_at": iso(cycle.period.start),
                           "ends_at": iso(cycle.period.end), **figures(cycle)}
    for name in CYCLE_STATUS:
        row[name] = getattr(cycle, name)
    return {name: row.get(name) for name in COMPARED}


def _refs(items: Iterable[Contribution]) -> list[EventRef]:
    return [EventRef(position=c.position, kind=c.kind, entry_id=c.entry_id) for c in items]


_KINDS_OF = {   # which contributions move a figure the running figures do not trace
    "base_minor": ("segment", "plan_change"), "included_tokens": ("segment", "plan_change"),
    "plan_id": ("segment", "plan_change"), "plan_slug": ("segment", "plan_change"),
    "plan_version": ("segment", "plan_change"), "currency": ("segment", "plan_change"),
    "overage_input_minor": ("usage",), "overage_output_minor": ("usage",),
    "adjustments_minor": ("adjustment", "late_usage"), "late_requests": ("late_usage",),
    "unbilled_requests": ("unbilled",), "status": ("closed", "billed", "paid"),
    "closed_position": ("closed",), "closed_at": ("closed",), "closed_by": ("closed",),
    "billed_at": ("billed",), "billed_by": ("billed",), "billed_minor": ("billed",),
    "paid_at": ("paid",), "paid_by": ("paid",), "paid_reference": ("paid",), "opened_position": ("segment",),
}


def _compare(view: dict[str, Any], replayed: dict[str, Any], at_view_position: dict[str, Any] | None,
             contributions: list[Contribution], log_head: int) -> list[Difference]:
    differences: list[Difference] = []
    view_position = view.get("updated_position")
    behind = isinstance(view_position, int) and view_position < (replayed.get("updated_position") or 0)
    later = [c for c in contributions if behind and c.position > view_position]
    consistent_then = at_view_position is not None and all(
        at_view_position.get(f) == view.get(f) for f in COMPARED if f != "updated_position")
    amounts = ("base_minor", "overage_input_minor", "overage_output_minor", "adjustments_minor")
    sum_of_amounts = sum(v for v in (view.get(a) for a in amounts) if isinstance(v, int))
    for field_name in COMPARED:
        ours, theirs = replayed.get(field_name), view.get(field_name)
        if ours == theirs:
            continue
        if field_name == "updated_position" and isinstance(theirs, int) and theirs > log_head:
            differences.append(Difference(
                field=field_name, view=theirs, replay=ours, events=[], events_total=0,
                explanation=f"the view has applied events after this replay read the log (head {log_head}); "
                            "replay again"))
            continue
        if behind and consistent_then:
            explanation = (f"the view has applied the log up to position {view_position} and agrees with the "
                           f"events up to there; {len(later)} later events touch this cycle")
            differences.append(Difference(field=field_name, view=theirs, replay=ours, explanation=explanation,
                                          events=_refs(later[:LISTED]), events_total=len(later)))
            continue
        explanation, events = _trace(field_name, theirs, ours, contributions)
        if field_name == "total_minor" and isinstance(theirs, int) and theirs != sum_of_amounts:
            explanation = (f"the view's total_minor ({theirs}) is not the sum of its own amounts "
                           f"({' + '.join(amounts)} = {sum_of_amounts}): the row was changed after it was "
                           f"computed, no event accounts for it. " + explanation)
        if behind:
            explanation += (f" The view has not applied the {len(later)} events after position {view_position} "
                            "that touch this cycle, and it does not agree with the events before them either.")
        differences.append(Difference(field=field_name, view=theirs, replay=ours, explanation=explanation,
                                      events=_refs(events[:LISTED]), events_total=len(events)))
    return differences


def _running(field_name: str, contributions: list[Contribution]) -> list[int]:
    """``field_name`` as it stood after each contribution."""
    if field_name in RUNNING:
        return [getattr(c, RUNNING[field_name]) for c in contributions]
    own, total, values = SUMMED[field_name], 0, []
    for c in contributions:
        if c.kind == "usage":     # a late request changes the adjustments, not the cycle's counters
            total += int(getattr(c, own) or 0)
        values.append(total)
    return values


def _trace(field_name: str, theirs: Any, ours: Any,
           contributions: list[Contribution]) -> tuple[str, list[Contribution]]:
    """Which events explain the view's value: the prefix of the cycle's events that yields it, if any."""
    if field_name in RUNNING or field_name in SUMMED:
        values = _running(field_name, contributions)
        changed = [c for i, c in enumerate(contributions) if values[i] != (values[i - 1] if i else 0)]
        last = max((i for i, v in enumerate(values) if v == theirs), default=None)
        if last is None:
            return (f"no prefix of this cycle's {len(contributions)} events gives {field_name} = {theirs} "
                    f"(the events give {ours}); listed: the events that change it", changed)
        after = [c for i, c in enumerate(contributions) if i > last and values[i] != values[i - 1]]
        if not after:    # the view's value is reached at the end, then something else differs
            return f"the events give {field_name} = {ours}", changed
        head = contributions[last]
        return (f"the events give {field_name} = {theirs} up to position {head.position}"
                f"{f' (entry {head.entry_id})' if head.entry_id else ''} and {ours} in the end: the view's value "
                f"leaves out the {len(after)} events after it that change {field_name} (listed), or was changed "
                "to that value", after)
    kinds = _KINDS_OF.get(field_name)
    if kinds is None:
        return f"the events give {field_name} = {ours!r}", []
    events = [c for c in contributions if c.kind in kinds]
    return f"the events give {field_name} = {ours!r}; listed: the events that decide it", events



class Auditor:
    """Replay and verify for the HTTP layer, run off the event loop by ``run`` (the store's reader pool)."""

    def __init__(self, recorder: Any, db: Database, run: Any) -> None:
        self.recorder = recorder
        self.db = db
        self.run = run

    async def replay(self, cycle_id: str, as_of: str | None = None) -> ReplayReport:
        return await self.run(replay, self.recorder, self.db, cycle_id, as_of)

    async def verify(self) -> VerifyReport:
        return await self.run(self._verify)

    def _verify(self) -> VerifyReport:
        return verify(self.db, self.recorder, recorded_heads=recorded_chain_heads(self.recorder))
