"""REST API for device records (a Flask blueprint under ``/api/devices``).

``GET /api/devices`` (the list, also the dashboard's) is in `flowfleet.registry.http.fleet_routes`;
a device's deployments are in `flowfleet.registry.http.api`. Here: one device's record,
registering a device before it connects, editing its record and accepting a device
first seen through telemetry (`flowfleet.registry.fleet.devices`). Reading needs a
viewer token, changing an operator token; every change is audited.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..errors import RegistryError, check_name
from ..fleet import devices
from ..store.db import now
from .api import _actor, _json_body, query_args, requires
from .enrollment_api import sync_broker

bp = Blueprint("devices_api", __name__, url_prefix="/api/devices")

# JSON types of the editable fields; null clears one (checked in fleet.devices).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": (str, type(None)),
    "description": (str, type(None)),
    "tags": (list, type(None)),
    "site": (str, type(None)),
    "location": (dict, type(None)),
    "reason": str,
}


def _body(extra: dict[str, type | tuple[type, ...]] | None = None) -> tuple[dict, str]:
    """The request's record fields (JSON type checks naming the field) and reason."""
    allowed = {**_FIELDS, **(extra or {})}
    body = _json_body({k: object for k in allowed})  # unknown fields, not JSON: 400/415
    for key, value in body.items():
        types = allowed[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise RegistryError(400, "invalid_field", f"{key!r} has the wrong type", key)
    reason = body.pop("reason", "")
    return body, reason


def _record(dev) -> dict:
    stale_after_s = current_app.extensions.get(
        "flowfleet_stale_after_s", devices.DEFAULT_STALE_AFTER_S
    )
    return devices.device_dict(dev, now(), stale_after_s)


@bp.post("")
@requires("operator")
def create_device():
    """Register a device before it first connects (201; 409 if it is known)."""
    query_args(())
    body, reason = _body({"device": str})
    if "device" not in body:
        raise RegistryError(400, "missing_field", "'device' is required", "device")
    device = check_name(body.pop("device"), "device", "device id")
    dev = devices.create_device(
        current_app.extensions["flowfleet_db"], device, body, actor=_actor(), reason=reason
    )
    sync_broker()  # a new device gets its ACL entry
    resp = jsonify(_record(dev))
    resp.status_code = 201
    return resp


@bp.get("/<device>")
@requires("viewer")
def get_device(device: str):
    query_args(())
    return jsonify(_record(devices.get_device(device)))


@bp.patch("/<device>")
@requires("operator")
def update_device(device: str):
    """Edit name, description, tags, site, location (null clears one)."""
    query_args(())
    body, reason = _body()
    dev = devices.update_device(
        current_app.extensions["flowfleet_db"], device, body, actor=_actor(), reason=reason
    )
    return jsonify(_record(dev))


@bp.post("/<device>/accept")
@requires("operator")
def accept_device(device: str):
    """Accept a device first seen through telemetry: it is listed as registered."""
    args = query_args(("reason",))
    dev = devices.accept_device(
        current_app.extensions["flowfleet_db"],
        device,
        actor=_actor(),
        reason=args.get("reason", ""),
    )
    sync_broker()  # with broker_acl = "accepted", this grants it
    return jsonify(_record(dev))
