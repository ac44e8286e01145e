"""The model catalogue's tables (schema migration 2): models, their versions, aliases,
signing keys and signatures. Re-exported by `db.py`, whose ``MODELS`` tuple lists them."""

from __future__ import annotations

import peewee as pw

from .base import BaseModel


class RegistryModel(BaseModel):
    """A model name; its versions are numbered 1, 2, ... and numbers are never reused."""

    id = pw.AutoField()
    name = pw.CharField(max_length=64, unique=True)
    created_at = pw.DoubleField()
    created_by = pw.CharField(max_length=128)
    # Highest version number ever given (deleted versions keep their number).
    last_version = pw.IntegerField(default=0)

    class Meta:
        table_name = "model"


class ModelVersion(BaseModel):
    """One uploaded artifact: immutable bytes (stored by sha256) plus what we read from them."""

    id = pw.AutoField()
    model = pw.ForeignKeyField(RegistryModel, backref="versions", on_delete="RESTRICT")
    version = pw.IntegerField()
    sha256 = pw.CharField(max_length=64, unique=True)
    size = pw.BigIntegerField()
    runtime = pw.CharField(max_length=16)
    filename = pw.CharField(max_length=255)
    metadata = pw.TextField(help_text="JSON read from the file itself")
    manifest = pw.TextField(help_text="canonical JSON document the signatures cover")
    notes = pw.TextField(default="")
    tags = pw.TextField(default="[]", help_text="JSON list of strings")
    created_at = pw.DoubleField()
    created_by = pw.CharField(max_length=128)

    class Meta:
        table_name = "model_version"
        indexes = ((("model", "version"), True),)


class Alias(BaseModel):
    """A movable name (``production``, ``staging``, ...) pointing at one version of a model."""

    id = pw.AutoField()
    model = pw.ForeignKeyField(RegistryModel, backref="aliases", on_delete="RESTRICT")
    name = pw.CharField(max_length=64)
    version = pw.ForeignKeyField(ModelVersion, backref="aliases", on_delete="RESTRICT")
    updated_at = pw.DoubleField()
    updated_by = pw.CharField(max_length=128)

    class Meta:
        table_name = "model_alias"
        indexes = ((("model", "name"), True),)


class SigningKey(BaseModel):
    """A registry signing key; the private half lives in a 0600 file, never here."""

    key_id = pw.CharField(max_length=32, primary_key=True)
    public_key = pw.CharField(max_length=64, help_text="raw 32-byte ed25519 key, base64")
    created_at = pw.DoubleField()
    # Set when a newer key took over: still accepted for verification until expires_at.
    retired_at = pw.DoubleField(null=True)
    expires_at = pw.DoubleField(null=True)

    class Meta:
        table_name = "signing_key"


class Signature(BaseModel):
    """An ed25519 signature of one version's manifest by one key."""

    id = pw.AutoField()
    version = pw.ForeignKeyField(ModelVersion, backref="signatures", on_delete="CASCADE")
    key = pw.ForeignKeyField(SigningKey, column_name="key_id", on_delete="RESTRICT")
    signature = pw.CharField(max_length=128, help_text="base64")
    created_at = pw.DoubleField()

    class Meta:
        table_name = "model_signature"
        indexes = ((("version", "key"), True),)
