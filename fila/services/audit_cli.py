"""``fila audit replay`` and ``fila audit verify``: exit 0 when everything agrees, 1 otherwise (2: bad input).

Both open the event store and the projections database named by ``FILA_DATABASE_URL`` and
read them directly; neither needs a running server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import structlog

from fila.config import ConfigError, load_settings


class _Stderr:
    """Whatever ``sys.stderr`` is at each write (a test may swap it between commands)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextmanager
def _opened() -> Iterator[tuple[Any, Any]]:
    from fila.adapters.eventstore import open_store
    from fila.bootstrap import configure_logging
    from fila.projections.db import open_database

    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"fila: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)     # logs to stderr: stdout is the report
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=_Stderr()))
    store = open_store(settings.database_url)
    db = open_database(settings.database_url)
    try:
        yield store.recorder, db
    finally:
        db.close()
        store.close()


def _print_json(report: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")


# -- verify --------------------------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    from fila.projections.chain import AuditChain
    from fila.projections.runner import Projector
    from fila.services.audit import recorded_chain_heads, verify

    with _opened() as (recorder, db):
        if not args.no_chain:   # link what is new first; what was chained before is what gets checked
            projector = Projector(db, recorder, [AuditChain()])
            try:
                projector.catch_up()
            finally:
                projector.close()
        report = verify(db, recorder, recorded_heads=recorded_chain_heads(recorder))
    if args.json:
        _print_json(report)
    else:
        head = report.chain_head
        print(f"stored events: {report.stored_events}  chained: {report.chained_events}  "
              f"verified: {report.verified_events}  not yet chained: {report.not_yet_chained}")
        print(f"chain head: {head['position']} {head['link_hash']}" if head else "chain head: none (nothing chained)")
        print(f"cycle heads checked: {report.recorded_heads_checked}")
        for problem in report.problems:
            what = " ".join(x for x in (problem.topic, problem.originator_id and f"of {problem.originator_id}",
                                         problem.originator_version and f"v{problem.originator_version}") if x)
            print(f"{problem.kind.upper()}: notification {problem.notification_id} {what}: {problem.detail}")
        listed = len(report.problems)
        total = sum(report.counts.values())
        if total > listed:
            print(f"... and {total - listed} more")
        print("OK: the log matches its hash chain" if report.ok else
              "FAILED: " + ", ".join(f"{n} {k}" for k, n in report.counts.items() if n))
    return 0 if report.ok else 1


# -- replay --------------------------------------------------------------------------------------------

_TABLE = ("position", "kind", "entry / detail", "at", "in", "out", "incl in", "incl out", "over in", "over out",
          "requests", "total minor")


def _row(c: Any) -> tuple:
    tokens = (c.input_tokens, c.output_tokens, c.included_input_tokens, c.included_output_tokens,
              c.overage_input_tokens, c.overage_output_tokens)
    return (c.position, c.kind, c.entry_id or c.detail or "", c.at or "", *("" if v is None else v for v in tokens),
            c.running_requests, c.running_total_minor)


def print_replay(report: Any, out: Any = None) -> None:
    out = out or sys.stdout
    write = out.write
    f = report.figures
    write(f"cycle {report.cycle_id}: assignment {f['assignment_id']} (key {f['api_key_id']}), cycle {f['cycle_index']} "
          f"[{f['starts_at']}, {f['ends_at']}), {f['status']}\n")
    write(f"replayed {report.events_read} events up to position {report.log_head}"
          + (f", as of {report.as_of} ({report.events_excluded} later events left out)" if report.as_of else "")
          + f" in {report.seconds:.3f} s\n\n")
    write("\t".join(_TABLE) + "\n")
    for c in report.contributions:
        write("\t".join(str(v) for v in _row(c)) + "\n")
    write(f"\n{len(report.contributions)} contributing events\n\nlines:\n")
    currency = f["currency"]
    for line in report.lines:
        write(f"  {line['kind']:<15} {line['amount_minor']:>12} {currency} minor  x{line['quantity']}  "
              f"{line['description']}\n")
    write(f"  {'total':<15} {f['total_minor']:>12} {currency} minor\n")
    write(f"requests {f['requests']}, tokens in {f['input_tokens']} out {f['output_tokens']}, included "
          f"{f['included_used']}/{f['included_tokens']}, overage {f['overage_tokens']}\n\n")
    for note in report.notes:
        write(f"note: {note}\n")
    if not report.compared:
        write("not compared with the billing view\n")
    if report.agrees:
        write("AGREES with the billing view, field by field\n" if report.compared else "")
    else:
        write(f"DIFFERS: {len(report.differences)} differences:\n")
        for d in report.differences:
            write(f"  {d.field}: view {d.view!r}, replay {d.replay!r}\n    {d.explanation}\n")
            for e in d.events:
                write(f"    - position {e.position} {e.kind}{f' entry {e.entry_id}' if e.entry_id else ''}\n")
            if d.events_total > len(d.events):
                write(f"    ... and {d.events_total - len(d.events)} more\n")


def cmd_replay(args: argparse.Namespace) -> int:
    from fila.domain.errors import FilaError
    from fila.services.audit import replay

    with _opened() as (recorder, db):
        try:
            report = replay(recorder, db, args.cycle, args.as_of)
        except FilaError as error:
            print(f"fila audit replay: {error.message}", file=sys.stderr)
            return 2
    if args.json:
        _print_json(report)
    else:
        print_replay(report)
    return 0 if report.agrees else 1


def add_subcommands(subparsers: Any) -> None:
    """``fila audit replay|verify``, added to the ``fila`` parser's subcommands."""
    audit = subparsers.add_parser("audit", help="replay a billing cycle from raw events; verify the hash chain")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    replay = commands.add_parser("replay", help="recompute a billing cycle from the raw events and compare it "
                                                "with the billing view (exit 1 on any difference)")
    replay.add_argument("--cycle", required=True, help="the billing cycle's id")
    replay.add_argument("--as-of", help="leave out events after this time (ISO-8601 with a timezone)")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    replay.set_defaults(func=cmd_replay)

    verify = commands.add_parser("verify", help="check every stored event against the hash chain (exit 1 on any "
                                                "altered or deleted event)")
    verify.add_argument("--no-chain", action="store_true",
                        help="only check; do not first chain the events stored since the last link")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)
