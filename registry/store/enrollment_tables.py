"""Enrollment tables (schema migration 18): bootstrap tokens, enrollments, re-enrollment.

A *bootstrap token* lets a device that holds nothing else claim an identity
(`flowfleet.registry.fleet.enrollment`): only its sha256 is stored, like API tokens.
Kept out of ``db.py``; the models share its `BaseModel` and database proxy.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class EnrollmentToken(BaseModel):
    """A bootstrap token: ``max_uses`` enrollments (1: single-use) until ``expires_at``,
    into ``group`` (may be NULL); ``auto_accept`` registers the devices it enrolls at
    once, otherwise they arrive unregistered until an operator accepts them.
    ``agent_template`` is TOML the enrolled device's agent.toml starts from (cameras
    and the like); the registry fills in the identity, broker and registry sections."""

    id = pw.AutoField()
    token_hash = pw.CharField(max_length=64, unique=True)
    prefix = pw.CharField(max_length=16)
    label = pw.CharField(max_length=128, default="")
    group = pw.CharField(max_length=64, null=True)
    max_uses = pw.IntegerField(default=1)
    uses = pw.IntegerField(default=0)
    auto_accept = pw.BooleanField(default=False)
    agent_template = pw.TextField(null=True)
    created_at = pw.DoubleField()
    created_by = pw.CharField(max_length=128)
    expires_at = pw.DoubleField()
    revoked_at = pw.DoubleField(null=True)

    class Meta:
        table_name = "enrollment_token"


class Enrollment(BaseModel):
    """One device enrolled by one token (its certificate's serial)."""

    id = pw.AutoField()
    token = pw.ForeignKeyField(EnrollmentToken, backref="enrollments", on_delete="CASCADE")
    device = pw.CharField(max_length=64, index=True)
    serial = pw.CharField(max_length=64)
    not_after = pw.DoubleField()
    enrolled_at = pw.DoubleField()
    remote_addr = pw.CharField(max_length=64, default="")

    class Meta:
        table_name = "enrollment"


class ReenrollAllowance(BaseModel):
    """An operator's permission for one more enrollment of an existing device id."""

    device = pw.CharField(primary_key=True, max_length=64)
    allowed_at = pw.DoubleField()
    allowed_by = pw.CharField(max_length=128)
    expires_at = pw.DoubleField()

    class Meta:
        table_name = "reenroll_allowance"


ENROLLMENT_MODELS = (EnrollmentToken, Enrollment, ReenrollAllowance)
