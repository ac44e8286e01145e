"""``GET /api/series``: counts, occupancy and speeds over time, as JSON or CSV.

Query parameters (all optional): ``kind`` (lines | zones | speeds, default lines),
``step`` (minute | hour | day, default hour), ``from`` and ``to`` (epoch seconds or
ISO 8601; default: the last hour of minutes, day of hours or 30 days of days up to
now), ``device``, ``camera``, ``line`` (kinds lines and speeds) or ``zone`` (kind
zones), ``class``, ``group`` (comma list of device, camera, line, zone, class: one
series per value; default one series over everything matched) and ``format``
(json | csv). See `flowfleet.registry.fleet.series` for what a bucket holds.
"""

from __future__ import annotations

import time
from datetime import datetime

from flask import Blueprint, Response, current_app, jsonify

from ..errors import RegistryError
from ..fleet import series
from .api import query_args

bp = Blueprint("series", __name__)

PARAMS = (
    "kind",
    "step",
    "from",
    "to",
    "device",
    "camera",
    "line",
    "zone",
    "class",
    "group",
    "format",
)
DEFAULT_SPAN = {"minute": 3600.0, "hour": 86400.0, "day": 30 * 86400.0}


def parse_time(value: str, field: str) -> float:
    """Epoch seconds or ISO 8601 (``2026-12-03T08:00:00Z``; no zone means UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise series.SeriesError(
            field, f"{value!r} is neither epoch seconds nor an ISO 8601 time"
        ) from None
    if dt.tzinfo is None:
        from datetime import timezone

        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def build_query(args: dict[str, str], now: float) -> series.Query:
    """A `series.Query` from request (or command-line) parameters; SeriesError names
    the parameter that is wrong."""
    from flowfleet.contract import is_valid_name

    step = args.get("step", "hour")
    kind = args.get("kind", "lines")
    if step not in series.STEPS:
        raise series.SeriesError("step", f"must be one of {', '.join(series.STEPS)}")
    end = parse_time(args["to"], "to") if "to" in args else now
    start = parse_time(args["from"], "from") if "from" in args else end - DEFAULT_SPAN[step]
    for name in ("device", "camera", "line", "zone", "class"):
        value = args.get(name)
        if value is not None and not is_valid_name(value) and name != "class":
            raise series.SeriesError(name, f"{value!r} is not a valid {name} name")
    if "line" in args and kind == "zones":
        raise series.SeriesError("line", "kind zones has zones, not lines")
    if "zone" in args and kind != "zones":
        raise series.SeriesError("zone", f"kind {kind} has lines, not zones")
    group = tuple(g for g in args.get("group", "").split(",") if g)
    return series.Query(
        kind=kind,
        step=step,
        start=start,
        end=end,
        device=args.get("device"),
        camera=args.get("camera"),
        name=args.get("line") or args.get("zone"),
        class_=args.get("class"),
        group=group,
    ).check()


@bp.get("/api/series")
def api_series():
    args = query_args(PARAMS)
    fmt = args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise RegistryError(400, "invalid_parameter", "format must be json or csv", "format")
    buckets = current_app.extensions.get("flowfleet_buckets") or series.Buckets()
    try:
        q = build_query(args, time.time())
        result = series.public(series.query(current_app.extensions["flowfleet_db"], q, buckets))
    except series.SeriesError as exc:
        raise RegistryError(400, "invalid_parameter", exc.message, exc.field) from None
    if fmt == "csv":
        return Response(
            series.to_csv(result),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="series-{q.kind}.csv"'},
        )
    return jsonify(result)
