"""The fleet's tables as the dashboard and ``/api/...`` answer them: line and zone
totals, devices with their ingest bookkeeping, dead letters, events and drift summaries.

Plain functions over the open database connection, so the CLI and tests use them
without HTTP; the routes are in `flowfleet.registry.http.fleet_routes`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import peewee as pw

from flowfleet.contract import CameraModel
from flowfleet.contract import DriftSummary as DriftPayload

from ..fleet import counters
from ..fleet.devices import DEFAULT_STALE_AFTER_S, device_dict
from ..store.db import (
    STEPS,
    DeadLetter,
    Device,
    DriftSummary,
    Event,
    HealthBeat,
    LineRollup,
    ReportedState,
    ZoneRollup,
    database_proxy,
    now,
)

DEFAULT_DEAD_LETTER_LIMIT = 50
MAX_DEAD_LETTER_LIMIT = 1000
# The API shows the start of each rejected payload; the full (truncated) copy stays in
# the database.
DEAD_LETTER_PREVIEW_CHARS = 2048
# Events and drift summaries are paginated like the model API (limit, offset).
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
MAX_OFFSET = 2**31 - 1
# The fields of a drift summary as the API returns them (the contract's, in order).
DRIFT_FIELDS = tuple(
    f.alias or name
    for name, f in DriftPayload.model_fields.items()
    if name not in ("schema_", "kind")
)
# The fields of a reported camera entry as the API returns them (every one, null when
# the device left it out).
CAMERA_MODEL_FIELDS = tuple(f.alias or name for name, f in CameraModel.model_fields.items())


def _sum(field: pw.Field) -> pw.Function:
    """A SUM over device data that cannot overflow, whatever the devices sent.

    A row holds at most `contract.MAX_COUNT` (1e6) and a device at most one row per
    key per bin, but bins per device are bounded only by seq (2**53 - 1), so a sum
    can reach about 9e21, past SQLite's 64-bit integer SUM ("integer overflow", which
    would fail the whole query). SQLite's TOTAL() adds in floating point: it never
    overflows and is exact up to 2**53 (9e15, beyond any real device's total).
    PostgreSQL's SUM(bigint) is an exact numeric; callers convert with int().
    """
    if isinstance(database_proxy.obj, pw.SqliteDatabase):
        return pw.fn.TOTAL(field)
    return pw.fn.SUM(field)


def totals(device: str | None = None) -> dict[str, Any]:
    """Line and zone totals, optionally for one device; see /api/totals.

    Summed over the day rollups, which hold every count even after retention removed
    the raw bins (and are far fewer rows)."""
    lt = LineRollup
    lines = (
        lt.select(
            lt.device,
            lt.camera,
            lt.line,
            lt.class_,
            _sum(lt.count_in).alias("in"),
            _sum(lt.count_out).alias("out"),
        )
        .where(lt.step == STEPS["day"])
        .group_by(lt.device, lt.camera, lt.line, lt.class_)
        .order_by(lt.device, lt.camera, lt.line, lt.class_)
    )
    zt = ZoneRollup
    zones = (
        zt.select(
            zt.device,
            zt.camera,
            zt.zone,
            zt.class_,
            _sum(zt.entries).alias("entries"),
            _sum(zt.exits).alias("exits"),
            pw.fn.MAX(zt.peak_occupancy).alias("peak_occupancy"),
            _sum(zt.dwell_s_sum).alias("dwell_s_sum"),
            _sum(zt.dwell_n).alias("dwell_n"),
        )
        .where(zt.step == STEPS["day"])
        .group_by(zt.device, zt.camera, zt.zone, zt.class_)
        .order_by(zt.device, zt.camera, zt.zone, zt.class_)
    )
    if device is not None:
        lines = lines.where(lt.device == device)
        zones = zones.where(zt.device == device)
    return {
        "device": device,
        "lines": [
            {"device": d, "camera": c, "line": ln, "class": k, "in": int(i), "out": int(o)}
            for d, c, ln, k, i, o in lines.tuples()
        ],
        "zones": [
            {
                "device": d,
                "camera": c,
                "zone": z,
                "class": k,
                "entries": int(en),
                "exits": int(ex),
                "peak_occupancy": int(peak),
                "dwell_s_sum": float(dsum),
                "dwell_n": int(dn),
                "dwell_s_avg": float(dsum) / int(dn) if dn else None,
            }
            for d, c, z, k, en, ex, peak, dsum, dn in zones.tuples()
        ],
    }


def devices(
    stale_after_s: float = DEFAULT_STALE_AFTER_S, registration: str | None = None
) -> list[dict[str, Any]]:
    """Every known device (or those of one ``registration``) with its state, ingest
    bookkeeping and record (`flowfleet.registry.fleet.devices`); see /api/devices."""
    # Kept by ingest in the transaction that stores what they count
    # (`flowfleet.registry.fleet.counters`): reading them costs one row per device,
    # however long the fleet's history.
    kept = counters.read()
    reported = {row.device_id: row for row in ReportedState.select()}
    result = []
    at = now()
    query = Device.select().order_by(Device.id)
    if registration is not None:
        query = query.where(Device.accepted_at.is_null(registration == "unregistered"))
    for dev in query:
        c = kept.get(dev.id)
        n_bins, top = (c.bins, c.bin_seq_max) if c is not None else (0, None)
        top_beat = c.beat_seq_max if c is not None else None
        result.append(
            {
                **device_dict(dev, at, stale_after_s),
                "bins": n_bins,
                "highest_seq": top,
                "last_bin_at": c.last_bin_at if c is not None else None,
                # seq starts at 1 and (device, seq) is unique, so every missing number
                # below the highest is exactly highest - received (retention keeps
                # each device's newest bin, so the highest is still stored).
                "gaps": (top - n_bins) if top is not None else 0,
                "health_beats": c.beats if c is not None else 0,
                "last_health": _last_health(dev.id, top_beat) if top_beat else None,
                "dead_letters": c.dead_letters if c is not None else 0,
                "reported": _reported(reported.get(dev.id)),
            }
        )
    return result


def device_rows(stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[dict[str, Any]]:
    """Every device's record and reported state without the ingest bookkeeping of
    `devices` (bins, gaps, health, dead letters): what the dashboard page renders at
    once; the page's script fills those columns from /api/devices."""
    reported = {row.device_id: row for row in ReportedState.select()}
    at = now()
    return [
        {**device_dict(dev, at, stale_after_s), "reported": _reported(reported.get(dev.id))}
        for dev in Device.select().order_by(Device.id)
    ]


def _reported(row: ReportedState | None) -> dict[str, Any] | None:
    """The device's latest reported state (what each camera runs), None if none yet."""
    if row is None:
        return None
    body = json.loads(row.payload)
    return {
        "ts": row.ts,
        "desired_version": body.get("desired_version"),
        "cameras": [
            {name: cam.get(name) for name in CAMERA_MODEL_FIELDS} for cam in body.get("cameras", [])
        ],
        "received_at": row.received_at,
    }


def camera_models(reported: dict[str, Any] | None) -> str:
    """One line of what each camera runs, for the dashboard (the page's script agrees).

    ``door: yolov8n-int8 v2; back: model.tflite (update failed)``; a camera without a
    registry model shows its file. Plain text: the template escapes it.
    """
    if not reported or not reported["cameras"]:
        return "-"
    parts = []
    for cam in reported["cameras"]:
        if cam["model"] is not None:
            runs = cam["model"] + (f" v{cam['version']}" if cam["version"] is not None else "")
        else:
            runs = cam["file"] or "config model"
        text = f"{cam['camera']}: {runs}"
        if cam["update"] is not None and cam["update"] != "activated":
            text += f" (update {cam['update']})"
        parts.append(text)
    return "; ".join(parts)


def _last_health(device: str, seq: int) -> dict[str, Any] | None:
    beat = HealthBeat.get_or_none(HealthBeat.device == device, HealthBeat.seq == seq)
    if beat is None:
        return None
    body = json.loads(beat.payload)
    for key in ("schema", "device", "kind"):
        body.pop(key, None)
    return body


def dead_letters(limit: int = DEFAULT_DEAD_LETTER_LIMIT, device: str | None = None) -> list:
    """The newest dead letters first; see /api/dead-letters."""
    query = DeadLetter.select().order_by(DeadLetter.id.desc()).limit(limit)
    if device is not None:
        query = query.where(DeadLetter.device == device)
    return [
        {
            "id": dl.id,
            "received_at": dl.received_at,
            "topic": dl.topic,
            "device": dl.device,
            "reason": dl.reason,
            "payload_size": dl.payload_size,
            "payload": bytes(dl.payload)[:DEAD_LETTER_PREVIEW_CHARS].decode(
                "utf-8", errors="replace"
            ),
        }
        for dl in query
    ]


def _body(payload: str) -> dict[str, Any]:
    """A stored payload without the envelope the row already says (schema, kind)."""
    body = json.loads(payload)
    body.pop("schema", None)
    body.pop("kind", None)
    return body


def events(
    limit: int = DEFAULT_PAGE_LIMIT, offset: int = 0, device: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Device events, newest first (by the device's ``ts``), and how many match.

    See /api/events. Ties (same ``ts``) are broken newest-stored first, so pages
    never overlap.
    """
    query = Event.select()
    if device is not None:
        query = query.where(Event.device == device)
    total = query.count()
    rows = query.order_by(Event.ts.desc(), Event.id.desc()).limit(limit).offset(offset)
    result = []
    for ev in rows:
        body = _body(ev.payload)
        result.append(
            {
                "device": ev.device_id,
                "seq": ev.seq,
                "ts": ev.ts,
                "type": ev.type,
                "severity": ev.severity,
                "camera": ev.camera,
                "message": ev.message,
                "data": body.get("data", {}),
                "received_at": ev.received_at,
            }
        )
    return result, total


def drift_summaries(
    limit: int = DEFAULT_PAGE_LIMIT,
    offset: int = 0,
    device: str | None = None,
    camera: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Drift summaries, newest window first, and how many match; see /api/drift."""
    query = DriftSummary.select()
    if device is not None:
        query = query.where(DriftSummary.device == device)
    if camera is not None:
        query = query.where(DriftSummary.camera == camera)
    total = query.count()
    rows = (
        query.order_by(DriftSummary.start.desc(), DriftSummary.id.desc())
        .limit(limit)
        .offset(offset)
    )
    # Every field of the contract, optional ones as null (the wire leaves them out).
    result = []
    for row in rows:
        body = _body(row.payload)
        item = {name: body.get(name) for name in DRIFT_FIELDS}
        item["received_at"] = row.received_at
        result.append(item)
    return result, total


def _paged(key: str, items: list, total: int, limit: int, offset: int) -> dict[str, Any]:
    nxt = offset + len(items)
    return {
        key: items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": nxt if nxt < total else None,
    }


def format_ts(ts: float | None) -> str:
    """UTC time as the dashboard shows it (the page's script uses the same format)."""
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # out of datetime's range, NaN
        return repr(ts)
