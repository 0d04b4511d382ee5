"""Usage views, built from ``fila:LedgerEntry.Recorded`` (one event per request), and their readers.

* ``token_usage_log``   a row per request, keyed by the entry id (``ON CONFLICT DO NOTHING``;
  ``UUID`` on Postgres, text on SQLite; the readers return text). ``cost_micros`` (integer
  micro-dollars) stays NULL here, for the billing view's owner. Best: keep costs in the billing
  view's own table keyed by ``entry_id`` and join on read. If billing writes this column instead
  (``UPDATE token_usage_log SET cost_micros = ? WHERE entry_id = ?``), its view must be listed
  after this one and rebuilt together with it (``rebuild([log, billing])`` or ``--all``): a
  rebuild of ``token_usage_log`` alone comes back with NULL costs, and a billing view running
  ahead of the log would update rows that do not exist yet.
* ``usage_daily``        per (api_key_id, UTC day, model): ``requests`` (all), ``ok_requests``
  (outcome ok), tokens (billable outcomes only), ``cache_hits``, ``tokens_saved``, ``refusals``
  (rate_limited, quota_exhausted, forbidden), ``errors`` (everything else that is not billable:
  upstream_error, upstream_rejected, breaker_open), ``latency_us_sum``.
* ``rate_limit_refusals`` a row per refusal: entry, time, key, outcome, rule, counts (JSON text).
* ``cache_stats_daily``  per (api_key_id, UTC day, cache layer or '-'), requests where the cache
  took part (``cache != "none"``): ``lookups`` (all of them), hits, misses, bypasses, refreshes,
  tokens_saved.

Exactly once: each request is one ledger entry recorded once (an idempotent retry collides
with the first recording in the store), and each page commits with its tracking position, so
no sum here needs de-duplication. Tokens are counted only for billable outcomes (``ok`` and
``client_disconnected``). ``at`` (the request time) dates a request, never the event timestamp.
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from typing import Any

import msgspec

from fila.domain.ledger import (BILLABLE_OUTCOMES, FORBIDDEN, OK, QUOTA_EXHAUSTED, RATE_LIMITED,
                                RECORDED_TOPIC)
from fila.domain.time import iso, parse_iso
from fila.projections.billing import BillingRecorded
from fila.projections.db import Database, Tx
from fila.projections.runner import Note, Run, Step, View

REFUSAL_OUTCOMES = frozenset({RATE_LIMITED, QUOTA_EXHAUSTED, FORBIDDEN})


class Recorded(BillingRecorded, kw_only=True, gc=False):
    """The state of ``fila:LedgerEntry.Recorded`` as the usage views read it (other fields skipped).

    A subclass of the billing view's Struct, stricter and with more fields: projected together,
    the views decode each state once (see ``Projector._shares``)."""

    api_key_id: str
    at: str
    outcome: str
    status: int
    model: str
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    latency_us: int = 0
    upstream: str | None = None
    error: str | None = None
    idempotency_key: str | None = None
    cache: str = "none"
    cache_layer: str | None = None
    tokens_saved: int = 0
    plan_id: str | None = None
    plan_version: int | None = None
    assignment_id: str | None = None
    refusal_rule: str | None = None
    refusal_counts: dict | None = None


def _printable(text: str) -> str:
    """A client's text as a view can hold it: PostgreSQL text takes no NUL character, so one
    in a stored event's model (FILA took them before it checked) would fail every page after
    it, for good. The view shows U+FFFD in its place; the event keeps what was sent."""
    return text.replace("\x00", "\ufffd")


def _utc(at: str) -> str:
    """The request time as FILA writes it (``iso()``: UTC, ``+00:00``); anything else normalised."""
    return at if at.endswith("+00:00") else iso(parse_iso(at.replace("Z", "+00:00")))


def _uuid(dialect: str) -> str:
    # 16-byte keys on Postgres: less index work than 36 characters of text (entry ids are random)
    return "UUID" if dialect == "postgres" else "TEXT"


def _key(dialect: str) -> str:
    # byte-wise comparison for key columns on Postgres, whatever the database's collation
    return 'TEXT COLLATE "C"' if dialect == "postgres" else "TEXT"


class _RecordedView(View):
    topics = (RECORDED_TOPIC,)
    state_types = {RECORDED_TOPIC: Recorded}
    indexes_last = True          # apply only writes

    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        self.stage(notes, suffix, Run(tx.fetchall))(tx)


# -- token_usage_log -----------------------------------------------------------------------------

LOG_COLUMNS = ("entry_id", "notification_id", "at", "api_key_id", "plan_id", "assignment_id", "model",
               "outcome", "status", "prompt_tokens", "completion_tokens", "total_tokens", "cache",
               "cache_layer", "tokens_saved", "latency_us", "stream", "upstream", "error")


class TokenUsageLog(_RecordedView):
    name = "token_usage_log"
    tables = ("token_usage_log",)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        t = f"token_usage_log{suffix}"
        return [
            f"""CREATE TABLE IF NOT EXISTS {t} (
                entry_id {_uuid(dialect)} PRIMARY KEY, notification_id BIGINT NOT NULL, at TEXT NOT NULL,
                api_key_id {_key(dialect)} NOT NULL, plan_id TEXT, assignment_id TEXT, model TEXT NOT NULL,
                outcome TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL, cache TEXT NOT NULL,
                cache_layer TEXT, tokens_saved BIGINT NOT NULL, latency_us BIGINT NOT NULL,
                stream BOOLEAN NOT NULL, upstream TEXT, error TEXT,
                cost_micros BIGINT)""",
            f"CREATE INDEX IF NOT EXISTS {t}_nid_idx ON {t} (notification_id)",
            f"CREATE INDEX IF NOT EXISTS {t}_key_idx ON {t} (api_key_id, notification_id)",
        ]

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        rows = []
        append = rows.append
        for n in notes:
            s = n.state
            model, upstream = s.model, s.upstream
            if "\x00" in model:
                model, upstream = _printable(model), upstream and _printable(upstream)
            append((n.originator_id, n.id, _utc(s.at), s.api_key_id, s.plan_id, s.assignment_id, model,
                    s.outcome, s.status, s.prompt_tokens, s.completion_tokens, s.total_tokens, s.cache,
                    s.cache_layer, s.tokens_saved, s.latency_us, s.stream, upstream, s.error))
        return lambda tx: tx.insert_many(f"token_usage_log{suffix}", LOG_COLUMNS, rows, key=("entry_id",))


# -- usage_daily ---------------------------------------------------------------------------------

DAILY_KEY = ("api_key_id", "day", "model")
DAILY_SUMS = ("requests", "ok_requests", "prompt_tokens", "completion_tokens", "total_tokens",
              "cache_hits", "tokens_saved", "errors", "refusals", "latency_us_sum")


class UsageDaily(_RecordedView):
    name = "usage_daily"
    tables = ("usage_daily",)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        t = f"usage_daily{suffix}"
        sums = ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in DAILY_SUMS)
        k = _key(dialect)
        return [f"CREATE TABLE IF NOT EXISTS {t} (api_key_id {k} NOT NULL, day {k} NOT NULL, "
                f"model {k} NOT NULL, {sums}, PRIMARY KEY (api_key_id, day, model))"]

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        acc: dict[tuple[str, str, str], list[int]] = {}
        for n in notes:
            s = n.state
            at = s.at
            model = s.model
            if "\x00" in model:
                model = _printable(model)
            key = (s.api_key_id, at[:10] if at.endswith("+00:00") else _utc(at)[:10], model)
            a = acc.get(key)
            if a is None:
                a = acc[key] = [0] * 10
            a[0] += 1
            outcome = s.outcome
            if outcome in BILLABLE_OUTCOMES:
                a[2] += s.prompt_tokens
                a[3] += s.completion_tokens
                a[4] += s.total_tokens
                if outcome == OK:
                    a[1] += 1
            elif outcome in REFUSAL_OUTCOMES:
                a[8] += 1
            else:
                a[7] += 1
            if s.cache == "hit":
                a[5] += 1
            a[6] += s.tokens_saved
            a[9] += s.latency_us
        rows = [(*k, *a) for k, a in acc.items()]
        return lambda tx: tx.insert_many(f"usage_daily{suffix}", DAILY_KEY + DAILY_SUMS, rows, key=DAILY_KEY,
                                         add=DAILY_SUMS)


# -- rate_limit_refusals ---------------------------------------------------------------------------

REFUSAL_COLUMNS = ("entry_id", "notification_id", "at", "api_key_id", "outcome", "rule", "counts")


class RateLimitRefusals(_RecordedView):
    name = "rate_limit_refusals"
    tables = ("rate_limit_refusals",)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        t = f"rate_limit_refusals{suffix}"
        return [f"CREATE TABLE IF NOT EXISTS {t} (entry_id {_uuid(dialect)} PRIMARY KEY, "
                f"notification_id BIGINT NOT NULL, at TEXT NOT NULL, api_key_id {_key(dialect)} NOT NULL, "
                "outcome TEXT NOT NULL, rule TEXT, counts TEXT)",
                f"CREATE INDEX IF NOT EXISTS {t}_key_idx ON {t} (api_key_id, notification_id)"]

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        encode = msgspec.json.encode
        rows = [(n.originator_id, n.id, _utc(s.at), s.api_key_id, s.outcome, s.refusal_rule,
                 None if s.refusal_counts is None else encode(s.refusal_counts).decode())
                for n in notes if (s := n.state).outcome in REFUSAL_OUTCOMES]
        return lambda tx: tx.insert_many(f"rate_limit_refusals{suffix}", REFUSAL_COLUMNS, rows, key=("entry_id",))


# -- cache_stats_daily -------------------------------------------------------------------------------

CACHE_KEY = ("api_key_id", "day", "cache_layer")
CACHE_SUMS = ("lookups", "hits", "misses", "bypasses", "refreshes", "tokens_saved")
_CACHE_SLOT = {"hit": 1, "miss": 2, "bypass": 3, "refresh": 4}


class CacheStatsDaily(_RecordedView):
    """Requests where the cache took part (``cache != "none"``); ``lookups`` counts them all."""

    name = "cache_stats_daily"
    tables = ("cache_stats_daily",)

    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        sums = ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in CACHE_SUMS)
        k = _key(dialect)
        return [f"CREATE TABLE IF NOT EXISTS cache_stats_daily{suffix} (api_key_id {k} NOT NULL, "
                f"day {k} NOT NULL, cache_layer {k} NOT NULL, {sums}, PRIMARY KEY (api_key_id, day, cache_layer))"]

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        acc: dict[tuple[str, str, str], list[int]] = {}
        for n in notes:
            s = n.state
            slot = _CACHE_SLOT.get(s.cache)
            if slot is None:
                continue
            at = s.at
            key = (s.api_key_id, at[:10] if at.endswith("+00:00") else _utc(at)[:10], s.cache_layer or "-")
            a = acc.get(key)
            if a is None:
                a = acc[key] = [0] * 6
            a[0] += 1
            a[slot] += 1
            a[5] += s.tokens_saved
        rows = [(*k, *a) for k, a in acc.items()]
        return lambda tx: tx.insert_many(f"cache_stats_daily{suffix}", CACHE_KEY + CACHE_SUMS, rows, key=CACHE_KEY,
                                         add=CACHE_SUMS)


def views() -> list[View]:
    return [TokenUsageLog(), UsageDaily(), RateLimitRefusals(), CacheStatsDaily()]


# -- readers (the admin API) ---------------------------------------------------------------------------

LOG_READ_COLUMNS = LOG_COLUMNS + ("cost_micros",)


def _bound(value: str | date | datetime | None, name: str) -> str | None:
    """A time bound as comparable text: a UTC ISO datetime, or a bare date ``YYYY-MM-DD``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, date):
        return value.isoformat()
    try:
        if len(value) == 10:
            return date.fromisoformat(value).isoformat()
        return iso(parse_iso(value.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(f"{name} must be an ISO-8601 date or a datetime with a timezone, got {value!r}") from None


def _filters(api_key_id: str | None, model: str | None, outcome: str | None = None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("api_key_id", api_key_id), ("model", model), ("outcome", outcome)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return where, params


def usage_log(db: Database, *, api_key_id: str | None = None, model: str | None = None,
              since: str | datetime | date | None = None, until: str | datetime | date | None = None,
              outcome: str | None = None, cursor: int | None = None, limit: int = 100,
              order: str = "desc") -> dict[str, Any]:
    """Requests, newest first (``order="asc"`` for oldest first), ``since <= at < until``.

    ``cursor`` is the ``next_cursor`` of the previous page (a notification id); ``next_cursor``
    is None on the last page.
    """
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    if not 1 <= limit <= 10_000:
        raise ValueError(f"limit must be between 1 and 10000, got {limit}")
    where, params = _filters(api_key_id, model, outcome)
    for op, bound in ((">=", _bound(since, "since")), ("<", _bound(until, "until"))):
        if bound is not None:
            where.append(f"at {op} ?")
            params.append(bound)
    if cursor is not None:
        where.append("notification_id " + ("<" if order == "desc" else ">") + " ?")
        params.append(int(cursor))
    sql = (f"SELECT {', '.join(LOG_READ_COLUMNS)} FROM token_usage_log"
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY notification_id {order.upper()} LIMIT ?")
    rows = db.read(sql, (*params, limit + 1))
    data = [dict(zip(LOG_READ_COLUMNS, row)) for row in rows[:limit]]
    for row in data:
        row["entry_id"] = str(row["entry_id"])
        row["stream"] = bool(row["stream"])
    return {"data": data, "next_cursor": data[-1]["notification_id"] if len(rows) > limit else None}


_GROUPS = {"api_key": "api_key_id", "model": "model", "day": "day"}


def usage_stats(db: Database, group_by: str, *, api_key_id: str | None = None, model: str | None = None,
                since: str | datetime | date | None = None,
                until: str | datetime | date | None = None) -> list[dict[str, Any]]:
    """Sums of ``usage_daily`` per api key, model or day, over whole UTC days ``since..until`` (inclusive)."""
    if group_by not in _GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(_GROUPS)}, got {group_by!r}")
    column = _GROUPS[group_by]
    where, params = _filters(api_key_id, model)
    for op, bound in ((">=", _bound(since, "since")), ("<=", _bound(until, "until"))):
        if bound is not None:
            where.append(f"day {op} ?")
            params.append(bound[:10])
    sums = ", ".join(f"CAST(SUM({c}) AS BIGINT)" for c in DAILY_SUMS)
    sql = (f"SELECT {column}, {sums} FROM usage_daily" + (" WHERE " + " AND ".join(where) if where else "")
           + f" GROUP BY {column} ORDER BY {column}")
    out = []
    for row in db.read(sql, params):
        item = {column: row[0], **dict(zip(DAILY_SUMS, row[1:]))}
        item["avg_latency_us"] = item["latency_us_sum"] // item["requests"] if item["requests"] else 0
        out.append(item)
    return out


def _csv_cell(value: Any) -> Any:
    # a text cell a spreadsheet would run as a formula is quoted as text
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def usage_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """CSV text (header first) of ``usage_log(...)["data"]`` or ``usage_stats(...)`` rows."""
    columns = columns or (list(rows[0]) if rows else list(LOG_READ_COLUMNS))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _csv_cell(row.get(c)) for c in columns])
    return out.getvalue()


def _rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0


def cache_stats(db: Database, api_key_id: str | None = None, *, since: str | datetime | date | None = None,
                until: str | datetime | date | None = None) -> dict[str, Any]:
    """Cache hits, misses, hit rate and tokens saved, overall and per client (whole UTC days)."""
    where, params = _filters(api_key_id, None)
    for op, bound in ((">=", _bound(since, "since")), ("<=", _bound(until, "until"))):
        if bound is not None:
            where.append(f"day {op} ?")
            params.append(bound[:10])
    sums = ", ".join(f"CAST(SUM({c}) AS BIGINT)" for c in CACHE_SUMS)
    sql = (f"SELECT api_key_id, {sums} FROM cache_stats_daily" + (" WHERE " + " AND ".join(where) if where else "")
           + " GROUP BY api_key_id ORDER BY api_key_id")
    clients = []
    total = dict.fromkeys(CACHE_SUMS, 0)
    for row in db.read(sql, params):
        item = dict(zip(CACHE_SUMS, row[1:]))
        for c in CACHE_SUMS:
            total[c] += item[c]
        clients.append({"api_key_id": row[0], **item, "hit_rate": _rate(item["hits"], item["misses"])})
    overall = {"hits": total["hits"], "misses": total["misses"], "hit_rate": _rate(total["hits"], total["misses"]),
               "tokens_saved": total["tokens_saved"], "lookups": total["lookups"],
               "bypasses": total["bypasses"], "refreshes": total["refreshes"]}
    return {"overall": overall, "clients": clients}

