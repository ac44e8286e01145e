"""REST API for shadow comparisons (a Flask blueprint under ``/api``).

``GET /api/shadow`` lists the windows devices sent (newest first, paginated) with the
current requests; ``GET /api/shadow/agreement`` pools one camera's windows since a
time (the count gate's figure); ``POST`` / ``DELETE
/api/devices/<device>/cameras/<camera>/shadow`` start and stop a comparison through
a new desired state (`flowfleet.registry.fleet.shadow`). Reading needs a viewer
token, changing an operator token; changes are audited.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify

from ..errors import RegistryError, check_name
from ..fleet import shadow
from .api import (
    _actor,
    _json_body,
    _page,
    _paged,
    _registry,
    command_outcomes,
    deployment_commands,
    query_args,
    requires,
    version_ref,
)

bp = Blueprint("shadow_api", __name__, url_prefix="/api")


def _name_arg(args: dict[str, str], name: str, what: str) -> str | None:
    value = args.get(name)
    return None if value is None else check_name(value, name, what)


@bp.get("/shadow")
@requires("viewer")
def list_windows():
    """Shadow-comparison windows, newest first, and the current requests."""
    args = query_args(("device", "camera", "limit", "offset"))
    limit, offset = _page(args)
    device = _name_arg(args, "device", "device id")
    camera = _name_arg(args, "camera", "camera name")
    items, total = shadow.shadow_windows(limit, offset, device, camera)
    body = _paged("windows", items, total, limit, offset)
    body["requests"] = [
        r for r in shadow.shadow_requests(device) if camera is None or r["camera"] == camera
    ]
    return jsonify(body)


@bp.get("/shadow/agreement")
@requires("viewer")
def agreement():
    """One camera's windows since ``since`` (epoch seconds), pooled."""
    args = query_args(("device", "camera", "since"))
    for name in ("device", "camera"):
        if name not in args:
            raise RegistryError(400, "missing_parameter", f"{name!r} is required", name)
    device = check_name(args["device"], "device", "device id")
    camera = check_name(args["camera"], "camera", "camera name")
    try:
        since = float(args.get("since", "0"))
    except ValueError:
        since = float("nan")
    if not 0 <= since <= 4_102_444_800:
        raise RegistryError(
            400, "invalid_parameter", "since must be epoch seconds from 0 to 4102444800", "since"
        )
    return jsonify(shadow.shadow_agreement(device, camera, since))


def _shadow_body() -> tuple[dict, str | int]:
    body = _json_body(
        {"model": str, "version": int, "alias": str, "share": (int, float), "reason": str},
        required=("model",),
    )
    ref = version_ref(body)
    check_name(body["model"], "model", "model name")
    return body, ref


def _answer(desired, row: dict, publisher, status: int):
    (command,) = command_outcomes(publisher, [row["command_id"]])
    resp = jsonify(
        {
            "shadow": row,
            "desired": json.loads(desired.to_json()),
            "topic": current_app.extensions["flowfleet_topics"].desired(row["device"]),
            "command": command,
        }
    )
    resp.status_code = status
    return resp


@bp.post("/devices/<device>/cameras/<camera>/shadow")
@requires("operator")
def set_shadow(device: str, camera: str):
    """Run a model version in shadow beside the camera's active model."""
    query_args(())
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    body, ref = _shadow_body()
    reg = _registry()
    reg.version(body["model"], ref)  # 404 before anything else
    publisher = deployment_commands()
    desired, row = shadow.set_shadow(
        reg,
        device,
        camera,
        body["model"],
        ref,
        share=body.get("share"),
        actor=_actor(),
        reason=body.get("reason", ""),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    return _answer(desired, row, publisher, 201)


@bp.delete("/devices/<device>/cameras/<camera>/shadow")
@requires("operator")
def clear_shadow(device: str, camera: str):
    """Stop the camera's shadow comparison."""
    args = query_args(("reason",))
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    publisher = deployment_commands()
    desired, row = shadow.clear_shadow(
        _registry(),
        device,
        camera,
        actor=_actor(),
        reason=args.get("reason", ""),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    return _answer(desired, row, publisher, 200)
