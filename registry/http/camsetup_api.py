"""REST API for camera set-up from the browser (a Flask blueprint under ``/api``).

``GET /api/devices/<device>/cameras/<camera>/setup`` (viewer): desired, reported and
configured geometry, ``applied`` / ``pending``, and the latest snapshot's state.
``PUT .../geometry`` (operator): push lines and zones as desired state.
``POST .../snapshot/request`` (operator): ask the camera for one calibration snapshot.
``PUT .../snapshot?request=N`` (the device's own device token, ``image/jpeg``): the
device's answer. ``GET .../snapshot`` (a signed-in viewer or token; never anonymous,
never a device token): the JPEG. See `flowfleet.registry.fleet.camsetup`.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, jsonify, request

from ..errors import RegistryError, check_name
from ..fleet import camsetup
from .api import _actor, _registry, command_outcomes, deployment_commands, query_args, requires

bp = Blueprint("camsetup_api", __name__, url_prefix="/api/devices/<device>/cameras/<camera>")


def _answer(row: dict, publisher) -> Response:
    (command,) = command_outcomes(publisher, [row.pop("command_id")])
    return jsonify({**row, "command": command})


@bp.get("/setup")
@requires("viewer")
def get_setup(device: str, camera: str):
    query_args(())
    return jsonify(camsetup.camera_setup(device, camera))


@bp.put("/geometry")
@requires("operator")
def put_geometry(device: str, camera: str):
    """Push lines and zones (validated with the agent's config models; 400 names the
    field and nothing changes) as the camera's desired geometry."""
    query_args(())
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    if not request.is_json:
        raise RegistryError(
            415, "unsupported_media_type", "send a JSON object (Content-Type: application/json)"
        )
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        raise RegistryError(400, "invalid_json", "the request body is not valid JSON") from None
    camsetup.known_camera(device, camera)  # 404, then 400 naming the field, then 503
    camsetup.check_geometry(body)
    publisher = deployment_commands()
    row = camsetup.set_geometry(
        _registry(),
        device,
        camera,
        body,
        actor=_actor(),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    return _answer(row, publisher)


@bp.post("/snapshot/request")
@requires("operator")
def request_snapshot(device: str, camera: str):
    """Ask the camera for one calibration snapshot through its desired state."""
    query_args(())
    publisher = deployment_commands()
    row = camsetup.request_snapshot(
        _registry(),
        device,
        camera,
        actor=_actor(),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    resp = _answer(row, publisher)
    resp.status_code = 202
    return resp


@bp.put("/snapshot")
@requires("viewer")
def upload_snapshot(device: str, camera: str):
    """A device's answer to a snapshot request: one JPEG, its own device token only."""
    args = query_args(("request",))
    principal = g.get("principal")
    if principal is None or principal.device != device:
        raise RegistryError(
            403, "forbidden", f"only device {device!r} (its device token) may send its snapshots"
        )
    try:
        request_id = int(args.get("request", ""))
    except ValueError:
        raise RegistryError(
            400, "invalid_parameter", "request must be the snapshot request id", "request"
        ) from None
    size = request.content_length
    if size is not None and size > camsetup.MAX_SNAPSHOT_BYTES:
        raise RegistryError(
            413, "too_large", f"the snapshot is {size} bytes, over {camsetup.MAX_SNAPSHOT_BYTES}"
        )
    if request.mimetype != "image/jpeg":
        raise RegistryError(415, "unsupported_media_type", "send the frame as image/jpeg")
    data = request.stream.read(camsetup.MAX_SNAPSHOT_BYTES + 1)
    return jsonify(camsetup.store_snapshot(device, camera, request_id, data))


@bp.get("/snapshot")
@requires("viewer")
def get_snapshot(device: str, camera: str):
    """The latest calibration snapshot (JPEG); for signed-in users only."""
    query_args(())
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    data, taken_at = camsetup.snapshot_image(device, camera)
    resp = Response(data, mimetype="image/jpeg")
    resp.headers["Cache-Control"] = "private, no-store"
    resp.headers["X-Snapshot-Taken-At"] = repr(taken_at)
    return resp
