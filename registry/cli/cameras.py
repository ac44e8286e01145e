"""`flowfleet registry cameras geometry get|set DEVICE CAMERA`: camera set-up from the
command line, with the same checks and effects as the web editor's
``PUT /api/devices/<id>/cameras/<camera>/geometry`` (`flowfleet.registry.fleet.camsetup`).

``get`` prints the camera's set-up (desired, reported and configured geometry, its
state, the snapshot's state) as JSON; with ``--file`` it writes the geometry the
camera counts with (desired, else reported, else configured) as a file ready to edit.
``set --file`` pushes such a file (``-``: standard input) as the camera's desired
geometry: the running registry publishes it, the agent applies it without a restart
and reports it back. Bad geometry exits 2 naming the field and changes nothing; an
unknown device or camera exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _open, _print_json, _run

GEOMETRY_KEYS = ("lines", "zones", "homography")


def add_camera_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``cameras geometry get|set`` to the registry's action parsers."""
    cameras = actions.add_parser("cameras", help="camera set-up: lines, zones, speed calibration")
    csub = cameras.add_subparsers(dest="cameras_action", metavar="ACTION", required=True)
    geometry = csub.add_parser("geometry", help="a camera's lines, zones and homography")
    gsub = geometry.add_subparsers(dest="geometry_action", metavar="ACTION", required=True)
    get = gsub.add_parser("get", help="the camera's set-up as JSON")
    get.add_argument("device")
    get.add_argument("camera")
    get.add_argument(
        "--file",
        type=Path,
        help="write the geometry the camera counts with here (an input for set)",
    )
    get.set_defaults(func=cmd_geometry_get)
    put = gsub.add_parser("set", help="push a geometry file as the camera's desired geometry")
    put.add_argument("device")
    put.add_argument("camera")
    put.add_argument(
        "--file",
        required=True,
        help='JSON {"lines": [...], "zones": [...], "homography": {...} | null}; - for stdin',
    )
    put.add_argument("--json", action="store_true", help="print the camera's set-up as JSON")
    put.set_defaults(func=cmd_geometry_set)
    for parser in (get, put):
        shared_options(parser)


def cmd_geometry_get(args: argparse.Namespace) -> int:
    from ..fleet import camsetup

    db, _ = _open(args)
    with db.connection_context():
        setup = _run(lambda: _known(args) or camsetup.camera_setup(args.device, args.camera))
    if args.file is None:
        _print_json(setup)
        return 0
    source = setup["desired"] or setup["reported"] or setup["configured"] or {}
    geometry = {k: source.get(k) for k in GEOMETRY_KEYS if k in source}
    try:
        args.file.write_text(json.dumps(geometry, indent=2) + "\n")
    except OSError as exc:
        raise CliError(f"--file: cannot write {args.file}: {exc}", EXIT_USAGE) from None
    print(f"wrote {args.device}/{args.camera}'s geometry ({setup['state']}) to {args.file}")
    return 0


def cmd_geometry_set(args: argparse.Namespace) -> int:
    from ..fleet import camsetup

    body = _read(args.file)
    db, reg = _open(args)
    with db.connection_context():
        setup = _run(
            lambda: camsetup.set_geometry(reg, args.device, args.camera, body, actor=_actor())
        )
    setup.pop("command_id", None)
    if args.json:
        _print_json(setup)
    else:
        desired = setup["desired"] or {}
        print(
            f"{args.device}/{args.camera}: {len(desired.get('lines') or [])} line(s), "
            f"{len(desired.get('zones') or [])} zone(s) queued as desired state version "
            f"{setup['desired_version']} (state {setup['state']}; the running registry "
            "publishes it)"
        )
    return 0


def _known(args: argparse.Namespace) -> None:
    from ..fleet import camsetup

    camsetup.known_camera(args.device, args.camera)


def _read(name: str):
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise CliError(f"--file: cannot read {name}: {exc}", EXIT_USAGE) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"--file: {name} is not valid JSON: {exc}", EXIT_USAGE) from None
