"""`flowfleet registry users|tokens ...`: API users, web passwords and tokens."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _open, run_in_db

DAY = 86400.0


def add_access_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``users ...`` and ``tokens ...`` to the registry's action parsers."""
    # users
    users = actions.add_parser("users", help="API users")
    usub = users.add_subparsers(dest="users_action", metavar="ACTION", required=True)
    uadd = usub.add_parser("add", help="create a user")
    uadd.add_argument("name")
    uadd.add_argument("--role", choices=("viewer", "operator", "admin"), required=True)
    uadd.set_defaults(func=cmd_users_add)
    urole = usub.add_parser("role", help="change a user's role")
    urole.add_argument("name")
    urole.add_argument("role", choices=("viewer", "operator", "admin"))
    urole.set_defaults(func=cmd_users_role)
    udis = usub.add_parser("disable", help="disable a user (their tokens stop working)")
    udis.add_argument("name")
    udis.set_defaults(func=cmd_users_disable)
    ulist = usub.add_parser("list", help="users")
    ulist.set_defaults(func=cmd_users_list)
    upw = usub.add_parser(
        "passwd",
        help="set a user's web login password (read from stdin, or prompted twice on a TTY)",
    )
    upw.add_argument("name")
    upw.set_defaults(func=cmd_users_passwd)

    # tokens
    tokens = actions.add_parser("tokens", help="API tokens")
    tsub = tokens.add_subparsers(dest="tokens_action", metavar="ACTION", required=True)
    tnew = tsub.add_parser("create", help="create a token for a user; prints it once")
    tnew.add_argument("user", help="the user that owns the token (for --device: who issued it)")
    tnew.add_argument("--role", choices=("viewer", "operator", "admin"), help="default: the user's")
    tnew.add_argument(
        "--device",
        metavar="DEVICE_ID",
        help="a device token: it may only download the models deployed to this device",
    )
    tnew.add_argument("--label", default="")
    tnew.add_argument(
        "--ttl-days", type=float, help="expires after this many days (default: never)"
    )
    tnew.set_defaults(func=cmd_tokens_create)
    trev = tsub.add_parser("revoke", help="revoke a token by id")
    trev.add_argument("id", type=int)
    trev.set_defaults(func=cmd_tokens_revoke)
    tlist = tsub.add_parser("list", help="tokens (never their secrets)")
    tlist.add_argument("--user")
    tlist.set_defaults(func=cmd_tokens_list)
    for parser in (uadd, urole, udis, ulist, upw, tnew, trev, tlist):
        shared_options(parser)


# -- users and tokens --------------------------------------------------------------------


def cmd_users_add(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    run_in_db(args, lambda db: auth.create_user(args.name, args.role, actor=_actor()), atomic=True)
    print(
        f"user {args.name} ({args.role}) created; give them a token: "
        f"flowfleet registry tokens create {args.name}"
    )
    return 0


def cmd_users_role(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    run_in_db(
        args, lambda db: auth.set_user_role(args.name, args.role, actor=_actor()), atomic=True
    )
    print(f"user {args.name} is now {args.role}")
    return 0


def cmd_users_disable(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    run_in_db(args, lambda db: auth.disable_user(args.name, actor=_actor()), atomic=True)
    print(f"user {args.name} disabled")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    db, _ = _open(args)
    with db.connection_context():
        for u in auth.list_users():
            state = " (disabled)" if u["disabled_at"] else ""
            print(f"{u['name']:<24} {u['role']}{state}")
    return 0


def _read_new_password() -> str:
    """A new password: prompted twice on a TTY, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != first:
            raise CliError("the passwords differ; nothing was changed", EXIT_USAGE)
        return first
    line = sys.stdin.readline()
    if not line:
        raise CliError("no password on stdin; nothing was changed", EXIT_USAGE)
    return line.rstrip("\r\n")


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import websession

    password = _read_new_password()
    run_in_db(
        args, lambda db: websession.set_password(args.name, password, actor=_actor()), atomic=True
    )
    print(f"password of {args.name} set; their web sessions were ended")
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    ttl = args.ttl_days * DAY if args.ttl_days is not None else None
    secret, row = run_in_db(
        args,
        lambda db: auth.create_token(
            args.user,
            actor=_actor(),
            role=args.role,
            label=args.label,
            ttl_s=ttl,
            device=args.device,
        ),
        atomic=True,
    )
    print(secret)
    what = f"device {args.device}" if args.device else row.role
    print(f"token {row.id} for {args.user} ({what}); shown once, store it now", file=sys.stderr)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    run_in_db(args, lambda db: auth.revoke_token(args.id, actor=_actor()), atomic=True)
    print(f"token {args.id} revoked")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from flowfleet.registry.http import auth

    db, _ = _open(args)
    with db.connection_context():
        for t in auth.list_tokens(args.user):
            state = (
                "revoked"
                if t["revoked_at"]
                else ("expires " + f"{t['expires_at']:.0f}" if t["expires_at"] else "active")
            )
            scope = f"device:{t['device']}" if t["device"] else t["role"]
            print(
                f"{t['id']:>4}  {t['user']:<20} {scope:<9} {t['prefix']}...  {state}  {t['label']}"
            )
    return 0
