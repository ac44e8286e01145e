"""`flowfleet provision tokens ...`: bootstrap tokens in the registry's database.

Same database options as `flowfleet registry` (``--db``, ``--config``). A token is
printed once, on stdout, and never stored in clear; ``list`` shows its prefix only.
"""

from __future__ import annotations

import argparse
import sys

from flowfleet.cliutil import EXIT_USAGE, CliError

DAY = 86400.0


def add_token_actions(actions) -> None:
    from flowfleet.registry.cli.main import _shared_options

    tokens = actions.add_parser("tokens", help="bootstrap tokens for enrollment by claim")
    sub = tokens.add_subparsers(dest="tokens_action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a bootstrap token; prints it once")
    create.add_argument("--group", help="devices it enrolls join this device group")
    create.add_argument(
        "--uses", type=int, default=1, help="how many devices it may enroll (default 1)"
    )
    create.add_argument(
        "--ttl-hours", type=float, default=24.0, help="expires after this long (default 24)"
    )
    create.add_argument(
        "--auto-accept",
        action="store_true",
        help="devices it enrolls are registered at once (default: unregistered until "
        "an operator accepts them)",
    )
    create.add_argument(
        "--agent-template",
        metavar="FILE",
        help="TOML the device's agent.toml starts from (cameras, bin_seconds, ...; "
        "not device_id, [broker] or [registry])",
    )
    create.add_argument("--label", default="")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_create)
    lst = sub.add_parser("list", help="bootstrap tokens (never their secrets)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    revoke = sub.add_parser("revoke", help="revoke a bootstrap token by id")
    revoke.add_argument("id", type=int)
    revoke.add_argument("--reason", default="")
    revoke.set_defaults(func=cmd_revoke)
    allow = sub.add_parser(
        "allow-reenroll", help="let the next enrollment of an existing device id through"
    )
    allow.add_argument("device")
    allow.add_argument("--reason", default="")
    allow.set_defaults(func=cmd_allow)
    for p in (create, lst, revoke, allow):
        _shared_options(p, suppress=False)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as fh:
            return fh.read()
    except OSError as exc:
        raise CliError(f"--agent-template {path}: {exc.strerror}", EXIT_USAGE) from None


def cmd_create(args: argparse.Namespace) -> int:
    from flowfleet.registry.cli.common import _actor, _print_json, run_in_db
    from flowfleet.registry.fleet import enrollment

    template = _read_template(args.agent_template)
    secret, row = run_in_db(
        args,
        lambda db: enrollment.create_token(
            actor=_actor(),
            ttl_s=args.ttl_hours * 3600.0,
            max_uses=args.uses,
            group=args.group,
            auto_accept=args.auto_accept,
            agent_template=template,
            label=args.label,
        ),
        atomic=True,
    )
    if args.json:
        _print_json({"token": secret, **_dict(args, row)})
    else:
        print(secret)
        print(
            f"bootstrap token {row.id}: {row.max_uses} use(s), expires in "
            f"{args.ttl_hours:g} h; shown once, give it to the device: "
            "flowfleet agent enroll --registry URL --token TOKEN",
            file=sys.stderr,
        )
    return 0


def _dict(args, row) -> dict:
    from flowfleet.registry.cli.common import run_in_db
    from flowfleet.registry.fleet import enrollment

    return run_in_db(args, lambda db: enrollment.token_dict(row))


def cmd_list(args: argparse.Namespace) -> int:
    from flowfleet.registry.cli.common import _print_json, run_in_db
    from flowfleet.registry.fleet import enrollment

    tokens = run_in_db(args, lambda db: enrollment.list_tokens())
    if args.json:
        _print_json({"tokens": tokens})
        return 0
    for t in tokens:
        group = t["group"] or "-"
        print(
            f"{t['id']:>4}  {t['prefix']}...  {t['state']:<8} {t['uses']}/{t['max_uses']} "
            f"group {group:<16} devices {','.join(t['devices']) or '-'}  {t['label']}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from flowfleet.registry.cli.common import _actor, run_in_db
    from flowfleet.registry.fleet import enrollment

    run_in_db(
        args,
        lambda db: enrollment.revoke_token(args.id, actor=_actor(), reason=args.reason),
        atomic=True,
    )
    print(f"bootstrap token {args.id} revoked")
    return 0


def cmd_allow(args: argparse.Namespace) -> int:
    from flowfleet.registry.cli.common import _actor, run_in_db
    from flowfleet.registry.fleet import enrollment

    row = run_in_db(
        args,
        lambda db: enrollment.allow_reenroll(args.device, actor=_actor(), reason=args.reason),
        atomic=True,
    )
    print(f"device {args.device} may enroll again until {row.expires_at:.0f} (once)")
    return 0
