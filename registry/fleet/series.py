"""Counts over time: minute, hour and day rollups, kept as bins arrive, and queried.

Every stored count bin adds its rows to three buckets per (device, camera, line or
zone, class): the minute and the hour of its window start (aligned to UTC) and the
day of its window start (midnight to midnight in the registry's site timezone).
`add_bin` runs in the transaction that stores the bin, with upserts that add to
what a bucket holds, so a rollup always equals the sum of its raw bins, whatever
order the bins arrive in and however late (`tests/test_series.py` checks it with
generated bins across bucket and day boundaries in random order).

Speeds combine as n, the n-weighted sum of the bins' means, the max, and a histogram
of the tracks' speeds (one additive column per bucket of `flowfleet.speedhist`); the
mean of a bucket is ``kmh_sum / n`` and its p50 / p85 / p95 come from the histogram
(`fleet.speedhist`), to within one bucket width. A bin's own p85 does not combine.

Queries (`query`) read one step's buckets for a range, optionally split by device,
camera, line or zone, and class, and return points plus a total; `to_csv` renders
them for export. The raw bins may later be removed by retention; rollups stay.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import peewee as pw

from flowfleet.contract import CountBin as CountBinPayload

from ..store import bulk
from ..store.db import (
    SPEED_HIST_COLUMNS,
    STEPS,
    CountBin,
    LineRollup,
    LineTotal,
    SpeedRollup,
    ZoneRollup,
    ZoneTotal,
)
from . import speedhist

log = logging.getLogger(__name__)

KINDS = ("lines", "zones", "speeds")
GROUPS = ("device", "camera", "line", "zone", "class")
# Points one query may return (buckets x series), so one request cannot ask for
# years of minutes.
MAX_POINTS = 100_000


class SeriesError(ValueError):
    """A query that cannot be answered as asked (the message names the parameter)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Buckets:
    """Bucket starts for one site timezone."""

    def __init__(self, tz: str = "UTC") -> None:
        try:
            self.tz = ZoneInfo(tz)
        except Exception:
            raise SeriesError("timezone", f"unknown timezone {tz!r}") from None
        self.name = tz

    def start(self, step: str, ts: float) -> float:
        """The start of the ``step`` ("minute", "hour", "day") bucket holding ``ts``."""
        if step == "minute":
            return math.floor(ts / 60.0) * 60.0
        if step == "hour":
            return math.floor(ts / 3600.0) * 3600.0
        local = datetime.fromtimestamp(ts, self.tz)
        midnight = datetime(local.year, local.month, local.day, tzinfo=self.tz)
        return midnight.timestamp()

    def starts(self, step: str, start: float, end: float, limit: int | None = None) -> list[float]:
        """Every bucket start of ``step`` from the one holding ``start`` to before ``end``
        (no more than ``limit`` + 1 of them: enough to tell a range is too long without
        listing the 66 million minutes of a century)."""
        out = []
        t = self.start(step, start)
        while t < end and (limit is None or len(out) <= limit):
            out.append(t)
            if step == "day":
                # 26 h after a local midnight is always within the next day, whether
                # that day has 23, 24 or 25 hours (DST).
                t = self.start("day", t + 26 * 3600.0)
            else:
                t += 60.0 if step == "minute" else 3600.0
        return out


# -- keeping rollups -----------------------------------------------------------------


_NAME = {LineRollup: "line", ZoneRollup: "zone", SpeedRollup: "line"}
# Per table: the columns a bucket adds up, and those it keeps the maximum of.
_ADDS = {
    LineRollup: ("bins", "count_in", "count_out"),
    ZoneRollup: ("bins", "entries", "exits", "dwell_s_sum", "dwell_n"),
    SpeedRollup: ("bins", "n", "kmh_sum", "insufficient", *SPEED_HIST_COLUMNS),
}
_MAXES = {LineRollup: (), ZoneRollup: ("peak_occupancy",), SpeedRollup: ("kmh_max",)}


_KEY = {m: ("device", "camera", _NAME[m], "class_", "step", "bucket") for m in _NAME}
_NO_HIST = (0,) * len(SPEED_HIST_COLUMNS)


def _upsert(model: type[pw.Model], rows: list[tuple]) -> None:
    """Add ``rows`` (key columns, then `_ADDS`, then `_MAXES`) to their buckets: insert
    new buckets, add to (or take the max with) the stored ones. ``rows`` must hold each
    bucket once (PostgreSQL refuses to update one row twice in a statement)."""
    if rows:
        db = model._meta.database
        bulk.upsert_adding(db, model, _KEY[model], _ADDS[model], _MAXES[model], rows)


class RollupBatch:
    """The rollup changes of any number of stored bins, summed in memory and written
    with one upsert per table (`flush`, in the bins' transaction): a batch of 500 bins
    costs three statements instead of nine per bin.

    Per table, a dict from bucket key to a list of the values in column order: the
    `_ADDS` (summed) then the `_MAXES` (the larger kept), which `flush` writes after the
    key. A speed bucket holds its histogram as one list (None until a bin brings one),
    spread into the columns at `flush`: most bins carry none, and adding 49 zeros per
    row was a third of this class's work.
    """

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        self._lines: dict[tuple, list] = {}
        self._zones: dict[tuple, list] = {}
        self._speeds: dict[tuple, list] = {}
        self._days: dict[float, float] = {}  # hour bucket -> day bucket (site timezone)

    def _starts(self, ts: float) -> tuple[tuple[str, float], ...]:
        hour = math.floor(ts / 3600.0) * 3600.0
        day = self._days.get(hour)
        if day is None:
            # Cached per hour only where the whole hour lies in one local day: some
            # timezones are offset by 30 or 45 minutes, so a midnight may fall inside.
            day = self.buckets.start("day", ts)
            if self.buckets.start("day", hour) == day == self.buckets.start("day", hour + 3599):
                self._days[hour] = day
        return (("m", math.floor(ts / 60.0) * 60.0), ("h", hour), ("d", day))

    def add(self, device: str, message: CountBinPayload) -> None:
        """Add one stored bin to its minute, hour and day buckets."""
        # Written out per table rather than through one generic helper: this runs for
        # every row of every stored bin, three times (minute, hour, day).
        starts = self._starts(message.start)
        lines = self._lines
        for r in message.lines:
            head, cin, cout = (device, r.camera, r.line, r.class_), r.in_, r.out
            for code, bucket in starts:
                key = (*head, code, bucket)
                held = lines.get(key)
                if held is None:
                    lines[key] = [1, cin, cout]
                else:
                    held[0] += 1
                    held[1] += cin
                    held[2] += cout
        zones = self._zones
        for r in message.zones:
            head = (device, r.camera, r.zone, r.class_)
            values = (r.entries, r.exits, r.dwell_s_sum, r.dwell_n, r.peak_occupancy)
            for code, bucket in starts:
                key = (*head, code, bucket)
                held = zones.get(key)
                if held is None:
                    zones[key] = [1, *values]
                else:
                    held[0] += 1
                    held[1] += values[0]
                    held[2] += values[1]
                    held[3] += values[2]
                    held[4] += values[3]
                    if values[4] > held[5]:
                        held[5] = values[4]
        speeds = self._speeds
        for r in message.speeds or ():
            head = (device, r.camera, r.line or "", r.class_)
            kmh_sum = (r.mean_kmh or 0.0) * r.n
            top, hist = r.max_kmh, r.hist
            for code, bucket in starts:
                key = (*head, code, bucket)
                held = speeds.get(key)
                if held is None:
                    speeds[key] = [1, r.n, kmh_sum, r.insufficient, _hist(None, hist), top]
                    continue
                held[0] += 1
                held[1] += r.n
                held[2] += kmh_sum
                held[3] += r.insufficient
                if hist is not None:
                    held[4] = _hist(held[4], hist)
                if top is not None and (held[5] is None or top > held[5]):
                    held[5] = top

    def flush(self) -> None:
        """Write what was added (inside the bins' transaction) and start empty."""
        _upsert(LineRollup, [(*key, *values) for key, values in self._lines.items()])
        _upsert(ZoneRollup, [(*key, *values) for key, values in self._zones.items()])
        _upsert(
            SpeedRollup,
            [
                (*key, b, n, kmh_sum, insufficient, *(hist or _NO_HIST), top)
                for key, (b, n, kmh_sum, insufficient, hist, top) in self._speeds.items()
            ],
        )
        self._lines.clear()
        self._zones.clear()
        self._speeds.clear()


def _hist(held: list[int] | None, hist: tuple[int, ...] | None) -> list[int] | None:
    """A speed bucket's histogram plus one bin's (either may be None: no histogram)."""
    if hist is None:
        return held
    if held is None:
        return list(hist)
    return [a + b for a, b in zip(held, hist, strict=True)]


def add_bin(device: str, message: CountBinPayload, buckets: Buckets) -> None:
    """Add one stored bin to its minute, hour and day buckets (call in its transaction)."""
    batch = RollupBatch(buckets)
    batch.add(device, message)
    batch.flush()


def rebuild(db: pw.Database, buckets: Buckets, chunk: int = 2000, progress=None) -> int:
    """Recompute every rollup from the raw bins still stored (after a timezone change,
    or for bins stored before rollups existed). Returns how many bins were read.

    Reads the stored rows, not the payloads, and leaves out (with a warning) rows an
    older registry stored before the contract had bounds (a count over MAX_COUNT, a
    dwell sum that is not finite): no bin stored today can hold them, and one device
    must not break the fleet's totals. Buckets of bins that retention already
    removed are lost by a rebuild.
    """
    with db.atomic():
        for model in (LineRollup, ZoneRollup, SpeedRollup):
            model.delete().execute()
        last, n = 0, 0
        while True:
            rows = list(
                CountBin.select(CountBin.id, CountBin.device, CountBin.seq, CountBin.payload)
                .where(CountBin.id > last)
                .order_by(CountBin.id)
                .limit(chunk)
                .tuples()
            )
            if not rows:
                return n
            ids = [r[0] for r in rows]
            lines = defaultdict(list)
            for r in LineTotal.select().where(LineTotal.bin.in_(ids)):
                lines[r.bin_id].append(r)
            zones = defaultdict(list)
            for r in ZoneTotal.select().where(ZoneTotal.bin.in_(ids)):
                zones[r.bin_id].append(r)
            batch = RollupBatch(buckets)
            for row_id, device, seq, payload in rows:
                _add_stored(device, seq, lines[row_id], zones[row_id], payload, batch)
                last = row_id
            batch.flush()
            n += len(rows)
            if progress is not None:
                progress(n)


def _add_stored(device, seq, lines, zones, payload: str, batch: RollupBatch) -> None:
    """One stored bin's rows into its buckets (see `rebuild`)."""
    import json

    from flowfleet.contract import MAX_COUNT, LineCount, SpeedCount, ZoneCount
    from flowfleet.contract import CountBin as Payload

    def ok(*counts, dwell=0.0) -> bool:
        good = all(0 <= c <= MAX_COUNT for c in counts) and math.isfinite(dwell)
        if not good:
            log.warning("rollups leave out a row of %s bin %d: values out of bounds", device, seq)
        return good

    start = (lines or zones)[0].start if (lines or zones) else None
    speeds = ()
    try:
        body = json.loads(payload)
        start = body["start"] if start is None else start
        speeds = tuple(
            SpeedCount.model_validate(s) for s in body.get("speeds") or () if isinstance(s, dict)
        )
    except Exception:  # an older registry's payload: its speeds are left out
        speeds = ()
    if start is None:
        return
    message = Payload.model_construct(
        device=device,
        seq=seq,
        start=start,
        end=start,
        lines=tuple(
            LineCount.model_construct(
                camera=r.camera, line=r.line, class_=r.class_, in_=r.count_in, out=r.count_out
            )
            for r in lines
            if ok(r.count_in, r.count_out)
        ),
        zones=tuple(
            ZoneCount.model_construct(
                camera=r.camera,
                zone=r.zone,
                class_=r.class_,
                entries=r.entries,
                exits=r.exits,
                peak_occupancy=r.peak_occupancy,
                dwell_s_sum=r.dwell_s_sum,
                dwell_n=r.dwell_n,
            )
            for r in zones
            if ok(r.entries, r.exits, r.peak_occupancy, r.dwell_n, dwell=r.dwell_s_sum)
        ),
        speeds=speeds,
    )
    batch.add(device, message)


# -- queries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    kind: str = "lines"  # lines | zones | speeds
    step: str = "hour"  # minute | hour | day
    start: float = 0.0  # first bucket: the one holding ``start``
    end: float = 0.0  # up to (not including) the bucket holding ``end``
    device: str | None = None
    camera: str | None = None
    name: str | None = None  # the line or zone
    class_: str | None = None
    group: tuple[str, ...] = ()  # split the series by these

    def check(self) -> Query:
        if self.kind not in KINDS:
            raise SeriesError("kind", f"must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.step not in STEPS:
            raise SeriesError("step", f"must be one of {', '.join(STEPS)}, not {self.step!r}")
        if not self.end > self.start:
            raise SeriesError("to", "must be after from")
        for g in self.group:
            if g not in GROUPS:
                raise SeriesError("group", f"{g!r} is not one of {', '.join(GROUPS)}")
            if (g == "line" and self.kind == "zones") or (g == "zone" and self.kind != "zones"):
                raise SeriesError("group", f"{g!r} does not go with kind {self.kind}")
        return self


_VALUES = {
    "lines": ("count_in", "count_out"),
    "zones": ("entries", "exits", "peak_occupancy", "dwell_s_sum", "dwell_n"),
    "speeds": ("n", "kmh_sum", "kmh_max", "insufficient", *SPEED_HIST_COLUMNS),
}
_SPEED_BASE = 4  # the speed values before the histogram columns
_MODEL = {"lines": LineRollup, "zones": ZoneRollup, "speeds": SpeedRollup}
# JSON names of the values.
_OUT = {
    "count_in": "in",
    "count_out": "out",
    "peak_occupancy": "peak_occupancy",
    "kmh_max": "max_kmh",
}


def _is_sqlite(db: pw.Database) -> bool:
    return isinstance(db, pw.SqliteDatabase)


def query(db: pw.Database, q: Query, buckets: Buckets) -> dict:
    """The buckets of ``q`` with their values, per series (``q.group``), and totals."""
    q.check()
    model = _MODEL[q.kind]
    starts = buckets.starts(q.step, q.start, q.end, limit=MAX_POINTS)
    group_cols = [_column(model, g) for g in q.group]
    n_series = 1
    if len(starts) > MAX_POINTS:
        raise SeriesError("from", f"more than {MAX_POINTS} {q.step} buckets; at most {MAX_POINTS}")
    total = pw.fn.TOTAL if _is_sqlite(db) else pw.fn.SUM
    values = []
    for v in _VALUES[q.kind]:
        col = getattr(model, v)
        agg = pw.fn.MAX(col) if v in ("peak_occupancy", "kmh_max") else total(col)
        values.append(agg.alias(v))
    sel = (
        model.select(*group_cols, model.bucket, *values)
        .where(
            (model.step == STEPS[q.step])
            & (model.bucket >= (starts[0] if starts else q.start))
            & (model.bucket < q.end)
        )
        .group_by(*group_cols, model.bucket)
        .order_by(*group_cols, model.bucket)
    )
    for g, want in (("device", q.device), ("camera", q.camera), ("class", q.class_)):
        if want is not None:
            sel = sel.where(_column(model, g) == want)
    if q.name is not None:
        sel = sel.where(getattr(model, _NAME[model]) == q.name)
    series: dict[tuple, list] = defaultdict(list)
    for row in sel.tuples():
        key = tuple(row[: len(group_cols)])
        series[key].append(_point(q.kind, row[len(group_cols)], row[len(group_cols) + 1 :]))
    n_series = max(1, len(series))
    if len(starts) * n_series > MAX_POINTS:
        raise SeriesError("from", f"{len(starts) * n_series} points; at most {MAX_POINTS}")
    out = []
    for key, points in sorted(series.items(), key=lambda kv: [str(k) for k in kv[0]]):
        out.append(
            {
                "key": dict(zip(q.group, key, strict=True)),
                "points": points,
                "total": _combine(q.kind, points),
            }
        )
    all_points = [p for s in out for p in s["points"]]
    return {
        "kind": q.kind,
        "step": q.step,
        "from": starts[0] if starts else q.start,
        "to": q.end,
        "timezone": buckets.name,
        "group": list(q.group),
        "series": out,
        "total": _combine(q.kind, all_points),
    }


def _column(model, group: str):
    if group in ("line", "zone"):
        return getattr(model, _NAME[model])
    return model.class_ if group == "class" else getattr(model, group)


def _point(kind: str, bucket: float, vals: tuple) -> dict:
    names = _VALUES[kind]
    p: dict = {"t": bucket}
    if kind == "speeds":
        names, hist = names[:_SPEED_BASE], speedhist.from_sums(vals[_SPEED_BASE:])
        vals = vals[:_SPEED_BASE]
    for name, v in zip(names, vals, strict=True):
        if name == "kmh_sum":
            continue
        if name in ("dwell_s_sum", "kmh_max"):
            p[_OUT.get(name, name)] = None if v is None else round(float(v), 3)
        else:
            p[_OUT.get(name, name)] = int(v or 0)
    if kind == "speeds":
        n, kmh_sum = int(vals[0] or 0), float(vals[1] or 0.0)
        p["mean_kmh"] = round(kmh_sum / n, 2) if n else None
        p.update(speedhist.percentiles(hist, p["max_kmh"]))
        p["_kmh_sum"] = kmh_sum
        p["_hist"] = hist
    if kind == "zones":
        p["dwell_mean_s"] = round(p["dwell_s_sum"] / p["dwell_n"], 2) if p["dwell_n"] else None
    return p


def _combine(kind: str, points: Iterable[dict]) -> dict:
    points = list(points)
    if kind == "lines":
        return {"in": sum(p["in"] for p in points), "out": sum(p["out"] for p in points)}
    if kind == "zones":
        dwell_s = sum(p["dwell_s_sum"] for p in points)
        dwell_n = sum(p["dwell_n"] for p in points)
        return {
            "entries": sum(p["entries"] for p in points),
            "exits": sum(p["exits"] for p in points),
            "peak_occupancy": max((p["peak_occupancy"] for p in points), default=0),
            "dwell_s_sum": round(dwell_s, 3),
            "dwell_n": dwell_n,
            "dwell_mean_s": round(dwell_s / dwell_n, 2) if dwell_n else None,
        }
    n = sum(p["n"] for p in points)
    kmh = sum(p["_kmh_sum"] for p in points)
    maxes = [p["max_kmh"] for p in points if p["max_kmh"] is not None]
    top = max(maxes) if maxes else None
    hist = speedhist.merge(p["_hist"] for p in points)
    return {
        "n": n,
        "mean_kmh": round(kmh / n, 2) if n else None,
        "max_kmh": top,
        "insufficient": sum(p["insufficient"] for p in points),
        **speedhist.percentiles(hist, top),
    }


def public(result: dict) -> dict:
    """The result without internal fields (what the API and CLI return)."""
    for s in result["series"]:
        for p in s["points"]:
            p.pop("_kmh_sum", None)
            p.pop("_hist", None)
    return result


def to_csv(result: dict) -> str:
    """One row per series and bucket: the group keys, the bucket (ISO UTC and epoch),
    then the values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    values = [k for k in (result["series"][0]["points"][0] if result["series"] else {}) if k != "t"]
    values = [v for v in values if not v.startswith("_")]
    w.writerow([*result["group"], "bucket_utc", "bucket_epoch", *values])
    for s in result["series"]:
        for p in s["points"]:
            iso = datetime.fromtimestamp(p["t"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            w.writerow(
                [
                    *(s["key"][g] for g in result["group"]),
                    iso,
                    p["t"],
                    *("" if p[v] is None else p[v] for v in values),
                ]
            )
    return buf.getvalue()
