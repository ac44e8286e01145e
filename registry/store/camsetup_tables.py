"""Tables of camera set-up from the browser (schema migration 19): the geometry an
operator pushed to each camera, and the latest calibration snapshot per camera
(docs/webui.md#camera-set-up)."""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class CameraSetup(BaseModel):
    """The lines and zones one camera of a device should count with: one current row
    per (device, camera), sent in the device's desired state. History is in the audit
    trail (``geometry.set``)."""

    id = pw.AutoField()
    device = pw.CharField(max_length=64)
    camera = pw.CharField(max_length=64)
    geometry = pw.TextField(help_text="canonical JSON of the contract's DesiredGeometry")
    desired_version = pw.BigIntegerField()
    created_at = pw.DoubleField()
    actor = pw.CharField(max_length=128)

    class Meta:
        table_name = "camera_setup"
        indexes = ((("device", "camera"), True),)


class CameraSnapshot(BaseModel):
    """The latest calibration snapshot asked of one camera: the request (its id is in
    the desired state) and, once the device answered, the JPEG. One row per (device,
    camera); a new request replaces the old image."""

    id = pw.AutoField()
    device = pw.CharField(max_length=64)
    camera = pw.CharField(max_length=64)
    request_id = pw.BigIntegerField()
    requested_at = pw.DoubleField()
    requested_by = pw.CharField(max_length=128)
    image = pw.BlobField(null=True)
    width = pw.IntegerField(null=True)
    height = pw.IntegerField(null=True)
    taken_at = pw.DoubleField(null=True)

    class Meta:
        table_name = "camera_snapshot"
        indexes = ((("device", "camera"), True),)


CAMSETUP_MODELS = (CameraSetup, CameraSnapshot)
