"""`flowfleet registry webhooks ...`: webhooks fed from the audit trail.

``add`` (prints the secret once), ``list``, ``show``, ``set`` (URL, patterns,
enable/disable), ``rm``, ``deliveries`` (the delivery log), ``redeliver`` and
``ping``. The running registry sends what is queued; ``ping`` also sends its ping
from this process at once (with the ``[webhooks]`` timeout) and exits 1 when the
receiver did not accept it. Bad input exits 2 naming the field and changes nothing;
an unknown webhook or delivery exits 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flowfleet.cliutil import CliError

from .common import _actor, _print_json, run_in_db, settings


def add_webhook_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``webhooks add|list|show|set|rm|deliveries|redeliver|ping``."""
    hooks = actions.add_parser("webhooks", help="webhooks: signed JSON for audit events")
    wsub = hooks.add_subparsers(dest="webhooks_action", metavar="ACTION", required=True)
    add = wsub.add_parser("add", help="add a webhook; prints its secret once")
    add.add_argument("name")
    add.add_argument("url", help="http:// or https:// URL the events are POSTed to")
    add.add_argument(
        "--event",
        action="append",
        dest="events",
        required=True,
        metavar="PATTERN",
        help="audit actions to send, shell-style (drift.*, rollout.abort); repeatable",
    )
    add.add_argument("--secret", help="signing secret (default: a generated one)")
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    add.add_argument("--reason", default="")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=cmd_add)
    ls = wsub.add_parser("list", help="webhooks (never their secrets)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)
    show = wsub.add_parser("show", help="one webhook and its deliveries by status, as JSON")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)
    set_ = wsub.add_parser("set", help="change a webhook's URL, patterns or enabled flag")
    set_.add_argument("name")
    set_.add_argument("--url")
    set_.add_argument(
        "--event", action="append", dest="events", metavar="PATTERN", help="replaces all"
    )
    on = set_.add_mutually_exclusive_group()
    on.add_argument("--enable", action="store_true", dest="enable", default=None)
    on.add_argument("--disable", action="store_false", dest="enable")
    set_.add_argument("--reason", default="")
    set_.add_argument("--json", action="store_true", help="print JSON")
    set_.set_defaults(func=cmd_set)
    rm = wsub.add_parser("rm", help="remove a webhook and its delivery log")
    rm.add_argument("name")
    rm.add_argument("--reason", default="")
    rm.set_defaults(func=cmd_rm)
    dl = wsub.add_parser("deliveries", help="the delivery log, newest first")
    dl.add_argument("--webhook", metavar="NAME")
    dl.add_argument("--status", choices=("pending", "delivered", "given_up"))
    dl.add_argument("--limit", type=int, default=50)
    dl.add_argument("--id", type=int, dest="delivery", help="one delivery with its attempts")
    dl.add_argument("--json", action="store_true", help="print JSON")
    dl.set_defaults(func=cmd_deliveries)
    re_ = wsub.add_parser("redeliver", help="queue a delivery again (fresh attempts)")
    re_.add_argument("delivery", type=int, metavar="ID")
    re_.add_argument("--reason", default="")
    re_.add_argument("--json", action="store_true", help="print JSON")
    re_.set_defaults(func=cmd_redeliver)
    ping = wsub.add_parser("ping", help="send a test ping now; exit 1 unless it is accepted")
    ping.add_argument("name")
    ping.add_argument("--json", action="store_true", help="print JSON")
    ping.set_defaults(func=cmd_ping)
    for parser in (add, ls, show, set_, rm, dl, re_, ping):
        shared_options(parser)


def _records():
    from ..fleet import webhook_records  # registry dependencies load only when used

    return webhook_records


def _line(d: dict) -> str:
    code = d["status_code"] if d["status_code"] is not None else "-"
    error = f"\t{d['last_error']}" if d["last_error"] else ""
    return f"{d['id']}\t{d['webhook']}\t{d['event']}\t{d['status']}\t{d['attempts']}\t{code}{error}"


def cmd_add(args: argparse.Namespace) -> int:
    r = _records()
    hook = run_in_db(
        args,
        lambda db: r.create_webhook(
            db,
            args.name,
            args.url,
            args.events,
            actor=_actor(),
            secret=args.secret,
            enabled=not args.disabled,
            reason=args.reason,
        ),
    )
    if args.json:
        _print_json(hook)
    else:
        print(f"webhook {hook['name']} added: {hook['url']} for {' '.join(hook['events'])}")
        print(f"secret (shown only now): {hook['secret']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = run_in_db(args, lambda db: _records().list_webhooks())
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no webhooks")
    else:
        for w in rows:
            state = "enabled" if w["enabled"] else f"disabled ({w['disabled_reason']})"
            print(f"{w['name']}\t{state}\t{w['url']}\t{' '.join(w['events'])}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _print_json(run_in_db(args, lambda db: _records().get_webhook(args.name)))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    hook = run_in_db(
        args,
        lambda db: _records().update_webhook(
            db,
            args.name,
            actor=_actor(),
            url=args.url,
            events=args.events,
            enabled=args.enable,
            reason=args.reason,
        ),
    )
    if args.json:
        _print_json(hook)
    else:
        print(f"webhook {hook['name']} updated")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    r = _records()
    run_in_db(args, lambda db: r.delete_webhook(db, args.name, actor=_actor(), reason=args.reason))
    print(f"webhook {args.name} removed")
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    r = _records()
    if args.delivery is not None:
        _print_json(run_in_db(args, lambda db: r.get_delivery(args.delivery)))
        return 0
    if not 1 <= args.limit <= 1000:
        raise CliError("--limit must be from 1 to 1000", 2)
    rows, total = run_in_db(
        args,
        lambda db: r.list_deliveries(webhook=args.webhook, status=args.status, limit=args.limit),
    )
    if args.json:
        _print_json({"deliveries": rows, "total": total})
    elif not rows:
        print("no deliveries")
    else:
        print("id\twebhook\tevent\tstatus\tattempts\tcode\terror")
        for d in rows:
            print(_line(d))
    return 0


def cmd_redeliver(args: argparse.Namespace) -> int:
    r = _records()
    out = run_in_db(
        args, lambda db: r.redeliver(db, args.delivery, actor=_actor(), reason=args.reason)
    )
    if args.json:
        _print_json(out)
    else:
        print(f"delivery {out['id']} queued again; the running registry sends it")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from ..fleet.webhooks import WebhookSender

    r = _records()
    job_settings = settings(args).webhooks.job_settings()

    def ping(db):
        delivery = r.queue_ping(db, args.name, actor=_actor())
        sender = WebhookSender(db, job_settings)
        try:
            sender.send_due(only=[delivery])
        finally:
            sender.close()
        return r.get_delivery(delivery)

    out = run_in_db(args, ping)
    if args.json:
        _print_json(out)
    else:
        print(_line(out))
    if out["status"] != "delivered":
        raise CliError(
            f"webhook {args.name}: the ping was not accepted ({out['last_error']}); the "
            "registry retries it with backoff"
        )
    return 0
