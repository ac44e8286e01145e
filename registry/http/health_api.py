"""``GET /api/devices/<device>/health``: a device's health over time (a Flask blueprint).

Query parameters (all optional): ``from`` and ``to`` (epoch seconds or ISO 8601;
default the last 24 hours up to now; at most 31 days apart) and ``points`` (2..1000,
default 300: the most buckets returned). The beats are folded into equal buckets by
`flowfleet.registry.fleet.health_series`; the device page charts them. Readable
wherever the dashboard is (a viewer, or anonymously where ``anonymous_read`` allows).
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from ..errors import RegistryError
from ..fleet import series
from ..fleet.health_series import DEFAULT_POINTS, MAX_POINTS, MIN_POINTS, health_series
from ..store.db import Device
from .api import int_arg, query_args
from .series_api import parse_time

bp = Blueprint("health_api", __name__)

PARAMS = ("from", "to", "points")
DEFAULT_SPAN_S = 86400.0


@bp.get("/api/devices/<device>/health")
def api_device_health(device: str):
    from flowfleet.contract import is_valid_name

    args = query_args(PARAMS)
    if not is_valid_name(device):
        raise RegistryError(
            400, "invalid_parameter", f"{device!r} is not a valid device id", "device"
        )
    if not Device.select().where(Device.id == device).exists():
        raise RegistryError(404, "unknown_device", f"no device {device!r} is known", "device")
    try:
        end = parse_time(args["to"], "to") if "to" in args else time.time()
        start = parse_time(args["from"], "from") if "from" in args else end - DEFAULT_SPAN_S
    except series.SeriesError as exc:
        raise RegistryError(400, "invalid_parameter", exc.message, exc.field) from None
    points = int_arg(args, "points", DEFAULT_POINTS, MIN_POINTS, MAX_POINTS)
    return jsonify(health_series(device, start, end, points))
