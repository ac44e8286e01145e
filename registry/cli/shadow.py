"""`flowfleet registry shadow ...`: shadow comparisons from the command line.

``set`` and ``clear`` queue the device's new desired state in the commands outbox
(the same transaction as the change); the running registry publishes it on its next
pass, as for a deploy through the API. ``list`` and ``agreement`` read what devices
sent (docs/registry.md#shadow-comparisons).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _open, _print_json, _run, run_in_db


def add_shadow_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``shadow set|clear|list|agreement`` to the registry's action parsers."""
    shadow = actions.add_parser("shadow", help="shadow comparisons of candidate models")
    sub = shadow.add_subparsers(dest="shadow_action", metavar="ACTION", required=True)
    sset = sub.add_parser("set", help="run a model version in shadow beside a camera's model")
    sset.add_argument("device")
    sset.add_argument("camera")
    sset.add_argument("model")
    sset.add_argument("ref", metavar="VERSION_OR_ALIAS")
    sset.add_argument("--share", type=float, help="share of frames, (0, 1]; default: the agent's")
    sset.add_argument("--reason", default="")
    sset.add_argument("--json", action="store_true", help="print the request and desired state")
    sset.set_defaults(func=cmd_shadow_set)
    sclear = sub.add_parser("clear", help="stop a camera's shadow comparison")
    sclear.add_argument("device")
    sclear.add_argument("camera")
    sclear.add_argument("--reason", default="")
    sclear.add_argument("--json", action="store_true", help="print the request and desired state")
    sclear.set_defaults(func=cmd_shadow_clear)
    slist = sub.add_parser("list", help="comparison windows, newest first, and the requests")
    slist.add_argument("--device")
    slist.add_argument("--camera")
    slist.add_argument("--limit", type=int, default=20)
    slist.add_argument("--json", action="store_true", help="print JSON")
    slist.set_defaults(func=cmd_shadow_list)
    sagree = sub.add_parser("agreement", help="one camera's windows pooled (the count gate)")
    sagree.add_argument("device")
    sagree.add_argument("camera")
    sagree.add_argument(
        "--hours", type=float, default=24.0, help="windows of the last HOURS (default 24)"
    )
    sagree.add_argument("--json", action="store_true", help="print JSON")
    sagree.set_defaults(func=cmd_shadow_agreement)
    for parser in (sset, sclear, slist, sagree):
        shared_options(parser)


def _ref(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _changed(args, desired, row, what: str) -> int:
    if args.json:
        import json

        _print_json({"shadow": row, "desired": json.loads(desired.to_json())})
    else:
        print(
            f"camera {row['camera']} of {row['device']}: {what} {row['model']} "
            f"v{row['version']}; desired state version {desired.version} queued "
            "(the running registry publishes it)"
        )
    return 0


def cmd_shadow_set(args: argparse.Namespace) -> int:
    from ..fleet import shadow

    if args.share is not None and not 0 < args.share <= 1:
        raise CliError(f"--share {args.share} is not in (0, 1]", EXIT_USAGE)
    db, reg = _open(args)
    with db.connection_context():
        desired, row = _run(
            lambda: shadow.set_shadow(
                reg,
                args.device,
                args.camera,
                args.model,
                _ref(args.ref),
                share=args.share,
                actor=_actor(),
                reason=args.reason,
            )
        )
    return _changed(args, desired, row, "shadow")


def cmd_shadow_clear(args: argparse.Namespace) -> int:
    from ..fleet import shadow

    db, reg = _open(args)
    with db.connection_context():
        desired, row = _run(
            lambda: shadow.clear_shadow(
                reg, args.device, args.camera, actor=_actor(), reason=args.reason
            )
        )
    return _changed(args, desired, row, "no more shadow of")


def cmd_shadow_list(args: argparse.Namespace) -> int:
    from ..fleet import shadow

    def read(db):
        items, total = shadow.shadow_windows(args.limit, 0, args.device, args.camera)
        return items, total, shadow.shadow_requests(args.device)

    items, total, requests = run_in_db(args, read)
    if args.json:
        _print_json({"windows": items, "total": total, "requests": requests})
        return 0
    for r in requests:
        share = "agent default" if r["share"] is None else f"{r['share']:g}"
        print(f"request\t{r['device']}/{r['camera']}\t{r['model']} v{r['version']}\tshare {share}")
    if not items:
        print("no shadow windows")
    for w in items:
        agreement = "-" if w.get("agreement") is None else f"{w['agreement']:.3f}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(w["start"]))
        candidate = w["candidate"].get("model") or w["candidate"]["file"]
        print(
            f"{when}Z\t{w['device']}/{w['camera']}\t{candidate}"
            f"\tframes {w['frames_compared']}/{w['frames']}\tagreement {agreement}"
        )
    return 0


def cmd_shadow_agreement(args: argparse.Namespace) -> int:
    from ..fleet import shadow

    since = time.time() - args.hours * 3600.0
    summary = run_in_db(args, lambda db: shadow.shadow_agreement(args.device, args.camera, since))
    if args.json:
        _print_json(summary)
        return 0
    agreement = "-" if summary["agreement"] is None else f"{summary['agreement']:.3f}"
    print(
        f"{args.device}/{args.camera}: {summary['windows']} window(s), agreement {agreement} "
        f"({summary['matched']} matched of {summary['boxes_active']} + "
        f"{summary['boxes_candidate']} boxes)"
    )
    return 0
