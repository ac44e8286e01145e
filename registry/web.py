"""The registry's web UI and JSON API (Flask).

Routes:
    GET /                  dashboard (HTML) that refreshes itself from the JSON API
    GET /api/totals        line and zone totals per device/camera/line|zone/class
    GET /api/devices       devices with state, bins received and sequence gaps
    GET /api/dead-letters  rejected messages, newest first
    GET /healthz           liveness: database reachable, ingest counters

API errors are JSON ``{"error": {"code", "message", "field"}}`` with a matching HTTP
status; unknown query parameters are refused (400) so a typo never silently turns a
filtered query into an unfiltered one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import peewee as pw
from flask import Flask, g, jsonify, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from flowfleet.contract import is_valid_name

from .db import CountBin, DeadLetter, Device, HealthBeat, LineTotal, ZoneTotal, require_bound

log = logging.getLogger(__name__)

DEFAULT_DEAD_LETTER_LIMIT = 50
MAX_DEAD_LETTER_LIMIT = 1000
# The API shows the start of each rejected payload; the full (truncated) copy stays in
# the database.
DEAD_LETTER_PREVIEW_CHARS = 2048


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def _error_response(status: int, code: str, message: str, field: str | None = None):
    body = {"error": {"code": code, "message": message, "field": field}}
    return jsonify(body), status


# -- queries (plain functions so the CLI and tests can use them without HTTP) ------


def totals(device: str | None = None) -> dict[str, Any]:
    """Line and zone totals, optionally for one device; see /api/totals."""
    lt = LineTotal
    lines = (
        lt.select(
            lt.device,
            lt.camera,
            lt.line,
            lt.class_,
            pw.fn.SUM(lt.count_in).alias("in"),
            pw.fn.SUM(lt.count_out).alias("out"),
        )
        .group_by(lt.device, lt.camera, lt.line, lt.class_)
        .order_by(lt.device, lt.camera, lt.line, lt.class_)
    )
    zt = ZoneTotal
    zones = (
        zt.select(
            zt.device,
            zt.camera,
            zt.zone,
            zt.class_,
            pw.fn.SUM(zt.entries).alias("entries"),
            pw.fn.SUM(zt.exits).alias("exits"),
            pw.fn.MAX(zt.peak_occupancy).alias("peak_occupancy"),
            pw.fn.SUM(zt.dwell_s_sum).alias("dwell_s_sum"),
            pw.fn.SUM(zt.dwell_n).alias("dwell_n"),
        )
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
                "dwell_s_avg": float(dsum) / dn if dn else None,
            }
            for d, c, z, k, en, ex, peak, dsum, dn in zones.tuples()
        ],
    }


def devices() -> list[dict[str, Any]]:
    """Every known device with its state and ingest bookkeeping; see /api/devices."""
    bins = {
        d: (n, top)
        for d, n, top in CountBin.select(
            CountBin.device, pw.fn.COUNT(CountBin.id), pw.fn.MAX(CountBin.seq)
        )
        .group_by(CountBin.device)
        .tuples()
    }
    beats = {
        d: (n, top)
        for d, n, top in HealthBeat.select(
            HealthBeat.device, pw.fn.COUNT(HealthBeat.id), pw.fn.MAX(HealthBeat.seq)
        )
        .group_by(HealthBeat.device)
        .tuples()
    }
    dead = dict(
        DeadLetter.select(DeadLetter.device, pw.fn.COUNT(DeadLetter.id))
        .where(DeadLetter.device.is_null(False))
        .group_by(DeadLetter.device)
        .tuples()
    )
    result = []
    for dev in Device.select().order_by(Device.id):
        n_bins, top = bins.get(dev.id, (0, None))
        n_beats, top_beat = beats.get(dev.id, (0, None))
        result.append(
            {
                "device": dev.id,
                "state": dev.state,
                "state_since": dev.state_since,
                "first_seen": dev.first_seen,
                "last_seen": dev.last_seen,
                "agent_version": dev.agent_version,
                "bins": n_bins,
                "highest_seq": top,
                # seq starts at 1 and (device, seq) is unique, so every missing number
                # below the highest is exactly highest - received.
                "gaps": (top - n_bins) if top is not None else 0,
                "health_beats": n_beats,
                "last_health": _last_health(dev.id, top_beat) if top_beat else None,
                "dead_letters": dead.get(dev.id, 0),
            }
        )
    return result


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


def format_ts(ts: float | None) -> str:
    """UTC time as the dashboard shows it (the page's script uses the same format)."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# -- request parsing -----------------------------------------------------------


def _args(allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, refusing unknown or repeated ones."""
    out = {}
    for name in request.args:
        if name not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise ApiError(
                400,
                "unknown_parameter",
                f"unknown query parameter {name!r} (allowed: {hint})",
                name,
            )
        values = request.args.getlist(name)
        if len(values) > 1:
            raise ApiError(400, "invalid_parameter", f"{name!r} given {len(values)} times", name)
        out[name] = values[0]
    return out


def _device_arg(args: dict[str, str], *, must_exist: bool) -> str | None:
    device = args.get("device")
    if device is None:
        return None
    if not is_valid_name(device):
        raise ApiError(400, "invalid_parameter", f"{device!r} is not a valid device id", "device")
    if must_exist and not Device.select().where(Device.id == device).exists():
        raise ApiError(404, "unknown_device", f"no device {device!r} is known", "device")
    return device


def _limit_arg(args: dict[str, str]) -> int:
    raw = args.get("limit")
    if raw is None:
        return DEFAULT_DEAD_LETTER_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_DEAD_LETTER_LIMIT:
        raise ApiError(
            400,
            "invalid_parameter",
            f"limit must be an integer from 1 to {MAX_DEAD_LETTER_LIMIT}, got {raw!r}",
            "limit",
        )
    return limit


# -- the app -------------------------------------------------------------------


def create_app(
    db: pw.Database, *, ingest_stats: Callable[[], dict[str, Any]] | None = None
) -> Flask:
    """The registry web app on ``db`` (opened with `open_database`).

    ``ingest_stats``, when given, is called by /healthz to report the ingest worker
    (for example ``IngestWorker.stats``).
    """
    require_bound(db)
    app = Flask(__name__)
    app.json.sort_keys = False  # keep documented key order in responses
    app.add_template_filter(format_ts, "ts")

    @app.before_request
    def _connect() -> None:
        # Werkzeug serves each request on its own thread; peewee keeps one connection
        # per thread, so open it here and close it in teardown or it leaks.
        g.db_opened = db.connect(reuse_if_open=True)

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        if g.pop("db_opened", False) and not db.is_closed():
            db.close()

    def _is_api() -> bool:
        return request.path.startswith("/api/") or request.path == "/api"

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return _error_response(exc.status, exc.code, exc.message, exc.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if not _is_api():
            return exc
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("error serving %s", request.path)
        if _is_api():
            return _error_response(500, "internal_error", f"internal error: {exc!r}")
        return "internal error, see the registry log", 500

    @app.get("/api/totals")
    def api_totals():
        args = _args(("device",))
        return jsonify(totals(_device_arg(args, must_exist=True)))

    @app.get("/api/devices")
    def api_devices():
        _args(())
        return jsonify({"devices": devices()})

    @app.get("/api/dead-letters")
    def api_dead_letters():
        args = _args(("limit", "device"))
        limit = _limit_arg(args)
        device = _device_arg(args, must_exist=False)
        return jsonify({"dead_letters": dead_letters(limit, device)})

    @app.get("/healthz")
    def healthz():
        body: dict[str, Any] = {"status": "ok", "database": "ok"}
        status = 200
        try:
            db.execute_sql("SELECT 1").fetchone()
        except Exception as exc:
            body.update(status="error", database=f"error: {exc!r}")
            status = 503
        if ingest_stats is not None:
            stats = ingest_stats()
            body["ingest"] = stats
            if status == 200 and not stats.get("connected", True):
                body["status"] = "degraded"  # serving, but not receiving from the broker
        return jsonify(body), status

    @app.get("/")
    def index():
        return render_template(
            "index.html",
            totals=totals(),
            devices=devices(),
            dead_letters=dead_letters(10),
            urls={
                "totals": url_for("api_totals"),
                "devices": url_for("api_devices"),
                "dead_letters": url_for("api_dead_letters", limit=10),
            },
        )

    return app
