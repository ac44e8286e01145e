"""Camera set-up from the browser: pushed geometry and calibration snapshots.

An operator sets the lines and zones one camera counts with (`set_geometry`) or asks
it for a calibration snapshot (`request_snapshot`). Both change the device's desired
state (the next version, queued in the same transaction on the commands outbox like a
deployment): ``geometry`` maps a camera to its lines and zones, ``snapshot`` maps a
camera to the id of the latest snapshot asked of it. The device uploads one JPEG per
new id (`store_snapshot`, with its device token) and never unasked; it reports the
geometry it counts with in its reported state, which `camera_setup` compares with
the desired one (``applied`` / ``pending``).

Geometry is validated with the agent's own config models (`LineSpec`, `ZoneSpec`)
and the contract's bounds before anything is stored; an error names the field
(``lines.1.points``) and changes nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from flowfleet.contract import Topics
from flowfleet.contract_device import DesiredGeometry

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.camsetup_tables import CameraSetup, CameraSnapshot
from ..store.db import Device, ReportedState, now
from ..store.locks import exclusive
from .commands import enqueue_command

if TYPE_CHECKING:
    from .commands import CommandPublisher

MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024  # one JPEG frame; a 1080p frame at quality 80 is ~300 KB
JPEG_MAGIC = b"\xff\xd8\xff"


def desired_setup(device: str) -> tuple[dict[str, DesiredGeometry], dict[str, int]]:
    """The device's desired geometry and latest snapshot request per camera."""
    geometry = {
        r.camera: DesiredGeometry.model_validate_json(r.geometry)
        for r in CameraSetup.select()
        .where(CameraSetup.device == device)
        .order_by(CameraSetup.camera)
    }
    snapshot = {
        r.camera: r.request_id
        for r in CameraSnapshot.select()
        .where(CameraSnapshot.device == device)
        .order_by(CameraSnapshot.camera)
    }
    return geometry, snapshot


def known_camera(device: str, camera: str) -> None:
    """404 unless ``camera`` is one the device announced (status or reported state)."""
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    dev = Device.get_or_none(Device.id == device)
    if dev is None:
        raise RegistryError(404, "not_found", f"no device {device!r}", "device")
    names = {c.get("camera") for c in json.loads(dev.cameras or "[]")}
    rep = ReportedState.get_or_none(ReportedState.device == device)
    if rep is not None:
        names |= {c.get("camera") for c in json.loads(rep.payload).get("cameras", [])}
    if camera not in names:
        raise RegistryError(
            404, "not_found", f"device {device!r} has not announced a camera {camera!r}", "camera"
        )


def check_geometry(body: Any) -> DesiredGeometry:
    """Validate a geometry request body (``{"lines": [...], "zones": [...]}``) with the
    agent's config models and the contract; RegistryError 400 naming the field."""
    from flowfleet.agent.config import LineSpec, ZoneSpec
    from flowfleet.agent.speed import HomographySpec

    if not isinstance(body, dict):
        raise RegistryError(400, "invalid_json", "the request body must be a JSON object")
    for key in body:
        if key not in ("lines", "zones", "homography"):
            raise RegistryError(
                400,
                "unknown_field",
                f"unknown field {key!r} (allowed: lines, zones, homography)",
                key,
            )
    if body.get("homography") is not None:
        try:
            HomographySpec.model_validate(body["homography"])
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in ("homography", *err["loc"]))
            raise RegistryError(400, "invalid_field", f"{where}: {err['msg']}", where) from None
    for kind, spec in (("lines", LineSpec), ("zones", ZoneSpec)):
        items = body.get(kind, [])
        if not isinstance(items, list):
            raise RegistryError(400, "invalid_field", f"{kind!r} must be a list", kind)
        seen: set[str] = set()
        for i, item in enumerate(items):
            extra = sorted(set(item) - {"name", "points"}) if isinstance(item, dict) else []
            if extra:
                where = f"{kind}.{i}.{extra[0]}"
                raise RegistryError(
                    400, "unknown_field", f"{where}: unknown field (allowed: name, points)", where
                )
            try:
                value = spec.model_validate(item)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in (kind, i, *err["loc"]))
                raise RegistryError(400, "invalid_field", f"{where}: {err['msg']}", where) from None
            if value.name in seen:
                where = f"{kind}.{i}.name"
                raise RegistryError(
                    400, "invalid_field", f"{where}: {value.name!r} is used twice", where
                )
            seen.add(value.name)
    try:
        doc = {
            kind: [{"name": x["name"], "points": x["points"]} for x in body.get(kind, [])]
            for kind in ("lines", "zones")
        }
        return DesiredGeometry.model_validate({**doc, "homography": body.get("homography")})
    except ValidationError as exc:  # the contract's bounds (coordinates, counts)
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RegistryError(400, "invalid_field", f"{where}: {err['msg']}", where) from None


def _publish(registry, device: str, topics: Topics) -> tuple[int, int]:
    """Queue the device's next desired state (inside the deploy lock)."""
    desired = registry.desired_state(device, registry.next_desired_version(device))
    command_id = enqueue_command(device, topics.desired(device), desired.to_json(), retain=True)
    return desired.version, command_id


def set_geometry(
    registry,
    device: str,
    camera: str,
    body: Any,
    *,
    actor: str,
    commands: CommandPublisher | None = None,
    topics: Topics | None = None,
) -> dict[str, Any]:
    """Make ``camera`` count with the lines and zones of ``body``; returns
    `camera_setup` plus ``command_id``. Nothing changes when anything is refused."""
    known_camera(device, camera)
    geometry = check_geometry(body)
    topics = topics or Topics()
    with exclusive(registry.db, f"deploy:{device}"):
        row = CameraSetup.get_or_none(CameraSetup.device == device, CameraSetup.camera == camera)
        if row is None:
            row = CameraSetup(device=device, camera=camera)
        row.geometry = geometry.model_dump_json()
        row.desired_version, row.created_at, row.actor = 0, now(), actor
        row.save()
        version, command_id = _publish(registry, device, topics)
        row.desired_version = version
        row.save()
        audit(
            actor,
            "geometry.set",
            f"device:{device}/camera:{camera}",
            "",
            lines=len(geometry.lines),
            zones=len(geometry.zones),
            desired_version=version,
            command=command_id,
        )
    if commands is not None:
        commands.wake()
    return {**camera_setup(device, camera), "command_id": command_id}


def request_snapshot(
    registry,
    device: str,
    camera: str,
    *,
    actor: str,
    commands: CommandPublisher | None = None,
    topics: Topics | None = None,
) -> dict[str, Any]:
    """Ask ``camera`` for one calibration snapshot (a new id in the desired state);
    the previous image is dropped. Returns `camera_setup` plus ``command_id``."""
    known_camera(device, camera)
    topics = topics or Topics()
    with exclusive(registry.db, f"deploy:{device}"):
        row = CameraSnapshot.get_or_none(
            CameraSnapshot.device == device, CameraSnapshot.camera == camera
        )
        if row is None:
            row = CameraSnapshot(device=device, camera=camera, request_id=0)
        row.request_id += 1
        row.requested_at, row.requested_by = now(), actor
        row.image = row.width = row.height = row.taken_at = None
        row.save()
        version, command_id = _publish(registry, device, topics)
        audit(
            actor,
            "snapshot.request",
            f"device:{device}/camera:{camera}",
            "",
            request_id=row.request_id,
            desired_version=version,
            command=command_id,
        )
    if commands is not None:
        commands.wake()
    return {**camera_setup(device, camera), "command_id": command_id}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's first frame header; ValueError if it has none."""
    if not data.startswith(JPEG_MAGIC):
        raise ValueError("not a JPEG (it does not start with FF D8 FF)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            if not (w and h):
                raise ValueError("the JPEG's frame header gives a zero size")
            return w, h
        i += 2 + length
    raise ValueError("corrupt JPEG: no frame header (SOF) found")


def store_snapshot(device: str, camera: str, request_id: int, data: bytes) -> dict[str, Any]:
    """Store the JPEG a device sent for snapshot request ``request_id``. Refused (and
    nothing stored) when nothing was asked, the id is not the latest request, the
    image was sent already, or the bytes are not a JPEG within the size cap."""
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise RegistryError(
            413, "too_large", f"the snapshot is {len(data)} bytes, over {MAX_SNAPSHOT_BYTES}"
        )
    row = CameraSnapshot.get_or_none(
        CameraSnapshot.device == device, CameraSnapshot.camera == camera
    )
    if row is None or row.request_id != request_id:
        raise RegistryError(
            409,
            "not_requested",
            f"no snapshot request {request_id} is open for {device}/{camera}: "
            "a device sends an image only when asked",
            "request",
        )
    try:
        width, height = jpeg_size(data)
    except ValueError as exc:
        raise RegistryError(415, "unsupported_media_type", str(exc)) from None
    updated = (
        CameraSnapshot.update(image=data, width=width, height=height, taken_at=now())
        .where(
            (CameraSnapshot.id == row.id)
            & (CameraSnapshot.request_id == request_id)
            & CameraSnapshot.image.is_null()
        )
        .execute()
    )
    if not updated:
        raise RegistryError(
            409, "not_requested", f"snapshot request {request_id} was answered already", "request"
        )
    return camera_setup(device, camera)


def snapshot_image(device: str, camera: str) -> tuple[bytes, float]:
    """(JPEG bytes, taken_at) of the camera's latest snapshot; 404 when none."""
    row = CameraSnapshot.get_or_none(
        CameraSnapshot.device == device, CameraSnapshot.camera == camera
    )
    if row is None or row.image is None:
        raise RegistryError(404, "not_found", f"no snapshot of {device}/{camera} yet")
    return bytes(row.image), row.taken_at


def _reported_geometry(device: str, camera: str) -> dict[str, Any] | None:
    rep = ReportedState.get_or_none(ReportedState.device == device)
    if rep is None:
        return None
    doc = json.loads(rep.payload)
    for cam in doc.get("geometry") or []:
        if cam.get("camera") == camera:
            return _shape(cam)
    return None


def _shape(cam: dict[str, Any]) -> dict[str, Any]:
    keys = ("lines", "zones", "homography")
    return {k: cam.get(k, [] if k != "homography" else None) for k in keys}


def _configured_geometry(device: str, camera: str) -> dict[str, Any] | None:
    dev = Device.get_or_none(Device.id == device)
    for cam in json.loads((dev.cameras if dev else None) or "[]"):
        if cam.get("camera") == camera:
            return _shape(cam)
    return None


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Whether the reported geometry ``a`` is the desired ``b`` (a desired state without
    a homography leaves the camera's own, so it is not compared)."""
    if a is None:
        return False
    a = {**a, "homography": a.get("homography") if b.get("homography") is not None else None}
    norm = DesiredGeometry.model_validate
    return norm(a) == norm(b)


def camera_setup(device: str, camera: str) -> dict[str, Any]:
    """One camera's set-up: desired and reported geometry, ``state`` (``applied`` when
    the device reports the desired geometry, ``pending`` until then, ``none`` when
    nothing was pushed), the geometry the camera announced at start, and its snapshot."""
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    row = CameraSetup.get_or_none(CameraSetup.device == device, CameraSetup.camera == camera)
    desired = json.loads(row.geometry) if row is not None else None
    reported = _reported_geometry(device, camera)
    state = "none" if desired is None else ("applied" if _same(reported, desired) else "pending")
    snap = CameraSnapshot.get_or_none(
        CameraSnapshot.device == device, CameraSnapshot.camera == camera
    )
    snapshot = None
    if snap is not None:
        snapshot = {
            "request_id": snap.request_id,
            "requested_at": snap.requested_at,
            "requested_by": snap.requested_by,
            "taken_at": snap.taken_at,
            "width": snap.width,
            "height": snap.height,
            "state": "received" if snap.taken_at is not None else "requested",
        }
    return {
        "device": device,
        "camera": camera,
        "desired": desired,
        "desired_version": row.desired_version if row is not None else None,
        "desired_by": row.actor if row is not None else None,
        "reported": reported,
        "configured": _configured_geometry(device, camera),
        "state": state,
        "snapshot": snapshot,
    }
