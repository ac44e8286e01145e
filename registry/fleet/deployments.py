"""Deployments: which model version each camera of a device should run, and the
signed, retained desired state that tells the device (mixed into `ModelRegistry`).

The desired state goes into the commands outbox (`flowfleet.registry.fleet.commands`)
in the deployment's own transaction; the registry's `CommandPublisher` sends it to
the broker after commit."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from flowfleet.contract import Desired, ModelRef, ShadowRef, Topics

from .. import metrics
from ..errors import RegistryError, artifact_path, check_name
from ..store.audit import audit
from ..store.db import Deployment, DesiredCounter, ModelVersion, Signature, now
from ..store.locks import exclusive
from ..store.shadow_tables import ShadowRequest
from .commands import enqueue_command
from .devices import check_hardware

if TYPE_CHECKING:
    import peewee as pw

    from .commands import CommandPublisher


class DeploymentsMixin:
    """Deployment methods of `ModelRegistry` (which provides ``db``, ``version``)."""

    db: pw.Database

    def model_ref(self, v: ModelVersion) -> ModelRef:
        """What a device needs to fetch and verify version ``v``: its signed manifest
        (base64 of the exact signed bytes), the newest signature and its key id, and
        the artifact URL relative to the registry."""
        sig = (
            Signature.select()
            .where(Signature.version == v)
            .order_by(Signature.created_at.desc(), Signature.id.desc())
            .first()
        )
        if sig is None:
            raise RegistryError(
                409,
                "unsigned",
                f"model {v.model.name!r} version {v.version} has no signature",
                "version",
            )
        return ModelRef(
            name=v.model.name,
            version=v.version,
            sha256=v.sha256,
            url=artifact_path(v.model.name, v.version),
            manifest=base64.b64encode(v.manifest.encode("utf-8")).decode("ascii"),
            signature=sig.signature,
            key_id=sig.key_id,
        )

    def deploy(
        self,
        device: str,
        camera: str,
        name: str,
        ref: str | int,
        *,
        actor: str,
        reason: str = "",
        commands: CommandPublisher | None = None,
        topics: Topics | None = None,
    ) -> tuple[Desired, dict]:
        """Make ``camera`` of ``device`` run model ``name`` version or alias ``ref``.

        Stores the deployment (one row per device and camera, plus an audit entry),
        builds the device's whole desired state (every camera's current deployment)
        with the device's next desired version, and queues it, in the same
        transaction, as a retained command on ``{root}/commands/{device}/desired``
        (`enqueue_command`). After commit ``commands.wake()`` has it published at
        once; without ``commands`` it waits for the next pass of a running
        publisher. Desired versions come from a per-device counter, so a number is
        never reused.

        Returns (the desired state, the deployment as a dict plus ``command_id``,
        the queued command's id).
        """
        try:
            out = self._deploy(device, camera, name, ref, actor, reason, topics)
        except RegistryError:
            metrics.DEPLOYS.labels(result="failed").inc()
            raise
        metrics.DEPLOYS.labels(result="ok").inc()
        if commands is not None:
            commands.wake()  # committed (or, inside an outer transaction, at its commit)
        return out

    def _deploy(self, device, camera, name, ref, actor, reason, topics):
        check_name(device, "device", "device id")
        check_name(camera, "camera", "camera name")
        topics = topics or Topics()
        # One deploy per device at a time: two first deploys to a new camera would
        # both insert its row, and interleaved deploys could publish desired states
        # out of version order.
        with exclusive(self.db, f"deploy:{device}"):
            v = self.version(name, ref)
            hardware_note = check_hardware(device, v)  # 409 when it cannot run v
            model_ref = self.model_ref(v)
            desired_version = self.next_desired_version(device)
            t = now()
            row = Deployment.get_or_none(Deployment.device == device, Deployment.camera == camera)
            old = f"{row.model}/v{row.version}" if row is not None else None
            if row is None:
                row = Deployment(device=device, camera=camera)
            row.model = name
            row.version = v.version
            row.desired_version = desired_version
            row.created_at = t
            row.actor = actor
            row.reason = reason or ""
            row.save()
            desired = self.desired_state(device, desired_version, {camera: model_ref})
            command_id = enqueue_command(
                device, topics.desired(device), desired.to_json(), retain=True
            )
            audit(
                actor,
                "deployment.set",
                f"device:{device}/camera:{camera}",
                reason,
                model=name,
                version=v.version,
                ref=str(ref),
                old=old,
                desired_version=desired_version,
                command=command_id,
                hardware=hardware_note,
            )
        return desired, {**self.deployment_dict(row), "command_id": command_id}

    @staticmethod
    def next_desired_version(device: str) -> int:
        """Take the device's next desired-state version (inside the deploy lock)."""
        DesiredCounter.insert(device=device, last_version=0).on_conflict_ignore().execute()
        DesiredCounter.update(last_version=DesiredCounter.last_version + 1).where(
            DesiredCounter.device == device
        ).execute()
        return DesiredCounter.get_by_id(device).last_version

    def desired_state(
        self, device: str, version: int, given: dict[str, ModelRef] | None = None
    ) -> Desired:
        """The device's whole desired state: every camera's current deployment (the
        ``given`` references as they are) and its shadow comparisons, if any
        (`flowfleet.registry.fleet.shadow`; absent when none, as before them), and
        the camera set-up (`flowfleet.registry.fleet.camsetup`: geometry pushed from
        the web UI, the latest snapshot request per camera; absent when none)."""
        given = given or {}
        models = {}
        for d in Deployment.select().where(Deployment.device == device).order_by(Deployment.camera):
            models[d.camera] = given.get(d.camera) or self.model_ref(
                self.version(d.model, d.version)
            )
        shadow = {}
        for r in (
            ShadowRequest.select()
            .where(ShadowRequest.device == device)
            .order_by(ShadowRequest.camera)
        ):
            ref = self.model_ref(self.version(r.model, r.version))
            shadow[r.camera] = ShadowRef(model=ref, share=r.share)
        from .camsetup import desired_setup  # camera set-up: geometry, snapshot requests

        geometry, snapshot = desired_setup(device)
        return Desired(
            device=device,
            version=version,
            models=models,
            shadow=shadow or None,
            geometry=geometry or None,
            snapshot=snapshot or None,
        )

    @staticmethod
    def deployment_dict(d: Deployment) -> dict:
        return {
            "device": d.device,
            "camera": d.camera,
            "model": d.model,
            "version": d.version,
            "desired_version": d.desired_version,
            "created_at": d.created_at,
            "actor": d.actor,
            "reason": d.reason,
        }

    def deployments(self, device: str) -> dict:
        """The current deployments of a device and its last desired version."""
        check_name(device, "device", "device id")
        counter = DesiredCounter.get_or_none(DesiredCounter.device == device)
        rows = Deployment.select().where(Deployment.device == device).order_by(Deployment.camera)
        return {
            "device": device,
            "desired_version": counter.last_version if counter is not None else None,
            "deployments": [self.deployment_dict(d) for d in rows],
        }
