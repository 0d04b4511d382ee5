"""Projections over the event log: views, their tracking positions, catch-up, follow, rebuild.

The library's ``ProjectionRunner`` commits once per event; this runner commits once per *page*.
It reads the log in pages of ``page`` events (``recorder.select_notifications``, or on Postgres
the same query on a binary cursor: ``reader="direct"``, 3x cheaper), decodes each state with
msgspec straight into the view's Struct (no mapper, no aggregate objects), lets every view
apply the whole page, and writes the views' rows and the new tracking positions in one
transaction. A crash anywhere leaves the previous page boundary: nothing is skipped or counted
twice. Each tracking update is conditional (``WHERE position = <page start>``), so a second
follower, or a rebuild swapping tables in, makes the slower one roll back instead of double-apply.

Pages flow through three threads: the read-ahead thread reads and decodes page N+2, the
projector's thread has every view *stage* page N+1 (``View.stage``: the Python work, rows and
aggregates, outside any transaction), and the writer thread runs page N's staged writes and its
tracking positions in that page's transaction. PostgreSQL runs in its own process, so on a
machine with two cores its work on page N overlaps Python's on page N+1. Pages commit in order,
and after a failed page no later one is written.

Views at the same position are projected together (one read, one decode, one transaction);
a view that lags (new, or just rebuilt) catches up alone up to the next view's position and
then joins it. Positions run to the log's head even when the last events are of other topics,
so ``lag == 0`` means "caught up" and ``wait_for(view, id)`` works for any notification id.

Adding a view
-------------
Subclass :class:`View` in its own module (``fila/projections/<name>.py``)::

    class BillingView(View):
        name = "billing_cycles"                        # unique; the tracking key
        topics = (RECORDED_TOPIC,)                     # what it consumes
        tables = ("billing_lines",)                    # every table it owns (rebuild swaps them)
        state_types = {RECORDED_TOPIC: Recorded}       # topic -> msgspec Struct; others decode to dict

        def ddl(self, dialect, suffix=""):             # CREATE TABLE/INDEX IF NOT EXISTS, names + suffix
            return [f"CREATE TABLE IF NOT EXISTS billing_lines{suffix} (...)"]

        def apply(self, tx, notes, suffix=""):         # the whole page, inside the page's transaction
            tx.insert_many(f"billing_lines{suffix}", COLUMNS, rows, key=("entry_id",))

        def stage(self, notes, suffix, run):           # optional: the Python work before the transaction
            rows = [...]
            return lambda tx: tx.insert_many(f"billing_lines{suffix}", COLUMNS, rows, key=("entry_id",))

``topics = None`` takes every topic of the log; ``raw = True`` leaves ``Note.state`` as the stored
bytes (the audit chain hashes them); ``indexes_last = True`` (only if ``apply`` never reads the
view's tables) lets a rebuild of such views alone build the non-unique indexes once at the end.
Give the module a
``views() -> list[View]`` function and list the module in ``VIEW_MODULES``
below (or call ``register_view_module`` before building the projector). Rules for ``apply``:
write only through ``tx`` and only into your own tables (+ ``suffix``); be idempotent per
event where you can (``ON CONFLICT DO NOTHING`` keyed by the entry id); aggregate the page in
Python first and upsert each key once (``tx.insert_many(..., add=(...))``); never read the
clock or other views' tables. Index names must contain the table name with its suffix
(``{table}{suffix}_..._idx``) so a rebuild can rename them. A view's DDL runs when one of its
tables is missing; to change a view's schema, change its DDL and ``rebuild`` it.

Without ``stage``, ``apply`` runs in the transaction on the writer thread. With it, ``stage``
computes the page's rows and returns the step that writes them (``apply`` is then
``stage(...)(tx)``). A view that reads its own tables to build a page (the audit chain's last
link, billing's cycles) must not read rows that pages staged before may still be writing: it
keeps what it wrote in ``run.state`` from page to page and reads, through ``run.read``, only what
it never held (see :class:`Run`).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from importlib import import_module
from typing import Any, ClassVar, NamedTuple

import msgspec
import structlog

from fila.projections.db import Database, Tx, ident


def _log() -> Any:
    # looked up per call: a logger cached at import would keep whatever stream the first
    # configuration had (tests reconfigure structlog; bootstrap configures it once in production)
    return structlog.get_logger("fila.projections")


TRACKING_TABLE = "fila_projection_tracking"
REBUILD_SUFFIX = "_rebuild"
OLD_SUFFIX = "_old"

# modules exposing ``views() -> list[View]``; their views are projected in this order
VIEW_MODULES: list[str] = ["fila.projections.usage", "fila.projections.chain", "fila.projections.billing"]


def register_view_module(module: str) -> None:
    if module not in VIEW_MODULES:
        VIEW_MODULES.append(module)


def registered_views() -> list[View]:
    views: list[View] = []
    for module in VIEW_MODULES:
        views.extend(import_module(module).views())
    return views


class Note(msgspec.Struct, frozen=True, gc=False):
    """One event as a view sees it: ``state`` is the view's Struct for the topic, else a dict."""

    id: int                 # notification id: the event's position in the log
    topic: str
    originator_id: str
    version: int
    state: Any


class Run:
    """One run of consecutive pages through a view (``View.stage`` gets it with each page).

    ``read(sql, params)`` returns rows as the pages staged before this one have left them once
    committed, *except* what those pages changed: they may still be in flight. So a view reads
    only what it does not hold in ``state`` (its own, carried from page to page): on the first page
    it holds nothing and every read is up to date. A run ends with its last page or its first
    error, and ``state`` with it: a view never carries state from a page that was not committed.
    """

    def __init__(self, read: Callable[[str, Sequence[Any]], list[tuple]]) -> None:
        self.read = read
        self.state: dict[str, Any] = {}


Step = Callable[[Tx], None]     # a staged page's writes, run inside the page's transaction


class View(ABC):
    """A read model built from some topics of the log; see the module docstring."""

    name: ClassVar[str]
    topics: ClassVar[tuple[str, ...] | None]       # None: every topic of the log
    tables: ClassVar[tuple[str, ...]]
    state_types: ClassVar[Mapping[str, type]] = {}
    raw: ClassVar[bool] = False                      # True: Note.state is the stored bytes, undecoded
    indexes_last: ClassVar[bool] = False             # True: apply never reads its tables, so a rebuild
                                                     # may build their non-unique indexes once, at the end

    @abstractmethod
    def ddl(self, dialect: str, suffix: str = "") -> list[str]:
        """Each view implements this."""

    @abstractmethod
    def apply(self, tx: Tx, notes: list[Note], suffix: str = "") -> None:
        """Each view implements this."""

    def stage(self, notes: list[Note], suffix: str, run: Run) -> Step:
        """Prepare the page's writes before its transaction; the runner runs the returned step in it.

        The projector stages page N+1 while page N is written, so a view doing its Python work here
        overlaps the database's. The default stages nothing: ``apply`` runs in the transaction."""
        return partial(self.apply, notes=notes, suffix=suffix)


class ViewStatus(NamedTuple):
    view: str
    position: int
    head: int
    lag: int


class RebuildProgress(NamedTuple):
    views: tuple[str, ...]
    events: int            # events of the views' topics projected so far
    position: int
    head: int
    events_per_s: float
    eta_s: float | None
    done: bool = False


class _Page(NamedTuple):
    start: int
    end: int                               # the position after this page
    count: int                             # notifications read
    notes: list[tuple[View, list[Note]]]   # each view's decoded share


class PositionMoved(Exception):
    """Another writer moved a view's position since this page was read: the page is dropped."""


class _Abandoned(Exception):
    """A page handed to the writer after one that failed: never written."""


_IN_FLIGHT = 2     # pages handed to the writer thread and not yet committed

# While pages flow, the interpreter is tuned for three threads passing pages (both put back when
# the last projector of the process stops):
# - it switches threads at least every SWITCH_INTERVAL (the default is 5 ms): the writer and
#   read-ahead threads wait on PostgreSQL and need the GIL back after each reply, and at 5 ms
#   PostgreSQL could sit idle that long while this thread stages the next page;
# - the GC's first generation waits for GC_THRESHOLD new containers (the default is 700): a page
#   holds tens of thousands of short-lived rows, and at 700 the collector ran ~50 times a page
#   over them (8 % of the Python time) to find no garbage cycle.
SWITCH_INTERVAL = 0.0005
GC_THRESHOLD = 100_000
_tuning_lock = threading.Lock()
_tuning: dict[str, Any] = {"runs": 0}


@contextmanager
def _tuned() -> Iterator[None]:
    with _tuning_lock:
        if _tuning["runs"] == 0:
            _tuning["switch"], _tuning["gc"] = sys.getswitchinterval(), gc.get_threshold()
            sys.setswitchinterval(min(SWITCH_INTERVAL, _tuning["switch"]))
            first, *older = _tuning["gc"]
            gc.set_threshold(max(GC_THRESHOLD, first), *older)
        _tuning["runs"] += 1
    try:
        yield
    finally:
        with _tuning_lock:
            _tuning["runs"] -= 1
            if _tuning["runs"] == 0:
                sys.setswitchinterval(_tuning["switch"])
                gc.set_threshold(*_tuning["gc"])


_TRACKING_DDL = (f'CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} ("view" TEXT PRIMARY KEY, '
                 "position BIGINT NOT NULL, updated_at TEXT NOT NULL)")


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Projector:
    def __init__(self, db: Database, recorder: Any, views: Sequence[View] | None = None, *,
                 page: int = 10_000, poll_interval: float = 0.2, reader: str = "auto",
                 bulk_from_zero: int = 100_000) -> None:
        """``reader``: ``"recorder"`` pages through ``recorder.select_notifications``; ``"direct"``
        (Postgres only) runs that same query on a binary cursor into tuples, ~3x faster to read;
        ``"auto"`` takes ``"direct"`` when the database is the store's Postgres, else ``"recorder"``.
        ``bulk_from_zero``: views still at position 0 with at least this many events to read are
        built the way ``rebuild`` builds them (into fresh tables, swapped in), not in place."""
        self.db = db
        self.recorder = recorder
        self.views = list(registered_views() if views is None else views)
        self.page = page
        self.poll_interval = poll_interval
        self.bulk_from_zero = bulk_from_zero
        names = [v.name for v in self.views]
        tables = [t for v in self.views for t in v.tables]
        if len(set(names)) != len(names) or len(set(tables)) != len(tables):
            raise ValueError(f"view names and tables must be unique: {names} {tables}")
        for table in tables:
            ident(table)
        self._by_name = {v.name: v for v in self.views}
        self._decoders: dict[Any, Callable[[bytes], Any]] = {}
        self._advanced = threading.Condition()
        self._ready = False
        self.pages = 0          # pages committed by this projector (catch-up, follow and rebuild)
        self._reader: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        direct_ok = (db.dialect == "postgres" and hasattr(recorder, "events_table_name")
                     and hasattr(getattr(recorder, "datastore", None), "schema"))
        if reader == "auto":
            reader = "direct" if direct_ok else "recorder"
        if reader == "direct" and not direct_ok:
            raise ValueError("reader='direct' needs the event store's Postgres recorder and a Postgres database")
        if reader not in ("direct", "recorder"):
            raise ValueError(f"reader must be 'auto', 'direct' or 'recorder', got {reader!r}")
        self.reader = reader
        self._select = self._select_direct if reader == "direct" else self._select_recorded

    # -- set-up and positions ------------------------------------------------------------------

    def setup(self) -> None:
        """Create the tracking table, missing views' tables and tracking rows (idempotent).

        A view with a missing table gets all its tables created afresh, at position 0. Views
        whose tables exist run no DDL (``CREATE INDEX IF NOT EXISTS`` would lock a live table and
        can deadlock with another process's page): a view whose DDL changed gets it through
        ``rebuild``."""
        if self._ready:
            return
        missing = [v for v in self.views if not all(self.db.table_exists(t) for t in v.tables)]
        tracked = set()
        if self.db.table_exists(TRACKING_TABLE):
            tracked = {r[0] for r in self.db.read(f'SELECT "view" FROM {TRACKING_TABLE}')}
        if missing or any(v.name not in tracked for v in self.views):
            with self.db.transaction() as tx:
                if self.db.dialect == "postgres":   # one set-up at a time; the checks again, under the lock
                    tx.execute("SELECT pg_advisory_xact_lock(hashtext('fila_projections_setup'))")
                tx.execute(_TRACKING_DDL)
                stamp = _now()
                for view in self.views:
                    tx.execute(f'INSERT INTO {TRACKING_TABLE} ("view", position, updated_at) VALUES (?, 0, ?) '
                               'ON CONFLICT ("view") DO NOTHING', (view.name, stamp))
                    if all(self.db.table_exists(t, tx) for t in view.tables):
                        continue
                    for table in view.tables:
                        tx.execute(f"DROP TABLE IF EXISTS {table}")
                    for statement in view.ddl(self.db.dialect):
                        tx.execute(statement)
                    tx.execute(f'UPDATE {TRACKING_TABLE} SET position = 0, updated_at = ? WHERE "view" = ?',
                               (stamp, view.name))
        self._ready = True

    def view(self, view: View | str) -> View:
        if isinstance(view, View):
            return view
        try:
            return self._by_name[view]
        except KeyError:
            raise KeyError(f"no view named {view!r}; known: {', '.join(self._by_name)}") from None

    def positions(self) -> dict[str, int]:
        self.setup()
        rows = self.db.read(f'SELECT "view", position FROM {TRACKING_TABLE}')
        known = dict(rows)
        return {v.name: known.get(v.name, 0) for v in self.views}

    def position(self, view: View | str) -> int:
        self.setup()
        row = self.db.read(f'SELECT position FROM {TRACKING_TABLE} WHERE "view" = ?', (self.view(view).name,))
        return row[0][0] if row else 0

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    def status(self) -> list[ViewStatus]:
        head = self.head()
        return [ViewStatus(name, pos, head, max(0, head - pos)) for name, pos in self.positions().items()]

    # -- projecting ------------------------------------------------------------------------------

    def run_once(self, view: View | str | None = None) -> int:
        """Project one page for ``view`` (default: the most lagging views); returns events applied."""
        views = self.views if view is None else [self.view(view)]
        return self._advance(views, max_pages=1)[0]

    def catch_up(self, view: View | str | None = None) -> int:
        """Project until ``view`` (default: every view) reaches the head; returns events applied."""
        views = self.views if view is None else [self.view(view)]
        self._analyze_log()
        total = 0
        while True:
            try:
                applied, done = self._advance(views)
            except PositionMoved:
                continue
            total += applied
            if done:
                return total

    def follow(self, stop: threading.Event, *, on_idle: Callable[[int], None] | None = None,
               report_every: float = 60.0) -> None:
        """Keep every view at the head until ``stop`` is set.

        ``on_idle(events)`` runs each time the views reach the head after applying events; a log
        line with the positions is written at most every ``report_every`` seconds.

        On Postgres the store's recorder NOTIFYs its channel in each insert transaction, so
        this LISTENs there and wakes at once (a poll every second guards against a lost
        wake-up); on SQLite it polls every ``poll_interval``. Errors are logged and retried
        with back-off: the failed page was rolled back, so a retry repeats it exactly.
        """
        listener = self.db.listener(getattr(self.recorder, "channel_name", None))
        self._analyze_log()
        failures = applied = burst = 0
        last_report = 0.0
        try:
            while not stop.is_set():
                try:
                    count, done = self._advance(self.views, stop=stop)
                    failures = 0
                except PositionMoved as moved:
                    _log().info("projection_position_moved", view=str(moved))
                    continue
                except Exception as error:   # a database blip, or a view's bug: keep the process alive
                    failures += 1
                    delay = min(30.0, 0.2 * 2 ** min(failures, 8))
                    _log().error("projection_failed", error=repr(error), retry_in_s=delay, exc_info=True)
                    stop.wait(delay)
                    continue
                applied += count
                burst += count
                if not done:
                    continue
                if burst and on_idle is not None:
                    on_idle(burst)
                burst = 0
                if applied and time.monotonic() - last_report >= report_every:   # not one line per burst
                    _log().info("projections_caught_up", events=applied, positions=self.positions())
                    last_report, applied = time.monotonic(), 0
                self._idle(listener, stop)
        finally:
            listener.close()

    def _idle(self, listener: Any, stop: threading.Event) -> None:
        if listener.notifying:
            deadline = time.monotonic() + 1.0
            while not stop.is_set() and time.monotonic() < deadline:
                if listener.wait(0.25):
                    return
        else:
            stop.wait(self.poll_interval)

    def wait_for(self, view: View | str, position: int, timeout: float) -> bool:
        """Read-your-writes: wait until ``view`` has projected notification ``position``."""
        name = self.view(view).name
        deadline = time.monotonic() + timeout
        while True:
            if self.position(name) >= position:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._advanced:   # woken at once by this process's commits; polls for others'
                self._advanced.wait(min(remaining, 0.05))

    def _analyze_log(self) -> None:
        if self.db.dialect == "postgres" and hasattr(self.recorder, "events_table_name"):
            if self.db.analyze_if_stale(self.recorder.datastore.schema, self.recorder.events_table_name):
                _log().info("event_log_analyzed", table=self.recorder.events_table_name)

    def close(self) -> None:
        """Stop the read-ahead and writer threads (the database and the store belong to the caller)."""
        for pool in (self._reader, self._writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._reader = self._writer = None

    # -- pages -------------------------------------------------------------------------------------

    def _advance(self, views: Sequence[View], *, max_pages: int | None = None,
                 stop: threading.Event | None = None) -> tuple[int, bool]:
        """Move the most lagging of ``views`` forward; (events applied, all were at the head)."""
        positions = self.positions()
        head = self.head()
        at = {v.name: positions[v.name] for v in views}
        lowest = min(at.values())
        if lowest >= head:
            return 0, True
        group = [v for v in views if at[v.name] == lowest]
        ahead = [p for p in at.values() if p > lowest]
        end = min(head, min(ahead)) if ahead else head   # land exactly where the next group waits
        if lowest == 0 and max_pages is None and end >= self.bulk_from_zero:
            # views that have never run, over a long log: a bulk load, the way rebuild does it
            return self.rebuild(group, stop=stop), False
        return self._project(group, lowest, end, max_pages=max_pages, stop=stop), False

    def _project(self, views: Sequence[View], start: int, end: int, *, suffix: str = "", track: bool = True,
                 max_pages: int | None = None, stop: threading.Event | None = None,
                 on_page: Callable[[int, int], None] | None = None) -> int:
        """Project ``views`` (all at ``start``) page by page up to ``end``.

        Three stages overlap: the read-ahead thread reads and decodes page N+2, this thread has the
        views stage page N+1 (their Python work), the writer thread writes page N in its own
        transaction (the database's work). Pages commit in order; after a failed page no later
        one is written. Returns events applied (committed).
        """
        with _tuned():
            return self._pages(views, start, end, suffix, track, max_pages, stop, on_page)

    def _pages(self, views: Sequence[View], start: int, end: int, suffix: str, track: bool, max_pages: int | None,
               stop: threading.Event | None, on_page: Callable[[int, int], None] | None) -> int:
        runs = {view.name: Run(self.db.read) for view in views}
        failed = threading.Event()
        writing: deque[tuple[Future, _Page]] = deque()
        applied = pages = 0
        pending: Future | None = self._read_ahead(views, start, end)
        try:
            while pending is not None:
                page = pending.result()
                pages += 1
                more = (page.end < end and (max_pages is None or pages < max_pages)
                        and not (stop is not None and stop.is_set()))
                pending = self._read_ahead(views, page.end, end) if more else None
                steps = [view.stage(notes, suffix, runs[view.name]) for view, notes in page.notes if notes]
                while len(writing) >= _IN_FLIGHT:
                    applied = self._written(writing.popleft(), applied, on_page)
                writing.append((self._write_ahead(views, page, steps, suffix, track, failed), page))
            while writing:
                applied = self._written(writing.popleft(), applied, on_page)
            return applied
        finally:
            if pending is not None:
                pending.cancel()
            for future, _ in writing:    # an error here: the pages already handed over finish first
                future.exception()

    def _written(self, item: tuple[Future, _Page], applied: int, on_page: Callable[[int, int], None] | None) -> int:
        future, page = item
        future.result()
        applied += page.count
        if on_page is not None:
            on_page(applied, page.end)
        return applied

    def _write_ahead(self, views: Sequence[View], page: _Page, steps: list[Step], suffix: str, track: bool,
                     failed: threading.Event) -> Future:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fila-projections-write")
        return self._writer.submit(self._write, views, page, steps, suffix=suffix, track=track, failed=failed)

    def _read_ahead(self, views: Sequence[View], start: int, end: int) -> Future:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fila-projections-read")
        return self._reader.submit(self._fetch, views, start, end)

    def _fetch(self, views: Sequence[View], start: int, end: int) -> _Page:
        # The id window bounds the query's work whatever the planner thinks: with stale statistics
        # Postgres would sort every row after ``start`` for each page (a catch-up gets quadratic).
        stop = min(end, start + 2 * self.page)
        wanted = [v.topics for v in views]
        topics = None if any(t is None for t in wanted) else sorted({t for ts in wanted for t in ts})
        rows = self._select(start, stop, self.page, topics)
        # a short page means every event up to ``stop`` has been seen (the store commits in id order)
        new_position = rows[-1][0] if len(rows) >= self.page else stop
        return _Page(start, new_position, len(rows), list(zip(views, self._shares(rows, views))))

    def _select_recorded(self, start: int, stop: int, limit: int, topics: list[str] | None) -> list[tuple]:
        notes = self.recorder.select_notifications(start=start, limit=limit, stop=stop, topics=topics or (),
                                                   inclusive_of_start=False)
        return [(n.id, str(n.originator_id), n.originator_version, n.topic, n.state) for n in notes]

    def _select_direct(self, start: int, stop: int, limit: int, topics: list[str] | None) -> list[tuple]:
        return self.db.select_events(self.recorder.datastore.schema, self.recorder.events_table_name,
                                     start, stop, limit, topics)

    def _write(self, views: Sequence[View], page: _Page, steps: list[Step], *, suffix: str, track: bool,
               failed: threading.Event) -> None:
        if failed.is_set():
            raise _Abandoned(f"page {page.start}..{page.end}: an earlier page failed")
        try:
            with self.db.transaction(durable=False) as tx:
                if track:   # rows first, in name order everywhere, so concurrent writers cannot deadlock
                    stamp = _now()
                    names = sorted(view.name for view in views)
                    moved = tx.executemany(f'UPDATE {TRACKING_TABLE} SET position = ?, updated_at = ? '
                                           'WHERE "view" = ? AND position = ?',
                                           [(page.end, stamp, name, page.start) for name in names])
                    if moved != len(names):
                        raise PositionMoved(", ".join(names))
                for step in steps:
                    step(tx)
        except BaseException:
            failed.set()
            raise
        self.pages += 1
        if track:
            with self._advanced:
                self._advanced.notify_all()

    def _shares(self, rows: Sequence[tuple], views: Sequence[View]) -> list[list[Note]]:
        """Each view's share of the page; views that see it alike share one list.

        A state is decoded once for every view that wants it as one Struct, or as a base class
        of the Struct another view of the group wants: an object of the subclass is one of the
        base, and a state the subclass refuses stops the page for the whole group anyway (the
        group reads it once). Dicts are shared only by views that see the page alike."""
        present = {r[3] for r in rows}
        seen = [present if v.topics is None else present.intersection(v.topics) for v in views]
        kinds: dict[str, set[type]] = {}            # topic -> the Structs views want it as
        for view, topics in zip(views, seen):
            if not view.raw:
                for topic in topics:
                    if (kind := view.state_types.get(topic)) is not None:
                        kinds.setdefault(topic, set()).add(kind)

        def decoded_as(topic: str, kind: type) -> type:
            narrower = [k for k in kinds[topic] if issubclass(k, kind)]
            narrowest = [k for k in narrower if all(issubclass(k, other) for other in narrower)]
            return narrowest[0] if len(narrowest) == 1 else kind

        columns: dict[type, dict[str, None]] = {}   # Struct -> the topics decoded as it
        plans: list[dict[str, type | None] | None] = []
        for view, topics in zip(views, seen):
            if view.raw:
                plans.append(None)
                continue
            plan = {t: None if (k := view.state_types.get(t)) is None else decoded_as(t, k) for t in topics}
            for topic, kind in plan.items():
                if kind is not None:
                    columns.setdefault(kind, {})[topic] = None
            plans.append(plan)
        decoded = {kind: [Note(r[0], r[3], r[1], r[2], decode(r[4])) if r[3] in topics else None for r in rows]
                   for kind, topics in columns.items() for decode in (self._decoder(kind),)}   # aligned with rows
        dicts = self._decoder(None)
        shares: dict[tuple, list[Note]] = {}
        out = []
        for topics, plan in zip(seen, plans):
            key = (("raw", frozenset(topics)) if plan is None
                   else ("decoded", tuple(sorted((t, id(k)) for t, k in plan.items()))))
            if key not in shares:
                if plan is None:
                    shares[key] = [Note(r[0], r[3], r[1], r[2], r[4]) for r in rows if r[3] in topics]
                else:
                    picks = {t: None if k is None else decoded[k] for t, k in plan.items()}
                    shares[key] = [Note(r[0], t, r[1], r[2], dicts(r[4])) if (col := picks[t]) is None else col[i]
                                   for i, r in enumerate(rows) if (t := r[3]) in picks]
            out.append(shares[key])
        return out

    def _decoder(self, kind: type | None) -> Callable[[bytes], Any]:
        if kind not in self._decoders:
            self._decoders[kind] = (msgspec.json.Decoder(kind) if kind is not None else msgspec.json.Decoder()).decode
        return self._decoders[kind]

    # -- rebuild -----------------------------------------------------------------------------------

    def rebuild(self, views: View | str | Iterable[View | str] | None = None,
                progress: Callable[[RebuildProgress], None] | None = None,
                stop: threading.Event | None = None) -> int:
        """Build ``views`` (default: all) from the start of the log into ``*_rebuild`` tables,
        then swap them in with one transaction. Readers keep the old tables until the swap.
        When every view rebuilt has ``indexes_last``, their non-unique indexes are built once,
        after the last page.
        Setting ``stop`` abandons the rebuild before the swap (the views stay as they were).

        The rebuilt views take the position they reached; a follower continues from there.
        An interrupted rebuild leaves only ``*_rebuild`` tables behind; the next one drops them.
        Returns the number of events projected.
        """
        if views is None:
            chosen = list(self.views)
        elif isinstance(views, (View, str)):
            chosen = [self.view(views)]
        else:
            chosen = [self.view(v) for v in views]
        self.setup()
        self._analyze_log()
        tables = [t for v in chosen for t in v.tables]
        with self.db.transaction() as tx:
            for table in tables:
                tx.execute(f"DROP TABLE IF EXISTS {table}{REBUILD_SUFFIX}")
            for view in chosen:
                for statement in view.ddl(self.db.dialect, REBUILD_SUFFIX):
                    tx.execute(statement)
            # A bulk load of write-only views is the database's work: it builds their non-unique
            # indexes once at the end rather than row by row. With a view that folds (reads its
            # tables) the load waits on Python instead, and the database keeps the indexes up in
            # time it would spend idle; built at the end they would be a serial tail (at 1,000,000
            # events with every view: 2.2 s of a 24 s rebuild).
            deferred = [index for t in tables
                        for index in self.db.secondary_indexes(tx, f"{t}{REBUILD_SUFFIX}")
                        ] if all(v.indexes_last for v in chosen) else []
            for name, _ in deferred:
                tx.execute(f"DROP INDEX {ident(name)}")
        names = tuple(v.name for v in chosen)
        started = time.monotonic()
        position = events = 0
        while True:   # to the head, then once more from there: the swap follows a short last step
            head = self.head()

            def report(done: int, at: int, head: int = head, base: int = events) -> None:
                if progress is not None:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    id_rate = at / elapsed
                    eta = (head - at) / id_rate if id_rate > 0 else None
                    progress(RebuildProgress(names, base + done, at, head, (base + done) / elapsed, eta))

            if position >= head:
                break
            events += self._project(chosen, position, head, suffix=REBUILD_SUFFIX, track=False, on_page=report,
                                    stop=stop)
            if stop is not None and stop.is_set():
                _log().info("projection_rebuild_abandoned", views=names, position=position)
                return events
            position = head
        if deferred:
            with self.db.transaction() as tx:
                for _, statement in deferred:
                    tx.execute(statement)
        self._swap(chosen, position)
        if progress is not None:
            elapsed = max(time.monotonic() - started, 1e-9)
            progress(RebuildProgress(names, events, position, position, events / elapsed, 0.0, True))
        _log().info("projection_rebuilt", views=names, events=events, position=position,
                    seconds=round(time.monotonic() - started, 3))
        return events

    def _swap(self, views: Sequence[View], position: int) -> None:
        with self.db.transaction() as tx:
            stamp = _now()
            for view in sorted(views, key=lambda v: v.name):   # locks each row: a follower's page waits
                tx.execute(f'UPDATE {TRACKING_TABLE} SET position = ?, updated_at = ? WHERE "view" = ?',
                           (position, stamp, view.name))
            for table in (t for v in views for t in v.tables):
                old, new = f"{table}{OLD_SUFFIX}", f"{table}{REBUILD_SUFFIX}"
                tx.execute(f"DROP TABLE IF EXISTS {old}")
                if self.db.table_exists(table, tx):
                    tx.execute(f"ALTER TABLE {table} RENAME TO {old}")
                tx.execute(f"ALTER TABLE {new} RENAME TO {table}")
                tx.execute(f"DROP TABLE IF EXISTS {old}")   # frees the old index names
                for index, sql in self.db.indexes(tx, table):
                    if REBUILD_SUFFIX in index:
                        self.db.rename_index(tx, table, index, index.replace(REBUILD_SUFFIX, "", 1), sql)
        with self._advanced:
            self._advanced.notify_all()
