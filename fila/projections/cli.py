"""``fila projections run | status | rebuild``: the projection runner from the command line.

``fila/cli.py`` calls :func:`add_subcommands` with its sub-parsers; each handler takes the parsed
arguments and returns an exit code. The database is ``load_settings().database_url``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from fila.config import ConfigError, load_settings
from fila.projections.runner import Projector, RebuildProgress


def add_subcommands(subparsers: Any) -> None:
    projections = subparsers.add_parser("projections", help="build and inspect the read models (views)")
    sub = projections.add_subparsers(dest="projections_command", required=True)

    run = sub.add_parser("run", help="keep every view at the head of the log until SIGINT/SIGTERM")
    run.add_argument("--once", action="store_true", help="catch up to the head, print the status and exit")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="each view's position, the log's head and the lag")
    status.set_defaults(func=cmd_status)

    rebuild = sub.add_parser("rebuild", help="rebuild views from the start of the log, swapping them in at the end")
    rebuild.add_argument("name", nargs="?", help="the view to rebuild")
    rebuild.add_argument("--all", action="store_true", help="rebuild every view (in one pass over the log)")
    rebuild.set_defaults(func=cmd_rebuild)


@contextmanager
def open_projector(on_open: Callable[[Any, Any], None] | None = None) -> Iterator[Projector]:
    from fila.adapters.eventstore import open_store
    from fila.bootstrap import configure_logging
    from fila.projections.db import open_database

    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"fila: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    store = open_store(settings.database_url)
    db = open_database(settings.database_url)
    projector = Projector(db, store.recorder)
    try:
        projector.setup()
        if on_open is not None:
            on_open(store, db)
        yield projector
    finally:
        projector.close()
        db.close()
        store.close()


def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from fila.bootstrap import follow_log
    from fila.services.billing import CycleCloser

    closers: list[CycleCloser] = []   # the runner also closes the billing cycles its view found due
    with open_projector(lambda store, db: closers.append(CycleCloser(store, db))) as projector:
        log = structlog.get_logger("fila.projections")
        if args.once:
            applied = projector.catch_up()
            log.info("projections_caught_up", events=applied, positions=projector.positions())
            print_status(projector)
            return 0
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("projections_following", views=[v.name for v in projector.views],
                     positions=projector.positions(), head=projector.head())
            follow_log(projector, closers[0], stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("projections_stopped", positions=projector.positions())
    return 0


def print_status(projector: Projector, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rows = projector.status()
    width = max([len("VIEW"), *(len(r.view) for r in rows)])
    print(f"{'VIEW':<{width}}  {'POSITION':>12}  {'HEAD':>12}  {'LAG':>10}", file=out)
    for r in rows:
        print(f"{r.view:<{width}}  {r.position:>12,}  {r.head:>12,}  {r.lag:>10,}", file=out)


def cmd_status(args: argparse.Namespace) -> int:
    with open_projector() as projector:
        print_status(projector)
    return 0


def progress_bar(out: TextIO | None = None, width: int = 30) -> Callable[[RebuildProgress], None]:
    """A one-line progress bar (carriage return, no dependency) for ``Projector.rebuild``."""
    out = out or sys.stderr
    last = [0.0]

    def show(p: RebuildProgress) -> None:
        now = time.monotonic()
        if not p.done and now - last[0] < 0.2:
            return
        last[0] = now
        fraction = 1.0 if p.done or not p.head else min(1.0, p.position / p.head)
        bar = "#" * int(fraction * width)
        eta = "done" if p.done else ("?" if p.eta_s is None else _duration(p.eta_s))
        out.write(f"\rrebuild {','.join(p.views)} [{bar:<{width}}] {fraction:6.1%} {p.events:,} events "
                  f"{p.events_per_s:,.0f}/s ETA {eta}   ")
        if p.done:
            out.write("\n")
        out.flush()

    return show


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def cmd_rebuild(args: argparse.Namespace) -> int:
    if bool(args.name) == bool(args.all):
        print("fila projections rebuild: give one view NAME or --all", file=sys.stderr)
        return 2
    with open_projector() as projector:
        if args.name and args.name not in {v.name for v in projector.views}:
            print(f"fila projections rebuild: no view named {args.name!r}; views: "
                  f"{', '.join(v.name for v in projector.views)}", file=sys.stderr)
            return 2
        projector.rebuild(None if args.all else args.name, progress=progress_bar())
        print_status(projector)
    return 0
