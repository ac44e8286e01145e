"""A device's health over time: its stored health beats, bucketed and downsampled.

Health beats (`flowfleet.contract.Health`, stored as `HealthBeat` rows) arrive every
``health_seconds`` (a minute by default), so a month of one device is about 44,000
beats: far more points than a chart has pixels. `health_series` reads the beats of a
bounded range and folds them into at most ``points`` equal buckets, columnar (one
list per figure, aligned with ``t``) as a chart library takes them:

* ``fps``, ``inference_ms``, ``inference_p95_ms``: per camera, the mean over the
  bucket's beats;
* ``temperature_c`` (the SoC's), ``load_1m``, ``cpu_percent``: the mean;
* ``outbox_depth``: the largest in the bucket (a backlog that came and went within a
  bucket must still show), ``outbox_dropped``: the last (a lifetime counter); both
  read from every beat by the database's own JSON functions.

The means are taken over about `SAMPLE` beats per bucket, spread through it (every
n-th beat, n from the range's beat count): parsing each beat's JSON is what a long
range costs, and twelve beats give the mean a chart needs. A short range parses
every beat.

A figure a beat left out (a platform without a temperature sensor) does not count
towards the mean; a bucket where no beat had it is null. Buckets without any beat
are left out (a gap in ``t``), so an offline device draws as a gap, not as zeros.
"""

from __future__ import annotations

import json
import math
from typing import Any

import peewee as pw

from ..errors import RegistryError
from ..store.db import HealthBeat, database_proxy

MAX_RANGE_S = 31 * 86400  # a month: about 44,640 beats at the default minute
MAX_POINTS = 1000
DEFAULT_POINTS = 300
MIN_POINTS = 2
SAMPLE = 12  # beats parsed per bucket (spread through it) for the means
SYSTEM_FIGURES = (
    ("temperature_c", "soc_temp_c"),
    ("load_1m", "load_1m"),
    ("cpu_percent", "cpu_percent"),
)
CAMERA_FIGURES = ("fps", "inference_ms", "inference_p95_ms")


class _Mean:
    __slots__ = ("n", "total")

    def __init__(self) -> None:
        self.n, self.total = 0, 0.0

    def add(self, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.n += 1
            self.total += float(value)

    def value(self) -> float | None:
        return round(self.total / self.n, 4) if self.n else None


def check_range(start: float, end: float, points: int) -> None:
    """Refuse a range the series will not serve (400 naming the parameter)."""
    if not (math.isfinite(start) and math.isfinite(end)):
        raise RegistryError(400, "invalid_parameter", "from and to must be finite", "from")
    if end <= start:
        raise RegistryError(400, "invalid_parameter", "to must be after from", "to")
    if end - start > MAX_RANGE_S:
        raise RegistryError(
            400,
            "invalid_parameter",
            f"the range is {end - start:.0f} s; at most {MAX_RANGE_S} s (31 days)",
            "from",
        )
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise RegistryError(
            400,
            "invalid_parameter",
            f"points must be an integer from {MIN_POINTS} to {MAX_POINTS}, got {points}",
            "points",
        )


def _outbox_columns() -> tuple[pw.Node, pw.Node]:
    """The outbox depth and drop counter read from the stored JSON by the database
    itself: every beat counts towards the largest depth, parsed or not."""
    if isinstance(database_proxy.obj, pw.PostgresqlDatabase):
        return (
            pw.SQL("CAST(CAST(payload AS jsonb) ->> 'outbox_depth' AS BIGINT)"),
            pw.SQL("CAST(CAST(payload AS jsonb) ->> 'outbox_dropped' AS BIGINT)"),
        )
    return (
        pw.SQL("json_extract(payload, '$.outbox_depth')"),
        pw.SQL("json_extract(payload, '$.outbox_dropped')"),
    )


def health_series(
    device: str, start: float, end: float, points: int = DEFAULT_POINTS, *, sample: int = SAMPLE
) -> dict:
    """The health of ``device`` between ``start`` and ``end`` (epoch seconds, by the
    beat's own ``ts``) in at most ``points`` buckets; see the module docstring.
    ``sample``: beats parsed per bucket for the means (the benchmark compares).

    The database connection must be open (the HTTP layer opens one per request).
    """
    check_range(start, end, points)
    step = max(1.0, math.ceil((end - start) / points))
    where = (HealthBeat.device == device) & (HealthBeat.ts >= start) & (HealthBeat.ts < end)
    total = HealthBeat.select().where(where).count()
    # Parse about SAMPLE beats per bucket for the means; JSON parsing is what costs
    # (a month of minute beats is 44,640 of them), the rows themselves are cheap.
    stride = max(1, round(total / points / sample))
    depth_col, dropped_col = _outbox_columns()
    rows = (
        HealthBeat.select(HealthBeat.ts, depth_col, dropped_col, HealthBeat.payload)
        .where(where)
        .order_by(HealthBeat.ts)
        .tuples()
    )
    buckets: dict[int, dict] = {}
    cameras: set[str] = set()
    for ts, depth, dropped, payload in rows.iterator():
        k = int((ts - start) // step)
        b = buckets.get(k)
        if b is None:
            b = buckets[k] = {
                "beats": 0,
                "depth": None,
                "dropped": None,
                "system": {name: _Mean() for name, _ in SYSTEM_FIGURES},
                "cameras": {},
            }
        b["beats"] += 1
        if depth is not None:
            b["depth"] = int(depth) if b["depth"] is None else max(b["depth"], int(depth))
        if dropped is not None:
            b["dropped"] = int(dropped)
        if (b["beats"] - 1) % stride:
            continue
        body = json.loads(payload)
        system = body.get("system") or {}
        for name, key in SYSTEM_FIGURES:
            b["system"][name].add(system.get(key))
        for cam in body.get("cameras") or ():
            name = cam.get("camera")
            if not isinstance(name, str):
                continue
            cameras.add(name)
            means = b["cameras"].setdefault(name, {f: _Mean() for f in CAMERA_FIGURES})
            for f in CAMERA_FIGURES:
                means[f].add(cam.get(f))
    keys = sorted(buckets)
    names = sorted(cameras)
    out: dict[str, Any] = {
        "device": device,
        "from": start,
        "to": end,
        "step_s": step,
        "t": [start + k * step for k in keys],
        "beats": [buckets[k]["beats"] for k in keys],
        "outbox_depth": [buckets[k]["depth"] for k in keys],
        "outbox_dropped": [buckets[k]["dropped"] for k in keys],
    }
    for name, _ in SYSTEM_FIGURES:
        out[name] = [buckets[k]["system"][name].value() for k in keys]
    out["cameras"] = {
        cam: {
            f: [
                buckets[k]["cameras"][cam][f].value() if cam in buckets[k]["cameras"] else None
                for k in keys
            ]
            for f in CAMERA_FIGURES
        }
        for cam in names
    }
    return out
