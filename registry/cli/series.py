"""`flowfleet registry series` (counts over time, like ``GET /api/series``) and
`flowfleet registry rollups rebuild` (recompute the rollups from the stored bins)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import run_in_db, settings


def add_series_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    s = actions.add_parser(
        "series",
        help="counts, occupancy or speeds per minute, hour or day (as GET /api/series)",
    )
    s.add_argument("--kind", choices=("lines", "zones", "speeds"), default="lines")
    s.add_argument("--step", choices=("minute", "hour", "day"), default="hour")
    s.add_argument("--from", dest="from_", metavar="TIME", help="epoch seconds or ISO 8601")
    s.add_argument("--to", metavar="TIME", help="epoch seconds or ISO 8601 (default now)")
    s.add_argument("--device")
    s.add_argument("--camera")
    s.add_argument("--line")
    s.add_argument("--zone")
    s.add_argument("--class", dest="class_")
    s.add_argument("--group", default="", help="comma list of device, camera, line, zone, class")
    s.add_argument("--format", choices=("table", "json", "csv"), default="table")
    s.add_argument("--timezone", default=argparse.SUPPRESS, help="site timezone (default UTC)")
    s.set_defaults(func=cmd_series)
    r = actions.add_parser("rollups", help="maintain the rollups behind the series")
    rsub = r.add_subparsers(dest="rollups_action", metavar="ACTION", required=True)
    rb = rsub.add_parser(
        "rebuild",
        help="recompute every rollup from the stored bins (after a timezone change)",
    )
    rb.add_argument("--timezone", default=argparse.SUPPRESS, help="site timezone (default UTC)")
    rb.set_defaults(func=cmd_rebuild)
    for parser in (s, rb):
        shared_options(parser)


def _buckets(args: argparse.Namespace):
    from ..fleet import series

    try:
        return series.Buckets(getattr(args, "timezone", None) or settings(args).counts.timezone)
    except series.SeriesError as exc:
        raise CliError(f"--{exc}", EXIT_USAGE) from None


def cmd_series(args: argparse.Namespace) -> int:
    from ..fleet import series
    from ..http.series_api import build_query

    params = {
        "kind": args.kind,
        "step": args.step,
        "from": args.from_,
        "to": args.to,
        "device": args.device,
        "camera": args.camera,
        "line": args.line,
        "zone": args.zone,
        "class": args.class_,
        "group": args.group,
    }
    buckets = _buckets(args)
    try:
        q = build_query({k: v for k, v in params.items() if v}, time.time())
    except series.SeriesError as exc:
        raise CliError(f"--{exc}", EXIT_USAGE) from None
    result = series.public(run_in_db(args, lambda db: series.query(db, q, buckets)))
    if args.format == "json":
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "csv":
        sys.stdout.write(series.to_csv(result))
    else:
        _table(result)
    return 0


def _table(result: dict) -> None:
    if not result["series"]:
        print(f"no {result['kind']} counted in that range")
        return
    for s in result["series"]:
        key = ", ".join(f"{k} {v}" for k, v in s["key"].items()) or "all"
        print(f"{key}: {_values(s['total'])}")
        for p in s["points"]:
            when = datetime.fromtimestamp(p["t"], timezone.utc).strftime("%Y-%m-%d %H:%M")
            print(f"  {when}Z  {_values({k: v for k, v in p.items() if k != 't'})}")


def _values(d: dict) -> str:
    return "  ".join(f"{k} {v}" for k, v in d.items() if v is not None)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from ..fleet import series

    buckets = _buckets(args)

    def work(db):
        return series.rebuild(db, buckets, progress=lambda n: print(f"  {n} bins", file=sys.stderr))

    n = run_in_db(args, work)
    print(f"rollups rebuilt from {n} stored bins (day buckets in {buckets.name})")
    return 0
