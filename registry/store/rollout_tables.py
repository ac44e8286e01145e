"""Tables of staged rollouts (schema migration 14): the rollout, one row per target
device, and the job leases that keep the rollout steps a singleton.

The rollout's state machine lives entirely in these rows
(`flowfleet.registry.fleet.rollout_steps`), so a registry restarted mid-rollout picks
it up where it stopped. Devices are plain ids (like `Deployment`), not foreign keys:
a target may be named before it has ever connected.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel

ROLLOUT_STATES = ("running", "paused", "succeeded", "aborting", "aborted")
ACTIVE_ROLLOUT_STATES = ("running", "paused", "aborting")
DEVICE_STATES = (
    "pending",
    "shadowing",
    "moving",
    "soaking",
    "succeeded",
    "failed",
    "rolled_back",
    "timed_out",
    "drifted",
    "reverted",
)
# Device states that count toward the abort criteria, one kind each.
FAILURE_STATES = ("failed", "rolled_back", "timed_out", "drifted")
# A device in one of these has finished (for the abort criteria's minimum).
FINISHED_STATES = ("succeeded", *FAILURE_STATES)


class Rollout(BaseModel):
    """One staged rollout of a model version to one camera name on a set of devices.

    ``version`` is resolved once at creation (``ref`` is what was asked for, a number
    or an alias), so moving an alias mid-rollout cannot split the fleet. ``targets``
    and ``plan`` are the validated JSON as created (`rollout_plan`); ``wave`` is the
    wave now moving (0 is the canary), started at ``wave_started_at``.
    """

    id = pw.AutoField()
    model = pw.CharField(max_length=64)
    version = pw.IntegerField()
    ref = pw.CharField(max_length=64)
    camera = pw.CharField(max_length=64)
    targets = pw.TextField(help_text="JSON: the target spec as given")
    plan = pw.TextField(help_text="JSON: the validated plan, defaults filled in")
    seed = pw.BigIntegerField(help_text="seed of the random canary pick and wave order")
    waves = pw.IntegerField(help_text="the last wave number (0: canary only)")
    state = pw.CharField(max_length=16, default="running", index=True)
    wave = pw.IntegerField(default=0)
    wave_started_at = pw.DoubleField(null=True)
    reason = pw.TextField(default="", help_text="why it was created, paused or aborted")
    created_by = pw.CharField(max_length=128)
    created_at = pw.DoubleField()
    updated_at = pw.DoubleField()
    finished_at = pw.DoubleField(null=True)
    steps = pw.BigIntegerField(default=0, help_text="steps that changed something")

    class Meta:
        table_name = "rollout"


class RolloutDevice(BaseModel):
    """One target device of a rollout: its wave, where it stands and why.

    ``previous_model``/``previous_version`` is what the camera was deployed before the
    rollout moved it (None: no registry deployment), the model an abort or a failure
    puts back. ``desired_version`` is the device's desired-state version the move
    published; a reported state counts only once the device applied that version.
    A canary of a plan with ``shadow_s`` first runs the new model in shadow
    (``shadowing``, from ``shadow_started_at``); ``shadow_agreement`` is what that
    comparison found (None: not judged).
    """

    id = pw.AutoField()
    rollout = pw.ForeignKeyField(Rollout, backref="devices", on_delete="CASCADE")
    device = pw.CharField(max_length=64)
    wave = pw.IntegerField()
    state = pw.CharField(max_length=16, default="pending")
    reason = pw.TextField(default="")
    previous_model = pw.CharField(max_length=64, null=True)
    previous_version = pw.IntegerField(null=True)
    desired_version = pw.BigIntegerField(null=True)
    moved_at = pw.DoubleField(null=True)
    activated_at = pw.DoubleField(null=True)
    finished_at = pw.DoubleField(null=True)
    reverted_at = pw.DoubleField(null=True)
    revert_desired_version = pw.BigIntegerField(null=True)
    shadow_started_at = pw.DoubleField(null=True, help_text="canary shadow phase began")
    shadow_agreement = pw.DoubleField(null=True, help_text="its pooled agreement, once judged")

    class Meta:
        table_name = "rollout_device"
        indexes = (
            (("rollout", "device"), True),
            (("rollout", "wave", "state"), False),
        )


class JobLease(BaseModel):
    """A named lease: the registry process holding it (until ``expires_at``) runs
    that singleton job (`flowfleet.registry.store.leases`)."""

    name = pw.CharField(primary_key=True, max_length=64)
    holder = pw.CharField(max_length=128)
    acquired_at = pw.DoubleField()
    expires_at = pw.DoubleField()

    class Meta:
        table_name = "job_lease"


# Created by schema migration 14 (children after parents).
ROLLOUT_MODELS: tuple[type[BaseModel], ...] = (Rollout, RolloutDevice, JobLease)
