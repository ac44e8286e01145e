"""`flowfleet registry dead-letters list|show|replay`: messages the registry refused.

``replay`` re-ingests kept messages after the cause was fixed. It works on the
database directly (no running registry needed); the devices' end-to-end acks follow
when they next send (a replayed count bin is confirmed at the device's next resend).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timezone

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _print_json, run_in_db, settings


def add_dead_letter_actions(
    actions, shared_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``dead-letters list|show|replay`` to the registry's action parsers."""
    dl = actions.add_parser(
        "dead-letters", help="messages the registry refused: list, show, replay after a fix"
    )
    sub = dl.add_subparsers(dest="dead_letters_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="dead letters, oldest first (unresolved unless --all)")
    ls.add_argument("--device", help="only this device")
    ls.add_argument("--reason", metavar="TEXT", help="only reasons containing TEXT")
    ls.add_argument("--all", action="store_true", help="include those a replay resolved")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="one dead letter with its kept payload, as JSON")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_show)
    rp = sub.add_parser(
        "replay",
        help="ingest dead letters again (by id, or every unresolved one of --device / --all)",
    )
    rp.add_argument("ids", nargs="*", type=int, metavar="ID")
    rp.add_argument("--device", help="every unresolved dead letter of this device")
    rp.add_argument("--reason", metavar="TEXT", help="with --device/--all: reasons containing TEXT")
    rp.add_argument("--all", action="store_true", help="every unresolved dead letter")
    rp.add_argument("--topic-root", default=argparse.SUPPRESS, help="default flowfleet/v1")
    rp.add_argument("--json", action="store_true", help="print JSON")
    rp.set_defaults(func=cmd_replay)
    for parser in (ls, show, rp):
        shared_options(parser)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    from ..fleet import deadletters

    if args.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_USAGE)
    rows = run_in_db(
        args,
        lambda db: [
            deadletters.letter_dict(d)
            for d in deadletters.select(
                device=args.device,
                reason=args.reason,
                include_resolved=args.all,
                limit=args.limit,
            )
        ],
    )
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no dead letters" if args.all else "no unresolved dead letters")
    for r in rows:
        replay = f"  [replay: {r['replay_outcome']}]" if r["replay_outcome"] else ""
        print(f"#{r['id']:<6} {_when(r['received_at'])}  {r['topic']}  {r['reason']}{replay}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..fleet import deadletters

    def one(db):
        try:
            return deadletters.letter_dict(deadletters.get(args.id), payload=True)
        except deadletters.DeadLetterError as exc:
            raise CliError(str(exc)) from None

    _print_json(run_in_db(args, one))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from flowfleet.contract import Topics

    from ..fleet import deadletters
    from ..store.audit import audit

    chosen = sum(bool(x) for x in (args.ids, args.device, args.all))
    if chosen != 1:
        raise CliError("name dead letters to replay: IDs, --device DEVICE or --all", EXIT_USAGE)
    if args.reason and args.ids:
        raise CliError("--reason goes with --device or --all, not with IDs", EXIT_USAGE)

    def work(db):
        if args.ids:
            letters = [deadletters.get(i) for i in args.ids]
        else:
            letters = deadletters.select(device=args.device, reason=args.reason)
        root = getattr(args, "topic_root", None) or settings(args).broker.topic_root
        results = deadletters.replay(db, Topics(root), letters)
        if results:
            audit(
                _actor(),
                "dead-letters-replay",
                f"dead-letters:{','.join(str(r.id) for r in results)}",
                **deadletters.summary(results),
            )
        return results

    try:
        results = run_in_db(args, work)
    except deadletters.DeadLetterError as exc:
        raise CliError(str(exc)) from None
    total = deadletters.summary(results)
    if args.json:
        _print_json(
            {
                "replayed": [r.__dict__ for r in results],
                "summary": total,
            }
        )
    else:
        for r in results:
            why = f": {r.reason}" if r.reason else ""
            print(f"#{r.id:<6} {r.topic}  {r.outcome}{why}")
        print(
            f"{len(results)} replayed: {total['stored']} stored, {total['duplicate']} already "
            f"stored, {total['dead-letter']} still refused, {total['deferred']} deferred, "
            f"{total['truncated']} truncated"
        )
    unresolved = len(results) - total["stored"] - total["duplicate"]
    return 1 if unresolved else 0
