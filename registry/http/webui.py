"""The registry's web pages beyond the dashboard: map, devices, a device, rollouts and
events, and the shell every page shares (a Flask blueprint).

Routes:
    GET /map               every device at its location, coloured by a chosen property
    GET /devices           the fleet as a table
    GET /devices/<device>  one device: cameras, counts over time, speed, health, model
                           history, drift and shadow comparison
    GET /rollouts          staged rollouts: waves, per-device states; pause/resume/abort
    GET /events            device events, the audit trail and dead letters, filterable
    GET /relays            the cloud relays: cost/quality comparison, outboxes, parked
                           messages (requeue for operators)

The pages are server-rendered shells; their data comes from the same REST API that
scripts use (``/api/...``), fetched by the page's script, so a page never shows
anything the API would not. Buttons that change something call that API with the
session's CSRF token in the ``X-CSRF-Token`` header; the API checks the role. Page
access follows `flowfleet.registry.http.access`: map, devices, device and events
are dashboard pages (anonymous reads where the registry allows them), rollouts need
a viewer, and so do relays.

`shell` (a context processor) gives every template the navigation, the signed-in
principal and its CSRF token; `render_error` renders the styled error pages.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, current_app, g, render_template, request
from markupsafe import Markup, escape

from flowfleet.contract import is_valid_name

from ..store.db import Device
from .access import CSRF_FIELD, requires

bp = Blueprint("ui", __name__)

NAV = (
    ("index", "Dashboard"),
    ("ui.map", "Map"),
    ("ui.devices", "Devices"),
    ("webauth.models", "Models"),
    ("ui.rollouts", "Rollouts"),
    ("ui.events", "Events"),
    ("ui.relays", "Relays"),
)
HEADINGS = {
    400: "Bad request",
    401: "Sign in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Too large",
    429: "Too many requests",
    500: "Internal error",
    503: "Unavailable",
}


@bp.app_context_processor
def shell() -> dict[str, Any]:
    """What the header of every page needs: navigation, who is signed in, CSRF."""
    session = g.get("web_session")
    return {
        "shell": {
            "nav": NAV,
            "principal": g.get("principal"),
            "csrf_token": session.csrf_token if session is not None else None,
            "csrf_field": CSRF_FIELD,
        }
    }


@bp.app_template_filter("ts_html")
def ts_html(ts: float | None) -> Markup:
    """A ``<time>`` the page's script shows in the viewer's timezone (UTC on hover);
    without the script it reads as UTC."""
    if ts is None:
        return Markup("-")
    try:
        utc = datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return escape(repr(ts))
    return Markup(
        f'<time data-ts="{float(ts)!r}" datetime="{utc.isoformat()}" '
        f'title="{utc:%Y-%m-%d %H:%M:%S} UTC">{utc:%Y-%m-%d %H:%M:%S}Z</time>'
    )


def render_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A styled HTML error page with the shell (for browsers; the API answers JSON)."""
    try:
        body = render_template(
            "error.html",
            status=status,
            heading=HEADINGS.get(status, "Error"),
            message=message,
        )
    except Exception:  # the error page itself must never fail: plain text then
        body = f"<!doctype html><title>{status}</title><p>{escape(message)}</p>"
    resp = Response(body, status=status, mimetype="text/html")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _map_config() -> dict[str, Any]:
    tiles = current_app.extensions.get("flowfleet_map") or {}
    return {"tiles": tiles.get("tiles"), "attribution": tiles.get("attribution", "")}


@bp.get("/map", endpoint="map")
def map_page():
    """The fleet map (Leaflet); works without tiles (plain background, scale bar)."""
    return render_template("map.html", map_config=_map_config())


@bp.get("/devices")
def devices():
    """The fleet as a table, refreshed from /api/devices."""
    return render_template("devices.html")


@bp.get("/devices/<device>")
def device(device: str):
    """One device's page; 404 (a page) for an unknown device."""
    if not is_valid_name(device) or Device.get_or_none(Device.id == device) is None:
        return render_error(404, f"No device {device!r} is known to this registry.")
    return render_template("device.html", device=device)


@bp.get("/rollouts")
@requires("viewer")
def rollouts():
    """Staged rollouts with their waves; operators get pause, resume and abort."""
    principal = g.get("principal")
    can_operate = principal is not None and principal.allows("operator")
    return render_template("rollouts.html", can_operate=can_operate)


@bp.get("/events")
def events():
    """Device events, the audit trail (operators) and dead letters, filterable."""
    principal = g.get("principal")
    can_audit = principal is not None and principal.allows("operator")
    return render_template(
        "events.html", can_audit=can_audit, device=request.args.get("device", "")
    )


@bp.get("/relays")
@requires("viewer")
def relays():
    """The cloud comparison over a chosen period, the outboxes and (operators) the
    parked messages with a requeue button."""
    principal = g.get("principal")
    can_operate = principal is not None and principal.allows("operator")
    return render_template("relays.html", can_operate=can_operate)
