"""
C{fedserver queue}: what the durable outbound queue holds, for operators.

    fedserver queue --config FILE [--json] [list]
    fedserver queue --config FILE [--json] retry DOMAIN [--dead]
    fedserver queue --config FILE [--json] drop DOMAIN [--dead]
    fedserver queue --config FILE [--json] dead [DOMAIN] [--limit N]

It works on the database of C{FILE} (C{[storage] database}), also while
fedserver runs: a running fedserver takes up a retry at its next look at
the queue (C{[queue] poll_interval}, 1 second by default).  See
docs/queue.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Dict, List, Optional, TextIO

from fedserver.errors import ConfigError


def add_commands(commands: Any) -> None:
    """Add C{queue} to the C{fedserver} command's sub-commands."""
    queue = commands.add_parser(
        "queue", help="list, retry and drop what the durable outbound queue holds",
        description="The durable outbound queue of the fedserver configured in FILE: list its destinations "
        "(depth, oldest age, next attempt, last error), end a destination's backoff, move its items to the dead "
        "letters, or list, requeue and delete dead letters. Works while fedserver runs.",
    )
    queue.add_argument("--config", required=True, metavar="FILE")
    queue.add_argument("--json", action="store_true", help="print JSON")
    actions = queue.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="the destinations with items, dead letters or failures (the default)")
    retry = actions.add_parser(
        "retry", help="send DOMAIN's items now, without waiting for the end of its backoff")
    retry.add_argument("domain", metavar="DOMAIN")
    retry.add_argument("--dead", action="store_true",
                       help="instead, put DOMAIN's dead letters back in its queue (in their order, with a new "
                       "lifetime and their idempotency keys)")
    drop = actions.add_parser("drop", help="move DOMAIN's items to the dead letters (retry --dead undoes it)")
    drop.add_argument("domain", metavar="DOMAIN")
    drop.add_argument("--dead", action="store_true", help="instead, delete DOMAIN's dead letters for good")
    dead = actions.add_parser("dead", help="list the dead letters, newest first")
    dead.add_argument("domain", metavar="DOMAIN", nargs="?")
    dead.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (default 100)")
    queue.set_defaults(run=_queue, action="list")


def _queue(args: argparse.Namespace) -> int:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    def run(reactor: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(run_queue_command(reactor, args))

        def exit_with(code: int) -> None:
            raise SystemExit(code)

        return d.addCallback(exit_with)

    task.react(run)
    return 1  # pragma: no cover - react() exits


async def run_queue_command(reactor: Any, args: argparse.Namespace, out: TextIO = sys.stdout,
                            err: TextIO = sys.stderr) -> int:
    """Run C{fedserver queue} on C{reactor}; the exit code."""
    from fedserver.config import is_domain_name, load_config
    from fedserver.outbound_queue import (
        SCHEMA_OWNER,
        SCHEMA_STEPS,
        dead_letters,
        delete_dead,
        describe_destinations,
        drop_destination,
        requeue_dead,
        retry_destination,
    )
    from fedserver.storage import Store

    domain: Optional[str] = getattr(args, "domain", None)
    if domain is not None and not is_domain_name(domain):
        print(f"fedserver: {domain!r} is not a lower-case domain name", file=err)
        return 2
    try:
        config = load_config(args.config)
        store = Store(config.storage_database, reactor=reactor)
        store.register_schema(SCHEMA_OWNER, SCHEMA_STEPS)
        store.migrate()  # the queue's tables, if this database has never had them
    except ConfigError as e:
        print(f"fedserver: {e}", file=err)
        return 1
    store.startService()
    try:
        now = int(reactor.seconds() * 1000)
        action = args.action
        if action == "list":
            rows = await store.run_interaction(describe_destinations, now)
            _show_destinations(rows, args.json, out)
        elif action == "dead":
            letters = await store.run_interaction(dead_letters, domain, max(1, args.limit))
            _show_dead(letters, args.json, out)
        elif action == "retry" and args.dead:
            count = await store.run_interaction(requeue_dead, domain, now)
            _say(out, args.json, {"domain": domain, "requeued": count},
                 f"{domain}: {count} dead letters are back in the queue; a running fedserver sends them at its "
                 "next poll")
        elif action == "retry":
            count = await store.run_interaction(retry_destination, domain)
            _say(out, args.json, {"domain": domain, "waiting": count},
                 f"{domain}: the backoff is over; a running fedserver sends its {count} items at its next poll "
                 "([queue] poll_interval)")
        elif action == "drop" and args.dead:
            count = await store.run_interaction(delete_dead, domain)
            _say(out, args.json, {"domain": domain, "deleted": count},
                 f"{domain}: {count} dead letters deleted for good")
        else:
            count = await store.run_interaction(drop_destination, domain, now)
            _say(out, args.json, {"domain": domain, "dropped": count},
                 f"{domain}: {count} items moved to the dead letters (fedserver queue retry {domain} --dead "
                 "puts them back)")
    except Exception as e:
        print(f"fedserver: the queue in {config.storage_database} could not be read or changed: {e}", file=err)
        return 1
    finally:
        store.stopService()
    return 0


def _say(out: TextIO, as_json: bool, document: Dict[str, Any], text: str) -> None:
    print(json.dumps(document) if as_json else text, file=out)


def duration(seconds: Optional[float]) -> str:
    """C{seconds} for a person: C{42s}, C{3m12s}, C{2h05m}, C{4d03h}."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _show_destinations(rows: List[Dict[str, Any]], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"destinations": rows}, indent=2), file=out)
        return
    if not rows:
        print("the outbound queue is empty, and there are no dead letters", file=out)
        return
    table = [("DESTINATION", "DEPTH", "OLDEST", "NEXT ATTEMPT", "FAILURES", "DEAD", "LAST ERROR")]
    for row in rows:
        if not row["depth"]:
            next_attempt = "-"
        elif row["next_attempt"] is None:
            next_attempt = "now"
        else:
            next_attempt = "in " + duration(row["next_attempt_in"])
        table.append((row["destination"], str(row["depth"]), duration(row["oldest_age"]), next_attempt,
                      str(row["failures"]), str(row["dead"]), (row["last_error"] or "-")[:100]))
    _print_table(table, out)


def _show_dead(letters: List[Dict[str, Any]], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"dead": letters}, indent=2), file=out)
        return
    if not letters:
        print("there are no dead letters", file=out)
        return
    table = [("DIED", "DESTINATION", "RPC", "REASON", "ATTEMPTS", "ID", "ERROR")]
    for letter in letters:
        error = letter["error"] or {}
        inner: Dict[str, Any] = error["inner"] if isinstance(error.get("inner"), dict) else {}
        label = str(error.get("label", "-")) + (f" ({inner.get('label')})" if inner.get("label") else "")
        table.append((_when(letter["died"]), letter["destination"], f"{letter['component']}/{letter['rpc']}",
                      letter["reason"], str(letter["attempts"]), letter["id"], label))
    _print_table(table, out)


def _print_table(rows: List[tuple], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)


__all__ = ["add_commands", "duration", "run_queue_command"]
