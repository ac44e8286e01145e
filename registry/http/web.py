"""The registry's web app (Flask): `create_app` puts its parts together.

Routes, by module:
    GET /, /api/totals, /api/devices, /api/dead-letters, /api/events, /api/drift,
    /healthz               the dashboard and the fleet's read API (`.fleet_routes`,
                           queries in `.queries`)
    GET /map, /devices, /devices/<id>, /rollouts, /events, /relays   pages (`.webui`)
    /api/models/...        the model registry (`.api`), and one blueprint per
                           resource (devices, health, live, groups, series, webhooks,
                           drift, shadow, rollouts, relays, camera set-up, enrollment)
    GET /api/openapi.json  the OpenAPI document of all of the above

Web pages outside the dashboard (login, logout, the models page with its upload
form) are the `flowfleet.registry.http.webauth` blueprint. Access control (tokens,
device tokens, web sessions with CSRF, roles, anonymous dashboard reads from
localhost) is `flowfleet.registry.http.access.install_auth`. API errors are JSON
``{"error": {"code", "message", "field"}}`` with a matching HTTP status; unknown
query parameters are refused (400) so a typo never silently turns a
filtered query into an unfiltered one.

The query functions (`totals`, `devices`, `events`, ...) and `format_ts` are
re-exported here for the callers that imported them from this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import peewee as pw
from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from flowfleet.contract import Topics

from ..catalog.modelreg import ModelRegistry, RegistryError
from ..fleet import series
from ..fleet.commands import CommandPublisher
from ..fleet.devices import DEFAULT_STALE_AFTER_S
from ..fleet.webhooks import WebhookJob
from ..metrics import install_metrics
from ..store.db import require_bound
from .access import install_auth
from .api import bp as api_bp
from .api import error_response as registry_error_response
from .camsetup_api import bp as camsetup_bp
from .devices_api import bp as devices_bp
from .drift_api import bp as drift_bp
from .enrollment_api import bp as enrollment_bp
from .fleet_routes import add_fleet_routes
from .groups_api import bp as groups_bp
from .health_api import bp as health_bp
from .jsonprovider import StrictJSONProvider
from .live_api import LiveStreams
from .live_api import bp as live_bp
from .queries import (  # noqa: F401  (re-exported: see the docstring)
    camera_models,
    dead_letters,
    device_rows,
    devices,
    drift_summaries,
    events,
    format_ts,
    totals,
)
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


def _error_response(status: int, code: str, message: str, field: str | None = None):
    body = {"error": {"code": code, "message": message, "field": field}}
    return jsonify(body), status


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

    add_fleet_routes(app, db, stale_after_s, ingest_stats)

    return app
