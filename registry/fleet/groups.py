"""Device groups: named sets of devices that a model can be deployed to in one step.

A group holds device ids (a device may be in several groups, and may be added before
it has ever connected). Deploying to a group (`deploy_to_group`) deploys the same
model version to one camera name on every member, device by device, each with its
own desired-state version, exactly as `ModelRegistry.deploy` does for one device
(each desired state is queued in the commands outbox and published after commit);
the result lists every member's outcome, so a refusal part-way through (a version
that lost its signature) says which devices got the new desired state and which did
not. Every change is audited.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import peewee as pw

from ..catalog.modelreg import ModelRegistry
from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.db import DeviceGroup, DeviceGroupMember, now
from ..store.locks import exclusive

if TYPE_CHECKING:
    from .commands import CommandPublisher

MAX_MEMBERS = 10_000


def _group(name: str) -> DeviceGroup:
    check_name(name, "group", "group name")
    row = DeviceGroup.get_or_none(DeviceGroup.name == name)
    if row is None:
        raise RegistryError(404, "unknown_group", f"no device group {name!r}", "group")
    return row


def _member_ids(g: DeviceGroup) -> list[str]:
    query = DeviceGroupMember.select(DeviceGroupMember.device).where(DeviceGroupMember.group == g)
    return sorted(m.device for m in query)


def members(name: str) -> list[str]:
    """The device ids in group ``name``, sorted (404 for an unknown group)."""
    return _member_ids(_group(name))


def group_dict(g: DeviceGroup) -> dict:
    return {
        "name": g.name,
        "devices": _member_ids(g),
        "created_at": g.created_at,
        "created_by": g.created_by,
    }


def list_groups() -> list[dict]:
    return [group_dict(g) for g in DeviceGroup.select().order_by(DeviceGroup.name)]


def get_group(name: str) -> dict:
    return group_dict(_group(name))


def _device_ids(devices: Iterable[str]) -> list[str]:
    out = sorted({check_name(d, "devices", "device id") for d in devices})
    if len(out) > MAX_MEMBERS:
        raise RegistryError(
            400, "invalid_field", f"a group holds at most {MAX_MEMBERS} devices", "devices"
        )
    return out


def set_group(
    db: pw.Database, name: str, devices: Iterable[str], *, actor: str, reason: str = ""
) -> tuple[dict, bool]:
    """Create group ``name`` or replace its members; returns (the group, created)."""
    check_name(name, "group", "group name")
    wanted = _device_ids(devices)
    with exclusive(db, f"group:{name}"):
        g = DeviceGroup.get_or_none(DeviceGroup.name == name)
        created = g is None
        if created:
            g = DeviceGroup.create(name=name, created_at=now(), created_by=actor)
        have = set(_member_ids(g))
        added = sorted(set(wanted) - have)
        removed = sorted(have - set(wanted))
        if removed:
            DeviceGroupMember.delete().where(
                (DeviceGroupMember.group == g) & DeviceGroupMember.device.in_(removed)
            ).execute()
        t = now()
        for device in added:
            DeviceGroupMember.create(group=g, device=device, added_at=t)
        audit(
            actor,
            "group.create" if created else "group.update",
            f"group:{name}",
            reason,
            added=added,
            removed=removed,
        )
        return group_dict(g), created


def delete_group(db: pw.Database, name: str, *, actor: str, reason: str = "") -> None:
    """Delete a group (its devices keep their deployments)."""
    with exclusive(db, f"group:{name}"):
        g = _group(name)
        devices = _member_ids(g)
        g.delete_instance(recursive=True)
        audit(actor, "group.delete", f"group:{name}", reason, devices=devices)


def deploy_to_group(
    registry: ModelRegistry,
    name: str,
    camera: str,
    model: str,
    ref: str | int,
    *,
    actor: str,
    reason: str = "",
    commands: CommandPublisher | None = None,
    topics=None,
) -> dict:
    """Deploy ``model`` ``ref`` to ``camera`` on every device of group ``name``.

    Resolves ``ref`` once, so an alias moved during the rollout cannot split the
    group between two versions. Returns ``{"group", "model", "version", "camera",
    "deployed": [...], "failed": [{"device", "error"}]}`` (each deployed row has the
    ``command_id`` of its queued desired state); raises 409 for an empty group and
    404 for an unknown group, model or version.
    """
    check_name(camera, "camera", "camera name")
    devices = members(name)
    if not devices:
        raise RegistryError(409, "empty_group", f"device group {name!r} has no devices", "group")
    version = registry.version(model, ref).version
    audit(
        actor,
        "group.deploy",
        f"group:{name}",
        reason,
        camera=camera,
        model=model,
        version=version,
        ref=str(ref),
        devices=devices,
    )
    deployed, failed = [], []
    for device in devices:
        try:
            _, row = registry.deploy(
                device,
                camera,
                model,
                version,
                actor=actor,
                reason=reason or f"deployed to group {name}",
                commands=commands,
                topics=topics,
            )
        except RegistryError as exc:
            failed.append({"device": device, "error": exc.message})
            continue
        deployed.append(row)
    return {
        "group": name,
        "camera": camera,
        "model": model,
        "version": version,
        "deployed": deployed,
        "failed": failed,
    }
