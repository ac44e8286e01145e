"""Webhooks as records: create, list, show, update and delete them; list, show and
redeliver their deliveries; queue a test ping.

Every change is audited (``webhook.create``, ``webhook.update``, ``webhook.delete``,
``webhook.redeliver``, ``webhook.ping``). Those ``webhook.*`` entries are sent only
to webhooks with a pattern that names them (``webhook.*``): a catch-all ``*`` does
not match them, so a webhook never hears about its own changes unless it asks.

Bad input raises `RegistryError` naming the field (400), an unknown webhook or
delivery is a 404, and nothing is changed. Sending is
`flowfleet.registry.fleet.webhooks`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import peewee as pw

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.db import AuditEntry, now
from ..store.webhook_tables import Webhook, WebhookAttempt, WebhookDelivery

MAX_PATTERNS = 32
MAX_URL = 2048
MIN_SECRET = 16
MAX_SECRET = 256
# Audit actions are dotted words; patterns add the shell wildcards * and ?. Character
# classes ([...]) are refused: no action needs one and a stray bracket is a typo.
PATTERN = r"[A-Za-z0-9_.*?-]{1,64}"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
URL_PATTERN = rf"https?://[A-Za-z0-9.-]+(:{_PORT})?([/?#][!-~]*)?"
# Printable ASCII, no space at either end (it would be lost in a config file or a shell).
SECRET_PATTERN = r"[!-~]|[!-~][ -~]*[!-~]"
DELIVERY_ID = r"[1-9][0-9]{0,17}"
STATUSES = ("pending", "delivered", "given_up")
PING = "ping"
PING_MESSAGE = "a test event from the flowfleet registry"


# -- validation ----------------------------------------------------------------------


def check_url(url: object) -> str:
    """An http or https URL with a host (400 naming ``url`` otherwise): printable ASCII
    without spaces (punycode for international names), no user:password@, a port
    from 1 to 65535 if any. `URL_PATTERN` is the whole rule (the OpenAPI document
    states the same)."""
    if not isinstance(url, str) or len(url) > MAX_URL or not re.fullmatch(URL_PATTERN, url):
        raise RegistryError(
            400,
            "invalid_field",
            f"url {url!r} is not an http:// or https:// URL with a host (printable ASCII, "
            f"no spaces, no user@, port 1-65535, at most {MAX_URL} characters)",
            "url",
        )
    return url


def check_patterns(patterns: object) -> list[str]:
    """A non-empty list of event patterns, deduplicated in the given order."""
    if not isinstance(patterns, list) or not patterns:
        raise RegistryError(
            400, "invalid_field", "events must be a non-empty list of patterns", "events"
        )
    if len(patterns) > MAX_PATTERNS:
        raise RegistryError(
            400, "invalid_field", f"events holds at most {MAX_PATTERNS} patterns", "events"
        )
    out: list[str] = []
    for p in patterns:
        if not isinstance(p, str) or not re.fullmatch(PATTERN, p):
            raise RegistryError(
                400,
                "invalid_field",
                f"event pattern {p!r} is not valid: 1-64 of letters, digits, _ . - and the "
                "wildcards * and ? (e.g. drift.* or rollout.abort)",
                "events",
            )
        if p not in out:
            out.append(p)
    return out


def check_secret(secret: object) -> str:
    if (
        not isinstance(secret, str)
        or not MIN_SECRET <= len(secret) <= MAX_SECRET
        or not re.fullmatch(SECRET_PATTERN, secret)
    ):
        raise RegistryError(
            400,
            "invalid_field",
            f"secret must be {MIN_SECRET}-{MAX_SECRET} printable ASCII characters, without "
            "surrounding spaces (leave it out to have one generated)",
            "secret",
        )
    return secret


def _webhook(name: str) -> Webhook:
    check_name(name, "webhook", "webhook name")
    row = Webhook.get_or_none(Webhook.name == name)
    if row is None:
        raise RegistryError(404, "unknown_webhook", f"no webhook {name!r}", "webhook")
    return row


def _delivery(delivery_id: int) -> WebhookDelivery:
    row = WebhookDelivery.get_or_none(WebhookDelivery.id == delivery_id)
    if row is None:
        raise RegistryError(
            404, "unknown_delivery", f"no webhook delivery {delivery_id}", "delivery"
        )
    return row


def entry_dict(entry: AuditEntry) -> dict[str, Any]:
    """An audit entry as a webhook receives it (``entry`` of the payload)."""
    try:
        details = json.loads(entry.details or "{}")
    except ValueError:
        details = {"raw": entry.details}
    return {
        "id": entry.id,
        "ts": entry.ts,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "reason": entry.reason,
        "details": details,
    }


# -- webhooks ------------------------------------------------------------------------


def webhook_dict(row: Webhook) -> dict[str, Any]:
    """A webhook as listed: everything but the secret."""
    return {
        "name": row.name,
        "url": row.url,
        "events": json.loads(row.events),
        "enabled": bool(row.enabled),
        "disabled_reason": row.disabled_reason,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "updated_at": row.updated_at,
    }


def list_webhooks() -> list[dict[str, Any]]:
    return [webhook_dict(w) for w in Webhook.select().order_by(Webhook.name)]


def get_webhook(name: str) -> dict[str, Any]:
    row = _webhook(name)
    out = webhook_dict(row)
    out["deliveries"] = _status_counts(row)
    return out


def _status_counts(row: Webhook) -> dict[str, int]:
    d = WebhookDelivery
    counts = dict.fromkeys(STATUSES, 0)
    for status in STATUSES:
        counts[status] = d.select().where((d.webhook == row) & _status_is(status)).count()
    return counts


def create_webhook(
    db: pw.Database,
    name: str,
    url: str,
    events: list[str],
    *,
    actor: str,
    secret: str | None = None,
    enabled: bool = True,
    reason: str = "",
) -> dict[str, Any]:
    """Create a webhook; returns it with its ``secret`` (the only time it is shown)."""
    check_name(name, "name", "webhook name")
    url = check_url(url)
    patterns = check_patterns(events)
    secret = check_secret(secret) if secret is not None else secrets.token_urlsafe(32)
    with db.atomic():
        if Webhook.select().where(Webhook.name == name).exists():
            raise RegistryError(409, "exists", f"webhook {name!r} already exists", "name")
        # Its own creation entry marks where its events start: the ids after it.
        created = audit(
            actor, "webhook.create", f"webhook:{name}", reason, url=url, events=patterns
        )
        try:
            with db.atomic():
                row = Webhook.create(
                    name=name,
                    url=url,
                    secret=secret,
                    events=json.dumps(patterns),
                    enabled=bool(enabled),
                    since_entry=created.id,
                    created_at=now(),
                    created_by=actor,
                )
        except pw.IntegrityError:  # created meanwhile by another process
            raise RegistryError(409, "exists", f"webhook {name!r} already exists", "name") from None
    out = webhook_dict(row)
    out["secret"] = secret
    return out


def update_webhook(
    db: pw.Database,
    name: str,
    *,
    actor: str,
    url: str | None = None,
    events: list[str] | None = None,
    enabled: bool | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """Change a webhook's URL, patterns or enabled flag (None: unchanged). Enabling
    resumes its pending deliveries; events that happened while it was disabled were
    not queued for it."""
    changes: dict[str, Any] = {}
    if url is not None:
        changes["url"] = check_url(url)
    if events is not None:
        changes["events"] = check_patterns(events)
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise RegistryError(400, "invalid_field", "enabled must be true or false", "enabled")
        changes["enabled"] = enabled
    with db.atomic():
        row = _webhook(name)
        if not changes:
            return get_webhook(name)  # nothing asked: nothing written or audited
        update: dict[str, Any] = {"updated_at": now()}
        if "url" in changes:
            update["url"] = changes["url"]
        if "events" in changes:
            update["events"] = json.dumps(changes["events"])
        if "enabled" in changes:
            update["enabled"] = changes["enabled"]
            update["disabled_reason"] = None if changes["enabled"] else (reason or "by hand")
        Webhook.update(update).where(Webhook.id == row.id).execute()
        audit(actor, "webhook.update", f"webhook:{name}", reason, **changes)
    return get_webhook(name)


def delete_webhook(db: pw.Database, name: str, *, actor: str, reason: str = "") -> None:
    """Delete a webhook and its delivery log."""
    with db.atomic():
        row = _webhook(name)
        deliveries = WebhookDelivery.select(WebhookDelivery.id).where(
            WebhookDelivery.webhook == row
        )
        WebhookAttempt.delete().where(WebhookAttempt.delivery.in_(deliveries)).execute()
        WebhookDelivery.delete().where(WebhookDelivery.webhook == row).execute()
        row.delete_instance()
        audit(actor, "webhook.delete", f"webhook:{name}", reason, url=row.url)


# -- deliveries ----------------------------------------------------------------------


def _status_is(status: str) -> pw.Expression:
    d = WebhookDelivery
    if status == "delivered":
        return d.delivered_at.is_null(False)
    if status == "given_up":
        return d.delivered_at.is_null() & d.given_up_at.is_null(False)
    return d.delivered_at.is_null() & d.given_up_at.is_null()


def delivery_status(row: WebhookDelivery) -> str:
    if row.delivered_at is not None:
        return "delivered"
    return "given_up" if row.given_up_at is not None else "pending"


def delivery_dict(row: WebhookDelivery, webhook: str, *, with_attempts: bool = False) -> dict:
    out = {
        "id": row.id,
        "webhook": webhook,
        "event": row.event,
        "audit_entry": row.audit_entry,
        "status": delivery_status(row),
        "attempts": row.attempts,
        "status_code": row.status_code,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "next_attempt_at": row.next_attempt_at if delivery_status(row) == "pending" else None,
        "delivered_at": row.delivered_at,
        "given_up_at": row.given_up_at,
    }
    if with_attempts:
        log = WebhookAttempt.select().where(WebhookAttempt.delivery == row.id)
        out["attempt_log"] = [
            {
                "number": a.number,
                "started_at": a.started_at,
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error": a.error,
            }
            for a in log.order_by(WebhookAttempt.started_at, WebhookAttempt.id)
        ]
    return out


def list_deliveries(
    *, webhook: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[dict], int]:
    """Deliveries newest first, optionally of one webhook and one status; (page, total)."""
    d = WebhookDelivery
    cond = d.id.is_null(False)
    if webhook is not None:
        cond &= d.webhook == _webhook(webhook).id
    if status is not None:
        if status not in STATUSES:
            raise RegistryError(
                400,
                "invalid_parameter",
                f"status must be one of {', '.join(STATUSES)}, not {status!r}",
                "status",
            )
        cond &= _status_is(status)
    total = d.select().where(cond).count()
    query = (
        d.select(d, Webhook.name)
        .join(Webhook)
        .where(cond)
        .order_by(d.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [delivery_dict(row, row.webhook.name) for row in query], total


def get_delivery(delivery_id: int) -> dict:
    row = _delivery(delivery_id)
    return delivery_dict(row, row.webhook.name, with_attempts=True)


def redeliver(db: pw.Database, delivery_id: int, *, actor: str, reason: str = "") -> dict:
    """Queue a delivery again, now, with a fresh set of attempts (same delivery id, so
    a receiver that already processed it can tell). Its attempt log is kept."""
    with db.atomic():
        row = _delivery(delivery_id)
        if not row.webhook.enabled:
            raise RegistryError(
                409,
                "disabled",
                f"webhook {row.webhook.name!r} is disabled; enable it first",
                "webhook",
            )
        t = now()
        WebhookDelivery.update(
            delivered_at=None,
            given_up_at=None,
            queued_at=t,
            next_attempt_at=t,
            round_start=WebhookDelivery.attempts,
        ).where(WebhookDelivery.id == row.id).execute()
        audit(
            actor,
            "webhook.redeliver",
            f"webhook:{row.webhook.name}",
            reason,
            delivery=row.id,
            event=row.event,
        )
    return get_delivery(delivery_id)


def queue_ping(db: pw.Database, name: str, *, actor: str) -> int:
    """Queue a ``ping`` event for webhook ``name`` whatever its patterns; returns the
    delivery id (the sender sends it at its next pass)."""
    with db.atomic():
        row = _webhook(name)
        if not row.enabled:
            raise RegistryError(
                409, "disabled", f"webhook {name!r} is disabled; enable it first", "webhook"
            )
        # The ping carries its own audit entry, shaped like every other event's.
        entry = audit(actor, "webhook.ping", f"webhook:{name}", "", message=PING_MESSAGE)
        t = now()
        delivery = WebhookDelivery.create(
            webhook=row,
            audit_entry=None,
            event=PING,
            payload=json.dumps(entry_dict(entry), sort_keys=True),
            created_at=t,
            queued_at=t,
            next_attempt_at=t,
        )
    return delivery.id
