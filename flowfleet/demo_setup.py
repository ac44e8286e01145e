"""Prepare the demo's registry before it starts: sign-in, devices, models, deployments.

`prepare_registry` opens the demo's registry database directly (as the
`flowfleet registry ...` management commands do) and, idempotently, so a second
`flowfleet demo` in the same folder reuses it:

- creates the signing key (the registry's first-start step) and writes the public
  key bundle the agents verify models with (``keys.json``);
- creates the operator user ``demo`` with a freshly generated web password and an
  API token for the scripted rollout (returned so the demo can print the password
  and keep the token in a file only its owner reads); the tokens an earlier start
  made are revoked;
- registers each demo device as a record with a name, site, tags and a location
  (so the fleet map has markers), its device token (it may only download the models
  deployed to it), and puts it in a group;
- registers the sample models (signed) and deploys the first version to every
  device's camera, so the agents run a registry model from the start and a rollout
  has a previous model to go back to;
- aborts rollouts an earlier, interrupted demo left running (their devices would
  refuse the new rollout as busy).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

OPERATOR = "demo"
ACTOR = "demo"
# The registry model every demo camera runs, and the sample files registered at start.
MODEL = "yolov8n"
TOKEN_LABELS = ("demo rollout", "demo agent")  # the operator's and the agents' tokens
# More sample models registered when they lie beside the first one (not deployed).
EXTRA_MODELS = (("yolov8n-onnx", "yolov8n_int8.onnx"),)


@dataclass(frozen=True)
class DeviceRecord:
    """What the registry knows of a demo device before it first connects."""

    device: str
    name: str
    description: str
    group: str
    tags: tuple[str, ...]
    latitude: float
    longitude: float


@dataclass(frozen=True)
class Prepared:
    """What `prepare_registry` made: the sign-in and the files the agents need."""

    user: str
    password: str
    operator_token: str
    keys_file: Path
    device_tokens: dict[str, Path]
    model: str
    first_version: int


def _write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (created 0600)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def prepare_registry(
    db_url: str,
    workdir: Path,
    devices: list[DeviceRecord],
    camera: str,
    first_model: Path,
) -> Prepared:
    """Set up the registry at ``db_url`` for the demo (see the module docstring);
    ``first_model`` is the file registered as the first version and deployed.

    Must run while no registry process uses the database (SQLite: before it starts).
    """
    from flowfleet.registry.catalog.modelreg import ModelRegistry, RegistryConfig
    from flowfleet.registry.errors import RegistryError
    from flowfleet.registry.fleet import devices as fleet_devices
    from flowfleet.registry.fleet import groups, rollouts
    from flowfleet.registry.http import auth, websession
    from flowfleet.registry.store.db import open_database
    from flowfleet.registry.store.rollout_tables import ACTIVE_ROLLOUT_STATES, Rollout

    db = open_database(db_url)
    reg = ModelRegistry.from_config(db, RegistryConfig.beside(db_url))
    password = secrets.token_urlsafe(12)
    try:
        with db.connection_context():
            reg.start()  # the signing key (the demo's own, made on first start)
            keys_file = workdir / "keys.json"
            keys_file.write_text(json.dumps(reg.keys.bundle(), indent=2) + "\n")
            with db.atomic():
                users = {u["name"]: u for u in auth.list_users()}
                if OPERATOR not in users:
                    auth.create_user(OPERATOR, "operator", actor=ACTOR, reason="flowfleet demo")
                websession.set_password(OPERATOR, password, actor=ACTOR, reason="flowfleet demo")
                # The tokens an earlier start handed out are replaced by new ones.
                for t in auth.list_tokens(OPERATOR):
                    if t["revoked_at"] is None and t["label"] in TOKEN_LABELS:
                        auth.revoke_token(t["id"], actor=ACTOR, reason="flowfleet demo restart")
                op_token, _ = auth.create_token(OPERATOR, actor=ACTOR, label=TOKEN_LABELS[0])
            tokens: dict[str, Path] = {}
            members: dict[str, list[str]] = {}
            for d in devices:
                fields = {
                    "name": d.name,
                    "description": d.description,
                    "site": "demo-city",
                    "tags": list(d.tags),
                    "location": {"latitude": d.latitude, "longitude": d.longitude},
                }
                try:
                    fleet_devices.get_device(d.device)
                    fleet_devices.update_device(db, d.device, fields, actor=ACTOR)
                except RegistryError:  # unknown: register it before it connects
                    fleet_devices.create_device(db, d.device, fields, actor=ACTOR)
                secret, _ = auth.create_token(
                    OPERATOR, actor=ACTOR, device=d.device, label=TOKEN_LABELS[1]
                )
                tokens[d.device] = _write_secret(workdir / f"{d.device}.token", secret)
                members.setdefault(d.group, []).append(d.device)
            for name, ids in members.items():
                groups.set_group(db, name, ids, actor=ACTOR, reason="flowfleet demo")
            # An interrupted demo can leave a rollout running; its devices would be busy.
            for r in Rollout.select().where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES)):
                rollouts.abort_rollout(
                    db, r.id, actor=ACTOR, reason="left running by an earlier demo"
                )
            first = _register(reg, MODEL, first_model, "the agents' first model")
            for name, file in EXTRA_MODELS:
                if (first_model.parent / file).is_file():
                    _register(reg, name, first_model.parent / file, "a sample model")
            reg.set_alias(MODEL, "production", first, actor=ACTOR, reason="flowfleet demo")
            for d in devices:
                reg.deploy(
                    d.device, camera, MODEL, first, actor=ACTOR, reason="flowfleet demo start"
                )
    finally:
        db.close()
    return Prepared(
        user=OPERATOR,
        password=password,
        operator_token=op_token,
        keys_file=keys_file,
        device_tokens=tokens,
        model=MODEL,
        first_version=first,
    )


def _register(reg, name: str, path: Path, notes: str) -> int:
    """Register ``path`` as a version of ``name`` (signed); the existing version if
    these bytes are registered already. Returns the version number."""
    version, _ = reg.add_version(
        path, name=name, filename=path.name, actor=ACTOR, notes=notes, tags=["demo"]
    )
    return version.version
