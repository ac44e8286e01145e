"""Shadow comparisons: ask a device's camera to run a candidate model beside its active
one, store what it reports, and sum the agreement for the rollouts' count gate.

`set_shadow` / `clear_shadow` change the device's whole desired state (a new
version, built by `DeploymentsMixin.desired_state`, queued as a retained command in
the same transaction, audited as ``shadow.set`` / ``shadow.clear``). The device's
windows (`flowfleet.contract_shadow.ShadowWindow`) are stored by ingest
(`shadow_columns`); `shadow_windows` lists them and `shadow_agreement` pools them
over a period (docs/registry.md#shadow).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import peewee as pw

from flowfleet.contract import Desired, Topics
from flowfleet.contract_shadow import ShadowWindow as ShadowPayload
from flowfleet.contract_shadow import agreement_of

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.db import now
from ..store.locks import exclusive
from ..store.shadow_tables import ShadowRequest, ShadowWindow
from .commands import enqueue_command
from .devices import check_hardware

if TYPE_CHECKING:
    from .commands import CommandPublisher

__all__ = [
    "ShadowWindow",
    "clear_shadow",
    "set_shadow",
    "shadow_agreement",
    "shadow_columns",
    "shadow_requests",
    "shadow_windows",
]


def shadow_columns(message: ShadowPayload, received_at: float) -> dict:
    """The `ShadowWindow` columns of a validated window (besides device, seq, payload)."""
    return {
        "camera": message.camera,
        "start": message.start,
        "end": message.end,
        "active_model": message.active.model or message.active.file,
        "active_version": message.active.version,
        "candidate_model": message.candidate.model or message.candidate.file,
        "candidate_version": message.candidate.version,
        "frames": message.frames,
        "frames_compared": message.frames_compared,
        "boxes_active": message.boxes_active,
        "boxes_candidate": message.boxes_candidate,
        "matched": message.matched,
        "agreement": message.agreement,
        "received_at": received_at,
    }


def _check_share(share: float | None) -> float | None:
    if share is None:
        return None
    if (
        isinstance(share, bool)
        or not isinstance(share, (int, float))
        or not math.isfinite(share)
        or not 0 < share <= 1
    ):
        raise RegistryError(
            400, "invalid_parameter", f"share {share!r} is not a number in (0, 1]", "share"
        )
    return float(share)


def _request_dict(r: ShadowRequest) -> dict:
    return {
        "device": r.device,
        "camera": r.camera,
        "model": r.model,
        "version": r.version,
        "share": r.share,
        "desired_version": r.desired_version,
        "created_at": r.created_at,
        "actor": r.actor,
        "reason": r.reason,
    }


def _publish(registry, device: str, topics: Topics) -> tuple[Desired, int]:
    """Build the device's next desired state and queue it (inside the deploy lock)."""
    desired = registry.desired_state(device, registry.next_desired_version(device))
    command_id = enqueue_command(device, topics.desired(device), desired.to_json(), retain=True)
    return desired, command_id


def set_shadow(
    registry,
    device: str,
    camera: str,
    name: str,
    ref: str | int,
    *,
    share: float | None = None,
    actor: str,
    reason: str = "",
    commands: CommandPublisher | None = None,
    topics: Topics | None = None,
) -> tuple[Desired, dict]:
    """Make ``camera`` of ``device`` run model ``name`` version or alias ``ref`` in
    shadow on ``share`` of its frames (None: the agent's default).

    Refused (RegistryError, nothing changed) for a bad name or share, an unknown
    model or version, an unsigned version (409) and a device whose hardware cannot
    run it (409). Returns (the new desired state, the request as a dict plus
    ``command_id``).
    """
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    share = _check_share(share)
    topics = topics or Topics()
    # The deploy lock: shadow and deploy changes of one device publish in order.
    with exclusive(registry.db, f"deploy:{device}"):
        v = registry.version(name, ref)
        hardware_note = check_hardware(device, v)
        registry.model_ref(v)  # 409 when unsigned: a device never runs it
        row = ShadowRequest.get_or_none(
            ShadowRequest.device == device, ShadowRequest.camera == camera
        )
        old = f"{row.model}/v{row.version}" if row is not None else None
        if row is None:
            row = ShadowRequest(device=device, camera=camera)
        row.model, row.version, row.share = v.model.name, v.version, share
        row.desired_version = 0  # set below, once the version is taken
        row.created_at, row.actor, row.reason = now(), actor, reason or ""
        row.save()
        desired, command_id = _publish(registry, device, topics)
        row.desired_version = desired.version
        row.save()
        audit(
            actor,
            "shadow.set",
            f"device:{device}/camera:{camera}",
            reason,
            model=v.model.name,
            version=v.version,
            ref=str(ref),
            share=share,
            old=old,
            desired_version=desired.version,
            command=command_id,
            hardware=hardware_note,
        )
    if commands is not None:
        commands.wake()
    return desired, {**_request_dict(row), "command_id": command_id}


def clear_shadow(
    registry,
    device: str,
    camera: str,
    *,
    actor: str,
    reason: str = "",
    commands: CommandPublisher | None = None,
    topics: Topics | None = None,
) -> tuple[Desired, dict]:
    """Stop ``camera``'s shadow comparison: a new desired state without it.

    404 (nothing changed) when the camera has none."""
    check_name(device, "device", "device id")
    check_name(camera, "camera", "camera name")
    topics = topics or Topics()
    with exclusive(registry.db, f"deploy:{device}"):
        row = ShadowRequest.get_or_none(
            ShadowRequest.device == device, ShadowRequest.camera == camera
        )
        if row is None:
            raise RegistryError(
                404,
                "not_found",
                f"camera {camera!r} of device {device!r} runs no shadow comparison",
                "camera",
            )
        row.delete_instance()
        desired, command_id = _publish(registry, device, topics)
        audit(
            actor,
            "shadow.clear",
            f"device:{device}/camera:{camera}",
            reason,
            model=row.model,
            version=row.version,
            desired_version=desired.version,
            command=command_id,
        )
    if commands is not None:
        commands.wake()
    return desired, {**_request_dict(row), "command_id": command_id}


def shadow_requests(device: str | None = None) -> list[dict]:
    """The current shadow requests (of one device), by device and camera."""
    q = ShadowRequest.select().order_by(ShadowRequest.device, ShadowRequest.camera)
    if device is not None:
        q = q.where(ShadowRequest.device == device)
    return [_request_dict(r) for r in q]


def shadow_windows(
    limit: int, offset: int, device: str | None = None, camera: str | None = None
) -> tuple[list[dict], int]:
    """Stored windows, newest first, as the device sent them (plus ``received_at``),
    and how many match."""
    q = ShadowWindow.select()
    if device is not None:
        q = q.where(ShadowWindow.device == device)
    if camera is not None:
        q = q.where(ShadowWindow.camera == camera)
    total = q.count()
    rows = q.order_by(ShadowWindow.start.desc(), ShadowWindow.id.desc()).limit(limit).offset(offset)
    items = [{**json.loads(r.payload), "received_at": r.received_at} for r in rows]
    return items, total


def shadow_agreement(
    device: str,
    camera: str,
    since: float,
    *,
    candidate: str | None = None,
    candidate_version: int | None = None,
) -> dict:
    """The windows of ``camera`` of ``device`` that started at or after ``since``
    (optionally of one candidate model / version), pooled: box totals, the
    symmetric agreement over all of them (None without boxes), the lowest window
    agreement, frames and windows. For the rollouts' count gate: a caller compares
    ``agreement`` with its threshold once ``boxes`` is large enough to judge."""
    q = ShadowWindow.select().where(
        (ShadowWindow.device == device)
        & (ShadowWindow.camera == camera)
        & (ShadowWindow.start >= since)
    )
    if candidate is not None:
        q = q.where(ShadowWindow.candidate_model == candidate)
    if candidate_version is not None:
        q = q.where(ShadowWindow.candidate_version == candidate_version)
    windows = frames = compared = a = c = m = 0
    lowest = None
    first = last = None
    for r in q.order_by(ShadowWindow.start):
        windows += 1
        frames += r.frames
        compared += r.frames_compared
        a, c, m = a + r.boxes_active, c + r.boxes_candidate, m + r.matched
        if r.agreement is not None:
            lowest = r.agreement if lowest is None else min(lowest, r.agreement)
        first = r.start if first is None else first
        last = r.end
    return {
        "device": device,
        "camera": camera,
        "since": since,
        "windows": windows,
        "frames": frames,
        "frames_compared": compared,
        "boxes_active": a,
        "boxes_candidate": c,
        "matched": m,
        "agreement": agreement_of(m, a, c),
        "lowest_window_agreement": lowest,
        "first_start": first,
        "last_end": last,
    }


# Fewer boxes than this over the soak (both models together): too few to judge.
GATE_MIN_BOXES = 100


def agreement_source(min_boxes: int = GATE_MIN_BOXES):
    """The rollouts' count-agreement gate's data (`rollout_gates.AgreementSource`):
    (device, camera, since) -> the pooled agreement of the camera's shadow windows
    since ``since`` (the device's activation of the rollout's model, so the windows
    compare that model, active, with the candidate an operator asked it to run beside
    it: the previous model), or None (not judged) with fewer than ``min_boxes`` boxes.
    """

    def source(device: str, camera: str, since: float) -> float | None:
        pooled = shadow_agreement(device, camera, since)
        if pooled["boxes_active"] + pooled["boxes_candidate"] < min_boxes:
            return None
        return pooled["agreement"]

    return source


def drift_shadow_source(min_boxes: int = GATE_MIN_BOXES):
    """The drift judge's shadow hook (`drift.ShadowSource`): for a drift window of a
    new model (and the model it replaced), the camera's shadow windows that overlap
    it and ran that new model as the active one:

    * ``agreement``: their pooled agreement (with whatever candidate an operator asked
      for, normally the previous model); None (the agreement policy is not judged)
      without such windows or with fewer than ``min_boxes`` boxes;
    * ``previous_window``: when the candidate of those windows is the previous model
      and they carry its raw output (``candidate_drift``), that output pooled: the
      previous model on the same frames, which the judge compares with the previous
      model's own baseline; the same breach there means the scene changed.
    """
    from .drift import Shadow, model_version
    from .drift_stats import WindowStats

    def source(row, previous: str | None = None) -> Shadow | None:
        active = model_version(row.model)
        if active is None:
            return None
        overlapping = (
            (ShadowWindow.device == row.device_id)
            & (ShadowWindow.camera == row.camera)
            & (ShadowWindow.start < row.end)
            & (ShadowWindow.end > row.start)
            & (ShadowWindow.active_model == active[0])
            & (ShadowWindow.active_version == active[1])
        )
        q = ShadowWindow.select(
            pw.fn.SUM(ShadowWindow.boxes_active),
            pw.fn.SUM(ShadowWindow.boxes_candidate),
            pw.fn.SUM(ShadowWindow.matched),
        ).where(overlapping)
        a, c, m = (int(x or 0) for x in q.tuples().get())
        agreement = agreement_of(m, a, c) if a + c >= min_boxes else None
        prev = model_version(previous) if previous else None
        window = None
        if prev is not None:
            rows = ShadowWindow.select(ShadowWindow.payload).where(
                overlapping
                & (ShadowWindow.candidate_model == prev[0])
                & (ShadowWindow.candidate_version == prev[1])
            )
            raw = [json.loads(r.payload).get("candidate_drift") for r in rows]
            raw = [d for d in raw if d]
            if raw:
                window = WindowStats.pool(
                    WindowStats(
                        frames=d["frames"],
                        detections=d["detections"],
                        confidence_hist=tuple(d["confidence_hist"]),
                        class_mix=d["class_mix"],
                    )
                    for d in raw
                )
        if agreement is None and window is None:
            return None
        return Shadow(previous_window=window, agreement=agreement)

    return source
