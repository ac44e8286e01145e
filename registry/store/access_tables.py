"""Who may do what, and what they did: users, API tokens, web sessions, login
failures (schema migrations 2 and 6) and the audit trail. Re-exported by `db.py`,
whose ``MODELS`` tuple lists them."""

from __future__ import annotations

import peewee as pw

from .base import BaseModel


class AuditEntry(BaseModel):
    """Who changed what, when and why. Rows are only ever inserted."""

    id = pw.AutoField()
    ts = pw.DoubleField(index=True)
    actor = pw.CharField(max_length=128)
    action = pw.CharField(max_length=64, index=True)
    target = pw.CharField(max_length=256, index=True)
    reason = pw.TextField(default="")
    details = pw.TextField(default="{}", help_text="JSON object")

    class Meta:
        table_name = "audit_entry"


class User(BaseModel):
    """A person or service account that holds API tokens."""

    id = pw.AutoField()
    name = pw.CharField(max_length=64, unique=True)
    role = pw.CharField(max_length=16)
    created_at = pw.DoubleField()
    disabled_at = pw.DoubleField(null=True)
    # Schema migration 6: for web logins; hashlib.scrypt, see registry.websession.
    password_hash = pw.CharField(max_length=255, null=True)

    class Meta:
        table_name = "api_user"


class ApiToken(BaseModel):
    """An API token; only the sha256 of the secret is stored."""

    id = pw.AutoField()
    user = pw.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    token_hash = pw.CharField(max_length=64, unique=True)
    prefix = pw.CharField(max_length=16, help_text="first characters, to recognise a token")
    label = pw.CharField(max_length=128, default="")
    role = pw.CharField(max_length=16, help_text="at most the user's role")
    created_at = pw.DoubleField()
    expires_at = pw.DoubleField(null=True)
    revoked_at = pw.DoubleField(null=True)
    last_used_at = pw.DoubleField(null=True)
    # Schema migration 6: a device token acts for this device only (it may download
    # just the artifacts deployed to it); null for a person's or service's token.
    device = pw.CharField(max_length=64, null=True, index=True)

    class Meta:
        table_name = "api_token"


class WebSession(BaseModel):
    """A browser session (schema migration 6): only the sha256 of the cookie is stored.

    Server-side, so every registry worker sees it and logout or disabling the user
    ends it at once. ``csrf_token`` must accompany every state-changing request the
    session makes (a hidden form field or the ``X-CSRF-Token`` header).
    """

    id_hash = pw.CharField(max_length=64, primary_key=True)
    user = pw.ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
    csrf_token = pw.CharField(max_length=64)
    created_at = pw.DoubleField()
    expires_at = pw.DoubleField(index=True)
    last_seen_at = pw.DoubleField()
    remote = pw.CharField(max_length=64, default="")

    class Meta:
        table_name = "web_session"


class LoginFailure(BaseModel):
    """A failed web login (schema migration 6), kept for rate limiting by user and address."""

    id = pw.AutoField()
    ts = pw.DoubleField(index=True)
    username = pw.CharField(max_length=64, index=True)
    remote = pw.CharField(max_length=64, index=True)

    class Meta:
        table_name = "login_failure"
