"""Webhook tables (schema migration 16): endpoints, their delivery log, the audit cursor.

Webhooks are fed from the audit trail (`flowfleet.registry.store.audit`): the
dispatcher (`flowfleet.registry.fleet.webhooks`) reads new `AuditEntry` rows in id
order and queues one `WebhookDelivery` per matching webhook; the sender POSTs them.
Kept out of ``db.py`` (already the largest module); the models share its
`BaseModel` and therefore its database proxy.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class Webhook(BaseModel):
    """A receiver of signed JSON events: a URL, a shared secret and event patterns.

    ``secret`` is kept in clear: the registry must sign with it (unlike API tokens it
    cannot be stored as a hash). ``since_entry`` is the id of the audit entry that
    recorded its creation: it is sent only the events after it.
    """

    id = pw.AutoField()
    name = pw.CharField(max_length=64, unique=True)
    url = pw.TextField()
    secret = pw.CharField(max_length=256)
    events = pw.TextField(help_text="JSON list of shell-style patterns of audit actions")
    enabled = pw.BooleanField(default=True)
    since_entry = pw.BigIntegerField(default=0)
    created_at = pw.DoubleField()
    created_by = pw.CharField(max_length=128)
    updated_at = pw.DoubleField(null=True)
    disabled_reason = pw.TextField(null=True)

    class Meta:
        table_name = "webhook"


class WebhookDelivery(BaseModel):
    """One event for one webhook, and where its sending stands.

    ``audit_entry`` is NULL for a test ping; (webhook, audit_entry) is unique, so an
    entry is queued once per webhook however many dispatchers scan it. A sender claims
    the row by moving ``next_attempt_at`` forward (like the commands outbox).
    ``round_start`` is ``attempts`` when it was last (re)queued: the attempt limit
    counts from there, so a redelivery gets a fresh set of attempts.
    """

    id = pw.AutoField()
    webhook = pw.ForeignKeyField(Webhook, backref="deliveries", on_delete="CASCADE")
    audit_entry = pw.BigIntegerField(null=True)
    event = pw.CharField(max_length=64)
    payload = pw.TextField(help_text="JSON of the audit entry as sent (entry)")
    created_at = pw.DoubleField()
    queued_at = pw.DoubleField(help_text="created, or last requeued by a redelivery")
    attempts = pw.IntegerField(default=0)
    round_start = pw.IntegerField(default=0)
    status_code = pw.IntegerField(null=True)
    last_error = pw.TextField(null=True)
    next_attempt_at = pw.DoubleField(default=0.0)
    delivered_at = pw.DoubleField(null=True)
    given_up_at = pw.DoubleField(null=True)

    class Meta:
        table_name = "webhook_delivery"
        indexes = (
            (("webhook", "audit_entry"), True),
            (("delivered_at", "given_up_at", "next_attempt_at"), False),
        )


class WebhookAttempt(BaseModel):
    """One HTTP attempt of a delivery: the log an operator reads when a receiver fails."""

    id = pw.AutoField()
    delivery = pw.ForeignKeyField(WebhookDelivery, backref="attempt_log", on_delete="CASCADE")
    number = pw.IntegerField()
    started_at = pw.DoubleField()
    duration_ms = pw.DoubleField()
    status_code = pw.IntegerField(null=True)
    error = pw.TextField(null=True)

    class Meta:
        table_name = "webhook_attempt"
        indexes = ((("delivery", "number"), False),)


class WebhookCursor(BaseModel):
    """How far the dispatcher has read the audit trail: every entry up to ``last_id``
    is dispatched. ``gap_since``: when the dispatcher first saw the id after
    ``last_id`` missing while later ones exist (a transaction still open on
    PostgreSQL, or one rolled back)."""

    name = pw.CharField(max_length=32, primary_key=True)
    last_id = pw.BigIntegerField(default=0)
    gap_since = pw.DoubleField(null=True)
    updated_at = pw.DoubleField()

    class Meta:
        table_name = "webhook_cursor"


# Created by schema migration 16, children after parents.
WEBHOOK_MODELS: tuple[type[BaseModel], ...] = (
    Webhook,
    WebhookDelivery,
    WebhookAttempt,
    WebhookCursor,
)
