"""The dashboard page and the fleet's read API, added to the app by `create_app`:

    GET /                  dashboard (HTML) that refreshes itself from the JSON API
    GET /api/totals        line and zone totals per device/camera/line|zone/class
    GET /api/devices       devices with state, bins, sequence gaps and reported models
    GET /api/dead-letters  rejected messages, newest first
    GET /api/events        device events, newest first (paginated)
    GET /api/drift         drift summaries, newest window first (paginated)
    GET /healthz           liveness: database reachable, ingest counters, pending commands

Registered on the app itself (not a blueprint) so their endpoint names (``index``,
``api_totals``, ...) stay those the access rules (`flowfleet.registry.http.access`)
and templates use. The queries are `flowfleet.registry.http.queries`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peewee as pw
from flask import Flask, jsonify, render_template, url_for

from flowfleet.contract import is_valid_name

from ..catalog.modelreg import RegistryError
from ..fleet.commands import pending_summary
from ..fleet.devices import REGISTRATIONS
from ..store.db import Device
from .api import int_arg, query_args
from .queries import (
    DEFAULT_DEAD_LETTER_LIMIT,
    DEFAULT_PAGE_LIMIT,
    MAX_DEAD_LETTER_LIMIT,
    MAX_OFFSET,
    MAX_PAGE_LIMIT,
    _paged,
    dead_letters,
    device_rows,
    devices,
    drift_summaries,
    events,
    totals,
)

# Latest events the dashboard shows.
DASHBOARD_EVENTS = 10


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


def add_fleet_routes(
    app: Flask,
    db: pw.Database,
    stale_after_s: float,
    ingest_stats: Callable[[], dict[str, Any]] | None,
) -> None:
    """Add the dashboard and the fleet's read API to ``app`` (see the module docstring)."""

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
