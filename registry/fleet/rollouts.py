"""Staged rollouts: create, list, show, pause, resume and abort.

A rollout moves one model version to one camera name on a set of devices in waves
(`rollout_plan`), judging each device before the next wave (`rollout_gates`); its
steps run as a singleton job (`rollout_job`, `rollout_steps`). This module is what the
API and the CLI call: every change is audited (``rollout.create``, ``rollout.pause``,
``rollout.resume``, ``rollout.abort``), and bad input raises `RegistryError` naming
the field with nothing created.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.db import Deployment, now
from ..store.locks import exclusive
from ..store.rollout_tables import (
    ACTIVE_ROLLOUT_STATES,
    FAILURE_STATES,
    ROLLOUT_STATES,
    Rollout,
    RolloutDevice,
)
from .rollout_plan import Plan, assign_waves, parse_plan, parse_targets, resolve
from .rollout_steps import rollout_target

if TYPE_CHECKING:
    from ..catalog.modelreg import ModelRegistry
    from .rollout_steps import RolloutStepper

MAX_PAGE = 1000


def create_rollout(
    registry: ModelRegistry,
    *,
    model: str,
    ref: str | int,
    camera: str,
    targets: Any,
    plan: Any = None,
    actor: str,
    reason: str = "",
) -> dict:
    """Create a rollout (state running; its first step moves the canary).

    ``ref`` is a version number or an alias, resolved now. Refuses (nothing created):
    400 for a bad field, 404 for an unknown model, version or group, 409 for an
    unsigned version, an empty target set, or a target device whose camera is in
    another active rollout.
    """
    check_name(model, "model", "model name")
    check_name(camera, "camera", "camera name")
    if not str(ref):
        raise RegistryError(400, "invalid_field", "version: give a number or an alias", "version")
    p = parse_plan(plan)
    t = parse_targets(targets)
    try:
        v = registry.version(model, ref)
    except RegistryError as exc:
        if exc.code == "unknown_model":
            exc.field = "model"  # the rollout's field is "model", not the upload's "name"
        raise
    registry.model_ref(v)  # 409 when unsigned: no device could verify it
    seed = p.seed if p.seed is not None else secrets.randbelow(2**31)
    db = registry.db
    with exclusive(db, "rollouts:create"):
        devices = resolve(t)
        waves = assign_waves(devices, p, seed)
        busy = (
            RolloutDevice.select(RolloutDevice.device, Rollout.id)
            .join(Rollout)
            .where(
                Rollout.state.in_(ACTIVE_ROLLOUT_STATES)
                & (Rollout.camera == camera)
                & RolloutDevice.device.in_(devices)
            )
            .tuples()
            .first()
        )
        if busy is not None:
            raise RegistryError(
                409,
                "busy",
                f"device {busy[0]} camera {camera} is in active rollout {busy[1]}",
                "targets",
            )
        t0 = now()
        r = Rollout.create(
            model=model,
            version=v.version,
            ref=str(ref),
            camera=camera,
            targets=t.model_dump_json(exclude_defaults=True),
            plan=p.model_copy(update={"seed": seed}).model_dump_json(),
            seed=seed,
            waves=max(waves.values()),
            state="running",
            reason=reason or "",
            created_by=actor,
            created_at=t0,
            updated_at=t0,
        )
        # Cameras with no registry model cannot be put back if they fail: named in the
        # audit entry (and, per device, in its reason once moved).
        deployed = {
            d
            for (d,) in Deployment.select(Deployment.device)
            .where((Deployment.camera == camera) & Deployment.device.in_(devices))
            .tuples()
        }
        without = [d for d in devices if d not in deployed]
        rows = [{"rollout": r.id, "device": d, "wave": w} for d, w in waves.items()]
        for i in range(0, len(rows), 500):
            RolloutDevice.insert_many(rows[i : i + 500]).execute()
        audit(
            actor,
            "rollout.create",
            rollout_target(r.id),
            reason,
            model=model,
            version=v.version,
            ref=str(ref),
            camera=camera,
            targets=json.loads(r.targets),
            devices=len(devices),
            canary=sorted(d for d, w in waves.items() if w == 0),
            seed=seed,
            without_previous=len(without),
            without_previous_devices=without[:20],
        )
    return get_rollout(r.id)


def _rollout(rollout_id: int) -> Rollout:
    r = Rollout.get_or_none(Rollout.id == rollout_id)
    if r is None:
        raise RegistryError(404, "unknown_rollout", f"no rollout {rollout_id}", "rollout")
    return r


def _summary(r: Rollout, counts: dict[str, int]) -> dict:
    return {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "ref": r.ref,
        "camera": r.camera,
        "state": r.state,
        "wave": r.wave,
        "waves": r.waves,
        "reason": r.reason,
        "created_by": r.created_by,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "finished_at": r.finished_at,
        "devices": counts,
    }


def list_rollouts(state: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
    """Rollouts, newest first, with their devices counted by state."""
    return page_rollouts(state, limit, offset)[0]


def page_rollouts(
    state: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[dict], int]:
    """A page of `list_rollouts` and how many rollouts match in all."""
    if state is not None and state not in ROLLOUT_STATES:
        raise RegistryError(
            400, "invalid_parameter", f"state: one of {', '.join(ROLLOUT_STATES)}", "state"
        )
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise RegistryError(400, "invalid_parameter", f"limit: 1..{MAX_PAGE}", "limit")
    query = Rollout.select()
    if state is not None:
        query = query.where(Rollout.state == state)
    total = query.count()
    rollouts = list(query.order_by(Rollout.id.desc()).limit(limit).offset(offset))
    counts: dict[int, dict[str, int]] = {r.id: {} for r in rollouts}
    if rollouts:
        import peewee as pw

        for rid, st, n in (
            RolloutDevice.select(
                RolloutDevice.rollout, RolloutDevice.state, pw.fn.COUNT(RolloutDevice.id)
            )
            .where(RolloutDevice.rollout.in_(list(counts)))
            .group_by(RolloutDevice.rollout, RolloutDevice.state)
            .tuples()
        ):
            counts[rid][st] = n
    return [_summary(r, counts[r.id]) for r in rollouts], total


def _device_dict(rd: RolloutDevice) -> dict:
    return {
        "device": rd.device,
        "state": rd.state,
        "reason": rd.reason,
        "previous": None
        if rd.previous_model is None
        else {"model": rd.previous_model, "version": rd.previous_version},
        "desired_version": rd.desired_version,
        "moved_at": rd.moved_at,
        "activated_at": rd.activated_at,
        "finished_at": rd.finished_at,
        "reverted_at": rd.reverted_at,
        "revert_desired_version": rd.revert_desired_version,
        "shadow_started_at": rd.shadow_started_at,
        "shadow_agreement": rd.shadow_agreement,
    }


def get_rollout(rollout_id: int) -> dict:
    """One rollout with its plan, targets and waves (each device's state and reason)."""
    r = _rollout(rollout_id)
    rows = list(
        RolloutDevice.select()
        .where(RolloutDevice.rollout == r)
        .order_by(RolloutDevice.wave, RolloutDevice.device)
    )
    counts = dict(Counter(rd.state for rd in rows))
    waves = []
    for w in range(0, r.waves + 1):
        members = [rd for rd in rows if rd.wave == w]
        waves.append(
            {
                "wave": w,
                "canary": w == 0,
                "state": _wave_state(r, w, members),
                "devices": [_device_dict(rd) for rd in members],
            }
        )
    out = _summary(r, counts)
    out.update(
        {
            "plan": json.loads(r.plan),
            "targets": json.loads(r.targets),
            "seed": r.seed,
            "wave_started_at": r.wave_started_at,
            "steps": r.steps,
            "failures": {k: counts.get(k, 0) for k in FAILURE_STATES},
            "waves": waves,
        }
    )
    return out


def _wave_state(r: Rollout, w: int, members: list[RolloutDevice]) -> str:
    if not members:
        return "empty"
    if all(rd.state == "pending" for rd in members):
        return "waiting" if r.state in ACTIVE_ROLLOUT_STATES else "not started"
    if any(rd.state in ("pending", "moving", "soaking") for rd in members):
        return "moving"
    return "done"


def _change(
    db, rollout_id: int, allowed: tuple[str, ...], new: str, action: str, actor: str, reason: str
) -> Rollout:
    with exclusive(db, rollout_target(rollout_id)):
        r = _rollout(rollout_id)
        if r.state not in allowed:
            raise RegistryError(
                409,
                "invalid_state",
                f"rollout {rollout_id} is {r.state}; {action.split('.')[1]} needs "
                f"{' or '.join(allowed)}",
                "state",
            )
        old = r.state
        r.state = new
        r.updated_at = now()
        if reason:
            r.reason = reason
        r.save()
        audit(actor, action, rollout_target(r.id), reason, previous_state=old)
    return r


def pause_rollout(db, rollout_id: int, *, actor: str, reason: str = "") -> dict:
    """Stop moving devices (devices in flight are still judged, and the abort
    criteria still apply)."""
    _change(db, rollout_id, ("running",), "paused", "rollout.pause", actor, reason)
    return get_rollout(rollout_id)


def resume_rollout(db, rollout_id: int, *, actor: str, reason: str = "") -> dict:
    _change(db, rollout_id, ("paused",), "running", "rollout.resume", actor, reason)
    return get_rollout(rollout_id)


def abort_rollout(
    db,
    rollout_id: int,
    *,
    actor: str,
    reason: str = "",
    stepper: RolloutStepper | None = None,
) -> dict:
    """Abort: every device the rollout moved goes back to its previous model. With a
    ``stepper`` that happens now; otherwise at the job's next step."""
    _change(
        db,
        rollout_id,
        ("running", "paused"),
        "aborting",
        "rollout.abort",
        actor,
        reason or "aborted by hand",
    )
    if stepper is not None:
        stepper.step(rollout_id)
    return get_rollout(rollout_id)


def plan_defaults() -> dict:
    """The plan a rollout gets when it gives none (for the docs and the CLI)."""
    return Plan().model_dump()
