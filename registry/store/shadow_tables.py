"""Tables of shadow comparisons (schema migration 15): what the registry asked devices
to compare, and the comparison windows they sent (docs/registry.md#shadow)."""

from __future__ import annotations

import peewee as pw

from .db import BaseModel, Device


class ShadowRequest(BaseModel):
    """The candidate model one camera of a device should run in shadow: one current
    row per (device, camera), like `Deployment`. Its history is in the audit trail
    (``shadow.set``, ``shadow.clear``)."""

    id = pw.AutoField()
    device = pw.CharField(max_length=64)
    camera = pw.CharField(max_length=64)
    model = pw.CharField(max_length=64)
    version = pw.IntegerField()
    share = pw.DoubleField(null=True, help_text="share of frames; NULL: the agent's default")
    desired_version = pw.BigIntegerField()
    created_at = pw.DoubleField()
    actor = pw.CharField(max_length=128)
    reason = pw.TextField(default="")

    class Meta:
        table_name = "shadow_request"
        indexes = ((("device", "camera"), True),)


class ShadowWindow(BaseModel):
    """One camera's shadow-comparison window as received; (device, seq) is unique.

    The columns the API filters on and the count gate sums are copied out of
    ``payload`` (the validated message, canonical JSON).
    """

    id = pw.AutoField()
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    camera = pw.CharField(max_length=64)
    start = pw.DoubleField(column_name="window_start")
    end = pw.DoubleField(column_name="window_end")
    active_model = pw.TextField(null=True, help_text="registry model name, else the file")
    active_version = pw.IntegerField(null=True)
    candidate_model = pw.TextField(null=True, help_text="registry model name, else the file")
    candidate_version = pw.IntegerField(null=True)
    frames = pw.BigIntegerField()
    frames_compared = pw.BigIntegerField()
    boxes_active = pw.BigIntegerField()
    boxes_candidate = pw.BigIntegerField()
    matched = pw.BigIntegerField()
    agreement = pw.DoubleField(null=True)
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        table_name = "shadow_window"
        indexes = (
            (("device", "seq"), True),
            (("device", "camera", "start"), False),
        )


SHADOW_MODELS: tuple[type[BaseModel], ...] = (ShadowRequest, ShadowWindow)
