"""`flowfleet registry devices ...`: device records from the command line.

``list`` (``--unregistered`` for those first seen through telemetry and not accepted
yet), ``show``, ``add`` (register a device before it connects), ``edit`` (name,
description, tags, site, location) and ``accept``. Errors name the field; bad input
exits 2 and changes nothing, an unknown device exits 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _print_json, run_in_db, settings


def _record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="display name (at most 128 characters)")
    p.add_argument("--description")
    p.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="repeatable")
    p.add_argument("--site", metavar="SITE", help="site name (letters, digits, _ . -)")
    p.add_argument("--location", metavar="LAT,LON", help="WGS 84 degrees, e.g. 48.8584,2.2945")
    p.add_argument("--reason", default="", help="recorded in the audit trail")


def add_device_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``devices list|show|add|edit|accept`` to the registry's action parsers."""
    devices = actions.add_parser("devices", help="device records, registration, presence")
    dsub = devices.add_subparsers(dest="devices_action", metavar="ACTION", required=True)
    dlist = dsub.add_parser("list", help="devices with presence and registration")
    which = dlist.add_mutually_exclusive_group()
    which.add_argument("--unregistered", action="store_true", help="only devices not accepted yet")
    which.add_argument("--registered", action="store_true", help="only accepted devices")
    dlist.add_argument("--json", action="store_true", help="print JSON")
    dlist.set_defaults(func=cmd_devices_list)
    dshow = dsub.add_parser("show", help="one device's record as JSON")
    dshow.add_argument("device")
    dshow.set_defaults(func=cmd_devices_show)
    dadd = dsub.add_parser("add", help="register a device before it first connects")
    dadd.add_argument("device")
    _record_options(dadd)
    dadd.add_argument("--json", action="store_true", help="print the record as JSON")
    dadd.set_defaults(func=cmd_devices_add)
    dedit = dsub.add_parser("edit", help="edit a device's record")
    dedit.add_argument("device")
    _record_options(dedit)
    dedit.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=("name", "description", "tags", "site", "location"),
        help="remove a field (repeatable)",
    )
    dedit.add_argument("--json", action="store_true", help="print the record as JSON")
    dedit.set_defaults(func=cmd_devices_edit)
    daccept = dsub.add_parser("accept", help="accept a device first seen through telemetry")
    daccept.add_argument("device")
    daccept.add_argument("--reason", default="")
    daccept.add_argument("--json", action="store_true", help="print the record as JSON")
    daccept.set_defaults(func=cmd_devices_accept)
    for parser in (dlist, dshow, dadd, dedit, daccept):
        shared_options(parser)


def _location(text: str) -> dict[str, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        lat, lon = (float(p) for p in parts)
    except ValueError:
        raise CliError(
            f"--location: {text!r} is not LAT,LON (two numbers, e.g. 48.8584,2.2945)", EXIT_USAGE
        ) from None
    return {"latitude": lat, "longitude": lon}


def _fields(args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {}
    for key in ("name", "description", "site"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.tags is not None:
        fields["tags"] = args.tags
    if args.location is not None:
        fields["location"] = _location(args.location)
    for key in getattr(args, "clear", []):
        if key in fields:
            raise CliError(f"--clear {key}: the same field is also set", EXIT_USAGE)
        fields[key] = None
    return fields


def _stale_after_s(args: argparse.Namespace) -> float:
    return settings(args).devices.stale_after_s


def _line(d: dict) -> str:
    name = f" ({d['name']})" if d["name"] else ""
    site = d["site"] or "-"
    hw = d["hardware"] or {}
    board = hw.get("board_id") or hw.get("arch") or "hardware not reported"
    return f"{d['device']}{name}\t{d['presence']}\t{d['registration']}\tsite {site}\t{board}"


def cmd_devices_list(args: argparse.Namespace) -> int:
    from ..fleet import devices
    from ..store.db import Device, now

    registration = "unregistered" if args.unregistered else None
    registration = "registered" if args.registered else registration
    stale_after_s = _stale_after_s(args)

    def rows(db):
        query = Device.select().order_by(Device.id)
        if registration is not None:
            query = query.where(Device.accepted_at.is_null(registration == "unregistered"))
        at = now()
        return [devices.device_dict(d, at, stale_after_s) for d in query]

    items = run_in_db(args, rows)
    if args.json:
        _print_json(items)
    elif not items:
        print(f"no {registration or ''} devices".replace("  ", " "))
    else:
        for d in items:
            print(_line(d))
    return 0


def _show(args: argparse.Namespace, get) -> dict:
    from ..fleet import devices
    from ..store.db import now

    stale_after_s = _stale_after_s(args)
    return run_in_db(args, lambda db: devices.device_dict(get(db), now(), stale_after_s))


def cmd_devices_show(args: argparse.Namespace) -> int:
    from ..fleet import devices

    _print_json(_show(args, lambda db: devices.get_device(args.device)))
    return 0


def sync_broker(args: argparse.Namespace) -> dict | None:
    """With ``[enrollment] broker_auth`` in the config, regenerate the broker's password
    file and ACL from the records and reload it, as the registry's API does after the
    same change (`flowfleet.registry.fleet.broker_auth`); None without it."""
    import sys

    from ..fleet import broker_auth
    from ..service import _enrollment_settings

    s = settings(args)
    enrollment = _enrollment_settings(s.enrollment, s.broker.topic_root)
    if enrollment is None or not enrollment.broker_auth:
        return None
    try:
        done = run_in_db(args, lambda db: broker_auth.sync(enrollment))
    except OSError as exc:
        raise CliError(f"{enrollment.broker_dir}: {exc}") from None
    if done["changed"]:
        print(
            f"broker files {', '.join(done['changed'])} regenerated; broker reloaded: "
            f"{'yes' if done['reloaded'] else 'no'}",
            file=sys.stderr,
        )
    return done


def _done(args: argparse.Namespace, record: dict, what: str) -> int:
    if args.json:
        _print_json(record)
    else:
        print(f"device {record['device']} {what}")
    return 0


def cmd_devices_add(args: argparse.Namespace) -> int:
    from ..fleet import devices

    fields = _fields(args)
    record = _show(
        args,
        lambda db: devices.create_device(
            db, args.device, fields, actor=_actor(), reason=args.reason
        ),
    )
    sync_broker(args)  # a new device gets its ACL entry
    return _done(args, record, "registered")


def cmd_devices_edit(args: argparse.Namespace) -> int:
    from ..fleet import devices

    fields = _fields(args)
    if not fields:
        raise CliError("nothing to change: give --name, --tag, --site, ... or --clear", EXIT_USAGE)
    record = _show(
        args,
        lambda db: devices.update_device(
            db, args.device, fields, actor=_actor(), reason=args.reason
        ),
    )
    return _done(args, record, "updated")


def cmd_devices_accept(args: argparse.Namespace) -> int:
    from ..fleet import devices

    record = _show(
        args,
        lambda db: devices.accept_device(db, args.device, actor=_actor(), reason=args.reason),
    )
    sync_broker(args)  # with broker_acl = "accepted", this grants it
    return _done(args, record, f"accepted ({record['registration']})")
