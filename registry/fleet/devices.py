"""Devices as records: what an operator says about a device (name, description, tags,
site, location), what the device says about itself (hardware and camera geometry from
its online status), registration, presence, and whether its hardware can run a model.

* **Registration.** A device first seen through telemetry is ingested like any other
  (nothing counted is lost) but listed as ``unregistered`` until an operator accepts
  it (`accept`, audited ``device.accept``). A device an operator creates (`create`)
  is registered from the start. Devices that existed before migration 10 were accepted
  by it.
* **Presence** (`presence`): ``online`` / ``offline`` come from the device's status
  (its retained online, its Last Will); an ``online`` or ``unknown`` device whose last
  message is older than ``stale_after_s`` is shown ``stale``. Computed when read, so
  nothing is rewritten while beats are missing.
* **Hardware match** (`hardware_mismatch`): a deployment of a model version the
  device's reported hardware cannot run is refused with the reason.

The ingest functions (`status_columns`) add to the UPDATE that ingest already runs
for a status: no extra query, and nothing at all for count bins.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import peewee as pw

from flowfleet.contract import Status
from flowfleet.contract_device import RUNTIMES

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.db import Device, ModelVersion, now

log = logging.getLogger(__name__)

# A device that sent nothing for this long is "stale": three of the agent's default
# 30 s health beats, twice over (`flowfleet registry` [devices] stale_after_s).
DEFAULT_STALE_AFTER_S = 180.0
PRESENCES = ("online", "stale", "offline", "unknown")
REGISTRATIONS = ("registered", "unregistered")

MAX_DISPLAY_NAME = 128
MAX_DESCRIPTION = 4096
MAX_TAGS = 32
MAX_TAG = 64
EDITABLE = ("name", "description", "tags", "site", "location")


# -- ingest: called inside the ingest transaction ------------------------------------


def status_columns(message: Status, received_at: float) -> dict[pw.Field, object]:
    """Columns a status sets besides its state: the hardware and camera geometry an
    online status reports (a status without them, the Last Will, changes neither)."""
    changes: dict[pw.Field, object] = {}
    if message.hardware is not None:
        changes[Device.hardware] = message.hardware.model_dump_json(exclude_none=True)
    if message.cameras is not None:
        changes[Device.cameras] = json.dumps(
            [c.model_dump(mode="json") for c in message.cameras], separators=(",", ":")
        )
    if changes:
        changes[Device.reported_at] = received_at
    return changes


# -- reading --------------------------------------------------------------------------


def presence(state: str, last_seen: float | None, at: float, stale_after_s: float) -> str:
    """``stale`` for an online (or never-announced) device silent for longer than
    ``stale_after_s``; otherwise the stored state."""
    if state in ("online", "unknown") and last_seen is not None and at - last_seen > stale_after_s:
        return "stale"
    return state if state in PRESENCES else "unknown"


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


def record_dict(dev: Device, at: float, stale_after_s: float) -> dict[str, Any]:
    """The record fields of a device, as the API shows them."""
    return {
        "registration": "registered" if dev.accepted_at is not None else "unregistered",
        "accepted_at": dev.accepted_at,
        "accepted_by": dev.accepted_by,
        "presence": presence(dev.state, dev.last_seen, at, stale_after_s),
        "stale_after_s": stale_after_s,
        "name": dev.name,
        "description": dev.description,
        "tags": _json(dev.tags) or [],
        "site": dev.site,
        "location": (
            {"latitude": dev.latitude, "longitude": dev.longitude}
            if dev.latitude is not None and dev.longitude is not None
            else None
        ),
        "hardware": _json(dev.hardware),
        "cameras": _json(dev.cameras),
        "reported_at": dev.reported_at,
    }


def device_dict(dev: Device, at: float, stale_after_s: float) -> dict[str, Any]:
    """One device record (`GET /api/devices/{device}`)."""
    return {
        "device": dev.id,
        "state": dev.state,
        "state_since": dev.state_since,
        "first_seen": dev.first_seen,
        "last_seen": dev.last_seen,
        "agent_version": dev.agent_version,
        **record_dict(dev, at, stale_after_s),
    }


def get_device(device: str) -> Device:
    check_name(device, "device", "device id")
    dev = Device.get_or_none(Device.id == device)
    if dev is None:
        raise RegistryError(404, "unknown_device", f"no device {device!r}", "device")
    return dev


# -- editing (API and CLI) --------------------------------------------------------------


def _text(value: object, field: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RegistryError(400, "invalid_field", f"{field} must be a string or null", field)
    if len(value) > limit or "\x00" in value:
        raise RegistryError(
            400, "invalid_field", f"{field} is at most {limit} characters, without NUL", field
        )
    return value or None


def _coordinate(value: object, field: str, bound: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegistryError(400, "invalid_field", f"{field} must be a number or null", field)
    if not math.isfinite(value) or not -bound <= value <= bound:
        raise RegistryError(
            400,
            "invalid_field",
            f"{field} must be from {-bound:g} to {bound:g}, got {value}",
            field,
        )
    return float(value)


def _location(value: object) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise RegistryError(
            400, "invalid_field", "location must be {latitude, longitude} or null", "location"
        )
    for key in sorted(set(value) - {"latitude", "longitude"}):
        raise RegistryError(400, "unknown_field", f"unknown field 'location.{key}'", "location")
    for key in ("latitude", "longitude"):
        if value.get(key) is None:
            raise RegistryError(400, "missing_field", f"location.{key} is required", "location")
    return (
        _coordinate(value["latitude"], "location.latitude", 90.0),
        _coordinate(value["longitude"], "location.longitude", 180.0),
    )


def _tags(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise RegistryError(400, "invalid_field", "tags must be a list of strings", "tags")
    tags: list[str] = []
    for tag in value:
        check_name(tag, "tags", "tag")
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise RegistryError(400, "invalid_field", f"at most {MAX_TAGS} tags", "tags")
    return json.dumps(tags) if tags else None


def check_fields(fields: dict[str, object]) -> dict[str, object]:
    """Column values for the editable fields given (``None`` clears one); 400 naming
    the first bad field. ``location`` is ``{"latitude", "longitude"}`` (WGS 84 degrees)."""
    unknown = sorted(set(fields) - set(EDITABLE))
    if unknown:
        raise RegistryError(
            400,
            "unknown_field",
            f"unknown field {unknown[0]!r} (editable: {', '.join(EDITABLE)})",
            unknown[0],
        )
    out: dict[str, object] = {}
    if "name" in fields:
        out["name"] = _text(fields["name"], "name", MAX_DISPLAY_NAME)
    if "description" in fields:
        out["description"] = _text(fields["description"], "description", MAX_DESCRIPTION)
    if "tags" in fields:
        out["tags"] = _tags(fields["tags"])
    if "site" in fields:
        site = fields["site"]
        out["site"] = (
            None if site is None else check_name(_text(site, "site", 64) or "", "site", "site name")
        )
    if "location" in fields:
        out["latitude"], out["longitude"] = _location(fields["location"])
    return out


def _changes(dev: Device, columns: dict[str, object]) -> dict[str, list[object]]:
    return {k: [getattr(dev, k), v] for k, v in columns.items() if getattr(dev, k) != v}


def update_device(
    db: pw.Database, device: str, fields: dict[str, object], *, actor: str, reason: str = ""
) -> Device:
    """Edit a device's record (404 unknown device, 400 bad field: nothing changes)."""
    columns = check_fields(fields)
    with db.atomic():
        dev = get_device(device)
        changed = _changes(dev, columns)
        if changed:
            Device.update({getattr(Device, k): v for k, v in columns.items()}).where(
                Device.id == device
            ).execute()
            audit(actor, "device.update", f"device:{device}", reason, changes=changed)
    return get_device(device)


def create_device(
    db: pw.Database, device: str, fields: dict[str, object], *, actor: str, reason: str = ""
) -> Device:
    """Register a device before it first connects (409 if the registry knows it)."""
    check_name(device, "device", "device id")
    columns = check_fields(fields)
    t = now()
    with db.atomic():
        query = Device.insert(
            id=device,
            first_seen=t,
            state="unknown",
            state_since=t,
            accepted_at=t,
            accepted_by=actor,
            **columns,
        ).on_conflict_ignore()
        if db.rows_affected(db.execute(query)) != 1:
            raise RegistryError(
                409, "device_exists", f"device {device!r} is already known; edit it", "device"
            )
        audit(actor, "device.create", f"device:{device}", reason, **columns)
    return get_device(device)


def accept_device(db: pw.Database, device: str, *, actor: str, reason: str = "") -> Device:
    """Accept a device first seen through telemetry (registering it); accepting a
    registered device changes nothing and is not audited again."""
    with db.atomic():
        dev = get_device(device)
        if dev.accepted_at is None:
            Device.update(accepted_at=now(), accepted_by=actor).where(
                (Device.id == device) & Device.accepted_at.is_null()
            ).execute()
            audit(actor, "device.accept", f"device:{device}", reason)
    return get_device(device)


# -- hardware match --------------------------------------------------------------------

ARCHES = {"x86_64", "aarch64", "arm", "x86", "riscv"}
ACCELERATOR_ALIASES = {"edgetpu": "edgetpu", "coral": "edgetpu", "hailo": "hailo"}
ACCELERATOR_ALIASES.update({"cuda": "cuda", "tensorrt": "cuda", "jetson": "cuda"})


def model_needs(v: ModelVersion) -> dict[str, Any]:
    """What version ``v`` needs from a device, from what the catalog knows of it: its
    runtime, the architectures its target or ELF header names, the accelerators its
    target names (an ``*_edgetpu.tflite`` file, the Edge TPU compiler's naming, needs
    an Edge TPU), and board names from its target."""
    meta = json.loads(v.metadata or "{}")
    targets = [t for t in meta.get("target", []) if isinstance(t, str)]
    arches = {t for t in targets if t in ARCHES}
    if isinstance(meta.get("target_arch"), str) and meta["target_arch"] in ARCHES:
        arches.add(meta["target_arch"])
    accels = {ACCELERATOR_ALIASES[t] for t in targets if t in ACCELERATOR_ALIASES}
    if v.runtime == "tflite" and v.filename.lower().endswith("_edgetpu.tflite"):
        accels.add("edgetpu")
    boards = {t for t in targets if t not in ARCHES and t not in ACCELERATOR_ALIASES}
    return {"runtime": v.runtime, "arches": arches, "accelerators": accels, "boards": boards}


def hardware_mismatch(device: str, v: ModelVersion) -> tuple[str | None, str]:
    """(why the device cannot run ``v`` or None, a note on what was checked).

    Only what the device reported is checked: a device that never reported its
    hardware, or a part of it (no runtimes, no accelerators), is not refused for it,
    and the note says so. Board names in a target are matched against the reported
    board id (equal, or the board id starts with the name and a dash); a device
    without a board id is not refused for them.
    """
    needs = model_needs(v)
    label = f"{v.model.name} v{v.version}"
    dev = Device.get_or_none(Device.id == device)
    hw = _json(dev.hardware) if dev is not None else None
    if not hw:
        return None, f"device {device} has not reported its hardware: {label} not checked"
    unknown = []
    runtimes = hw.get("runtimes")
    if runtimes is None:
        unknown.append("runtimes")
    elif needs["runtime"] in RUNTIMES and needs["runtime"] not in runtimes:
        have = ", ".join(f"{k} ({runtimes[k]})" for k in sorted(runtimes)) or "none"
        return (
            f"device {device} cannot run {label}: it needs the {needs['runtime']} runtime, "
            f"the device reports {have}",
            "",
        )
    arch = hw.get("arch")
    if needs["arches"]:
        if arch is None:
            unknown.append("arch")
        elif arch not in needs["arches"]:
            return (
                f"device {device} cannot run {label}: built for "
                f"{' or '.join(sorted(needs['arches']))}, the device is {arch}",
                "",
            )
    accels = hw.get("accelerators")
    if needs["accelerators"]:
        if accels is None:
            unknown.append("accelerators")
        elif not needs["accelerators"] & set(accels):
            return (
                f"device {device} cannot run {label}: it needs "
                f"{' or '.join(sorted(needs['accelerators']))}, the device reports "
                f"{', '.join(accels) or 'no accelerator'}",
                "",
            )
    board = hw.get("board_id")
    if needs["boards"]:
        if board is None:
            unknown.append("board")
        elif not any(board == b or board.startswith(b + "-") for b in needs["boards"]):
            return (
                f"device {device} cannot run {label}: its target is "
                f"{', '.join(sorted(needs['boards']))}, the device is {board}",
                "",
            )
    note = f"{label} matches device {device}'s hardware"
    if unknown:
        note += f" (not reported, not checked: {', '.join(unknown)})"
    return None, note


def check_hardware(device: str, v: ModelVersion) -> str:
    """409 ``hardware_mismatch`` naming the device and the mismatch; else the note."""
    why, note = hardware_mismatch(device, v)
    if why is not None:
        log.info("deployment refused: %s", why)
        raise RegistryError(409, "hardware_mismatch", why, "device")
    log.info("deployment: %s", note)
    return note
