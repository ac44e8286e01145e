"""Tables of the drift judge (schema migration 13): `flowfleet.registry.fleet.drift`.

* `DriftCamera`: per device and camera, the model its windows run now and the
  activation being judged (what the judge remembers between passes);
* `DriftActivation`: one change of a camera's model, with the previous model's
  pooled baseline and what became of it (judging, accepted, rolled back, ...);
* `DriftVerdict`: one judged window: statistics, thresholds, verdict;
* `DriftCursor`: the last drift summary id the judge has read (incremental passes).

JSON columns hold the statistics and thresholds as the judge computed them, so a
verdict can be explained later without recomputing it.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel, Device

ACTIVATION_STATES = ("judging", "accepted", "rolled_back", "restored", "no_baseline")


class DriftActivation(BaseModel):
    """A camera's switch from ``previous_model`` to ``model`` (seen in its windows)."""

    id = pw.AutoField()
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    camera = pw.CharField(max_length=64)
    model = pw.TextField(null=True)
    previous_model = pw.TextField(null=True)
    started_at = pw.DoubleField(help_text="start of the new model's first window")
    baseline = pw.TextField(null=True, help_text="JSON: the previous model's pooled windows")
    baseline_ids = pw.TextField(default="[]", help_text="JSON list of drift_summary ids")
    state = pw.CharField(max_length=16, default="judging")
    recent = pw.TextField(default="", help_text="judged windows, oldest first: b/e/o per window")
    recent_ids = pw.TextField(default="[]", help_text="JSON: drift_summary ids of `recent`")
    judged = pw.IntegerField(default=0)
    rolled_back_at = pw.DoubleField(null=True)
    environment_at = pw.DoubleField(null=True)
    created_at = pw.DoubleField()

    class Meta:
        table_name = "drift_activation"
        indexes = ((("device", "camera", "started_at"), False),)


class DriftCamera(BaseModel):
    """What the judge knows of one camera: its model now and its open activation."""

    id = pw.AutoField()
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    camera = pw.CharField(max_length=64)
    model = pw.TextField(null=True)
    last_start = pw.DoubleField()
    activation = pw.ForeignKeyField(DriftActivation, null=True, on_delete="SET NULL")
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "drift_camera"
        indexes = ((("device", "camera"), True),)


class DriftVerdict(BaseModel):
    """One judged window of a new model against its previous model's baseline."""

    id = pw.AutoField()
    # The drift_summary id, not a foreign key: a verdict is evidence (an audit entry
    # may cite it) and outlives its summary if summaries are ever pruned.
    summary = pw.BigIntegerField(unique=True)
    activation = pw.ForeignKeyField(DriftActivation, on_delete="CASCADE")
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    camera = pw.CharField(max_length=64)
    model = pw.TextField(null=True)
    baseline_model = pw.TextField(null=True)
    start = pw.DoubleField(column_name="window_start")
    end = pw.DoubleField(column_name="window_end")
    verdict = pw.CharField(max_length=16)
    statistics = pw.TextField(default="{}", help_text="JSON")
    thresholds = pw.TextField(default="{}", help_text="JSON")
    breaches = pw.TextField(default="[]", help_text="JSON list of statistic names")
    reason = pw.TextField(default="")
    created_at = pw.DoubleField()

    class Meta:
        table_name = "drift_verdict"
        indexes = (
            (("device", "camera", "start"), False),
            (("created_at",), False),
        )


class DriftCursor(BaseModel):
    """The highest drift_summary id a judge pass has read, per judge name."""

    name = pw.CharField(max_length=64, primary_key=True)
    last_id = pw.BigIntegerField(default=0)
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "drift_cursor"


DRIFT_MODELS: tuple[type[BaseModel], ...] = (
    DriftActivation,
    DriftCamera,
    DriftVerdict,
    DriftCursor,
)
