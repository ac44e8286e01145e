"""The registry's web UI and JSON API (Flask).

Routes:
    GET /                  dashboard (HTML) that refreshes itself from the JSON API
    GET /map, /devices, /devices/<id>, /rollouts, /events   pages (`.webui`)
    GET /api/totals        line and zone totals per device/camera/line|zone/class
    GET /api/devices       devices with state, bins, sequence gaps and reported models
    GET /api/dead-letters  rejected messages, newest first
    GET /api/events        device events, newest first (paginated)
    GET /api/drift         drift summaries, newest window first (paginated)
    GET /healthz           liveness: database reachable, ingest counters, pending commands
    /api/models/...        the model registry (see `flowfleet.registry.http.api`)
    GET /api/openapi.json  the OpenAPI document of all of the above

Web pages outside the dashboard (login, logout, the models page with its upload
form) are the `flowfleet.registry.http.webauth` blueprint. Access control (tokens,
device tokens, web sessions with CSRF, roles, anonymous dashboard reads from
localhost) is `flowfleet.registry.http.access.install_auth`. API errors are JSON
``{"error": {"code", "message", "field"}}`` with a matching HTTP status; unknown
query parameters are refused (400) so a typo never silently turns a
filtered query into an unfiltered one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import peewee as pw
from flask import Flask, g, jsonify, render_template, request, url_for
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from flowfleet.contract import CameraModel, Topics, is_valid_name
from flowfleet.contract import DriftSummary as DriftPayload

from ..catalog.modelreg import ModelRegistry, RegistryError
from ..fleet import counters, series
from ..fleet.commands import CommandPublisher, pending_summary
from ..fleet.devices import DEFAULT_STALE_AFTER_S, REGISTRATIONS, device_dict
from ..fleet.webhooks import WebhookJob
from ..metrics import install_metrics
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
    require_bound,
)
from .access import install_auth
from .api import bp as api_bp
from .api import error_response as registry_error_response
from .api import int_arg, query_args
from .camsetup_api import bp as camsetup_bp
from .devices_api import bp as devices_bp
from .drift_api import bp as drift_bp
from .enrollment_api import bp as enrollment_bp
from .groups_api import bp as groups_bp
from .health_api import bp as health_bp
from .live_api import LiveStreams
from .live_api import bp as live_bp
from .relays_api import bp as relays_bp
from .rollouts_api import bp as rollouts_bp
from .series_api import bp as series_bp
from .shadow_api import bp as shadow_bp
from .webauth import bp as webauth_bp
from .webauth import error_page
from .webhooks_api import bp as webhooks_bp
from .webui import bp as webui_bp
from .webui import render_error

log = logging.getLogger(__name__)

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
# Latest events the dashboard shows.
DASHBOARD_EVENTS = 10


def _error_response(status: int, code: str, message: str, field: str | None = None):
    body = {"error": {"code": code, "message": message, "field": field}}
    return jsonify(body), status


# -- queries (plain functions so the CLI and tests can use them without HTTP) ------


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


# -- JSON ------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class StrictJSONProvider(DefaultJSONProvider):
    """Flask JSON that is always valid JSON: never a bare NaN or Infinity.

    The contract refuses non-finite numbers, but a row stored before it did (or a
    bug) must not turn a whole page into something no JSON parser reads: such a
    float is written as null (and logged), and everything else is unchanged.
    """

    sort_keys = False  # keep documented key order in responses

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs["allow_nan"] = False
        try:
            return super().dumps(obj, **kwargs)
        except ValueError as exc:
            if "Out of range float" not in str(exc):
                raise
            log.warning("non-finite number in a JSON response, written as null")
            return super().dumps(_finite(obj), **kwargs)


# -- request parsing -----------------------------------------------------------


def _device_arg(args: dict[str, str], *, must_exist: bool) -> str | None:
    device = args.get("device")
    if device is None:
        return None
    if not is_valid_name(device):
        raise RegistryError(
            400, "invalid_parameter", f"{device!r} is not a valid device id", "device"
        )
    if must_exist and not Device.select().where(Device.id == device).exists():
        raise RegistryError(404, "unknown_device", f"no device {device!r} is known", "device")
    return device


def _limit_arg(args: dict[str, str]) -> int:
    return int_arg(args, "limit", DEFAULT_DEAD_LETTER_LIMIT, 1, MAX_DEAD_LETTER_LIMIT)


def _page_args(args: dict[str, str]) -> tuple[int, int]:
    return (
        int_arg(args, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT),
        int_arg(args, "offset", 0, 0, MAX_OFFSET),
    )


def _name_arg(args: dict[str, str], name: str) -> str | None:
    value = args.get(name)
    if value is not None and not is_valid_name(value):
        raise RegistryError(400, "invalid_parameter", f"{value!r} is not a valid {name} name", name)
    return value


# -- the app -------------------------------------------------------------------


def create_app(
    db: pw.Database,
    *,
    ingest_stats: Callable[[], dict[str, Any]] | None = None,
    registry: ModelRegistry | None = None,
    anonymous_read: str = "local",
    commands: CommandPublisher | None = None,
    topics: Topics | None = None,
    site_timezone: str = "UTC",
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    webhooks: WebhookJob | None = None,
    map_tiles: str | None = None,
    map_attribution: str = "",
    enrollment: Any = None,
    live_streams: int = 4,
    live_stream_s: float = 60.0,
) -> Flask:
    """The registry web app on ``db`` (opened with `open_database`).

    ``ingest_stats``, when given, is called by /healthz to report the ingest worker
    (for example ``IngestWorker.stats``). ``registry`` serves the model registry
    API (without one those endpoints answer 503). ``anonymous_read`` is the
    dashboard's policy for requests without a token: ``"local"`` (loopback only),
    ``"none"`` or ``"all"``. ``commands`` is the registry's `CommandPublisher`:
    deployments queue the devices' retained desired states (under ``topics``,
    default root ``flowfleet/v1``) in the commands outbox and wake it to publish
    them after commit; without one, deploying answers 503. ``site_timezone`` is the
    site's, where the day buckets of /api/series start. A device silent for more
    than ``stale_after_s`` is shown with presence "stale". ``webhooks`` is the
    registry's `WebhookJob`, woken to send a ping or a redelivery at once (without
    one they wait for a registry process that runs it). ``map_tiles`` is the map's
    tile URL template (``https://host/{z}/{x}/{y}.png``; None: no tiles, markers on
    a plain background) and ``map_attribution`` the text the tiles' licence asks for.
    ``live_streams`` Server-Sent Events streams (``/api/live``) may be open at once,
    each for at most ``live_stream_s`` seconds (0 streams: pages poll).
    """
    require_bound(db)
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.add_template_filter(format_ts, "ts")
    app.add_template_filter(camera_models, "camera_models")
    if registry is not None:
        app.extensions["flowfleet_model_registry"] = registry
        # Multipart overhead on top of the model itself; the exact limit is checked
        # on the file (RegistryError 413).
        app.config["MAX_CONTENT_LENGTH"] = registry.max_upload_bytes + 1024 * 1024
    if commands is not None:
        app.extensions["flowfleet_commands"] = commands
    app.extensions["flowfleet_topics"] = topics or Topics()
    app.extensions["flowfleet_db"] = db
    app.extensions["flowfleet_buckets"] = series.Buckets(site_timezone)
    app.extensions["flowfleet_stale_after_s"] = stale_after_s
    if webhooks is not None:
        app.extensions["flowfleet_webhooks"] = webhooks
    if enrollment is not None:  # EnrollmentSettings (registry.fleet.enrollment)
        app.extensions["flowfleet_enrollment"] = enrollment
    app.register_blueprint(api_bp)
    app.register_blueprint(series_bp)
    app.register_blueprint(webauth_bp)
    app.register_blueprint(groups_bp)
    app.register_blueprint(devices_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(live_bp)
    app.extensions["flowfleet_live"] = LiveStreams(live_streams, live_stream_s)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(drift_bp)
    app.register_blueprint(shadow_bp)
    app.register_blueprint(rollouts_bp)
    app.register_blueprint(relays_bp)
    app.register_blueprint(webui_bp)
    app.register_blueprint(camsetup_bp)
    app.extensions["flowfleet_map"] = {"tiles": map_tiles, "attribution": map_attribution}
    app.register_blueprint(enrollment_bp)
    install_metrics(app)  # first before_request hook: times everything after it

    @app.before_request
    def _connect() -> None:
        # Werkzeug serves each request on its own thread; peewee keeps one connection
        # per thread, so open it here and close it in teardown or it leaks.
        g.db_opened = db.connect(reuse_if_open=True)

    # Registered after _connect: authorising a token reads the database.
    install_auth(app, anonymous_read)

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        if g.pop("db_opened", False) and not db.is_closed():
            db.close()

    def _is_api() -> bool:
        return request.path.startswith("/api/") or request.path == "/api"

    @app.errorhandler(RegistryError)
    def _registry_error(exc: RegistryError):
        if not _is_api() and exc.status in (401, 403):
            return error_page(exc.status, exc.message)
        return registry_error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if not _is_api():
            return render_error(exc.code or 500, exc.description or exc.name)
        if exc.code == 413:
            return _error_response(
                413, "too_large", "the request is larger than the upload limit", "file"
            )
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("error serving %s", request.path)
        if _is_api():
            return _error_response(500, "internal_error", f"internal error: {exc!r}")
        return render_error(500, "Something went wrong on the registry; its log has the details.")

    @app.get("/api/totals")
    def api_totals():
        args = query_args(("device",))
        return jsonify(totals(_device_arg(args, must_exist=True)))

    @app.get("/api/devices")
    def api_devices():
        args = query_args(("registration",))
        registration = args.get("registration")
        if registration is not None and registration not in REGISTRATIONS:
            raise RegistryError(
                400,
                "invalid_parameter",
                f"registration must be one of {', '.join(REGISTRATIONS)}, got {registration!r}",
                "registration",
            )
        return jsonify({"devices": devices(stale_after_s, registration)})

    @app.get("/api/dead-letters")
    def api_dead_letters():
        args = query_args(("limit", "device"))
        limit = _limit_arg(args)
        device = _device_arg(args, must_exist=False)
        return jsonify({"dead_letters": dead_letters(limit, device)})

    @app.get("/api/events")
    def api_events():
        args = query_args(("device", "limit", "offset"))
        limit, offset = _page_args(args)
        device = _device_arg(args, must_exist=True)
        items, total = events(limit, offset, device)
        return jsonify(_paged("events", items, total, limit, offset))

    @app.get("/api/drift")
    def api_drift():
        args = query_args(("device", "camera", "limit", "offset"))
        limit, offset = _page_args(args)
        device = _device_arg(args, must_exist=True)
        camera = _name_arg(args, "camera")
        items, total = drift_summaries(limit, offset, device, camera)
        return jsonify(_paged("drift", items, total, limit, offset))

    @app.get("/healthz")
    def healthz():
        body: dict[str, Any] = {"status": "ok", "database": "ok"}
        status = 200
        try:
            db.execute_sql("SELECT 1").fetchone()
            # The commands outbox: desired states not yet acknowledged by the broker.
            body["commands"] = pending_summary()
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
        # The page renders the fleet and the latest events at once (readable without
        # its script); everything else, and every refresh, comes from the API.
        return render_template(
            "index.html",
            devices=device_rows(stale_after_s),
            events=events(DASHBOARD_EVENTS)[0],
            urls={
                "devices": url_for("api_devices"),
                "events": url_for("api_events", limit=DASHBOARD_EVENTS),
                "series": url_for("series.api_series"),
            },
        )

    return app
