"""`flowfleet registry groups ...`: manage device groups from the command line.

Deploying to a group needs the running registry's broker connection, so it is done
through the API (``POST /api/groups/<name>/deployments``) or a watch-folder sidecar.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .common import _actor, _print_json, run_in_db


def add_group_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``groups list|show|set|delete`` to the registry's action parsers."""
    groups = actions.add_parser("groups", help="device groups (deployment targets)")
    gsub = groups.add_subparsers(dest="groups_action", metavar="ACTION", required=True)
    glist = gsub.add_parser("list", help="groups and their devices")
    glist.add_argument("--json", action="store_true", help="print JSON")
    glist.set_defaults(func=cmd_groups_list)
    gshow = gsub.add_parser("show", help="one group as JSON")
    gshow.add_argument("name")
    gshow.set_defaults(func=cmd_groups_show)
    gset = gsub.add_parser("set", help="create a group or replace its devices")
    gset.add_argument("name")
    gset.add_argument("devices", nargs="*", metavar="DEVICE_ID")
    gset.add_argument("--reason", default="")
    gset.set_defaults(func=cmd_groups_set)
    gdel = gsub.add_parser("delete", help="delete a group (deployments stay)")
    gdel.add_argument("name")
    gdel.add_argument("--reason", default="")
    gdel.set_defaults(func=cmd_groups_delete)
    for parser in (glist, gshow, gset, gdel):
        shared_options(parser)


def cmd_groups_list(args: argparse.Namespace) -> int:
    from ..fleet import groups  # registry dependencies load only when a groups action runs

    rows = run_in_db(args, lambda db: groups.list_groups())
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no device groups")
    else:
        for g in rows:
            print(f"{g['name']}\t{len(g['devices'])} device(s)\t{' '.join(g['devices'])}")
    return 0


def cmd_groups_show(args: argparse.Namespace) -> int:
    from ..fleet import groups

    _print_json(run_in_db(args, lambda db: groups.get_group(args.name)))
    return 0


def cmd_groups_set(args: argparse.Namespace) -> int:
    from ..fleet import groups

    # Not atomic here: set_group takes its own group lock (BEGIN IMMEDIATE on SQLite).
    group, created = run_in_db(
        args,
        lambda db: groups.set_group(
            db, args.name, args.devices, actor=_actor(), reason=args.reason
        ),
    )
    what = "created" if created else "updated"
    print(f"group {group['name']} {what}: {len(group['devices'])} device(s)")
    return 0


def cmd_groups_delete(args: argparse.Namespace) -> int:
    from ..fleet import groups

    run_in_db(
        args, lambda db: groups.delete_group(db, args.name, actor=_actor(), reason=args.reason)
    )
    print(f"group {args.name} deleted")
    return 0
