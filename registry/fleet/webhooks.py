"""Webhooks fed from the audit trail: a dispatcher queues, a sender POSTs signed JSON.

Every subsystem already records what it does as audit entries (``drift.rollback``,
``rollout.abort``, ``deployment.set``, ...), so webhooks read the trail instead of
being called by each subsystem:

* `dispatch` reads the audit entries after the cursor in id order and queues one
  `WebhookDelivery` per enabled webhook whose patterns match the entry's action
  (`matches`), in one transaction under a named lock. (webhook, audit entry) is
  unique and inserted with "on conflict ignore", so an entry is queued once per
  webhook however many registry processes dispatch.
* The cursor on PostgreSQL: ids are taken when a row is inserted but become visible
  when its transaction commits, so id 9 may appear after id 10 was read. The cursor
  stops before such a gap (later entries are queued anyway; queuing is idempotent) and
  passes it only after ``gap_wait_s`` (a rolled-back transaction never fills it). On
  SQLite there is one writer at a time, so a gap is never filled later and is passed
  at once.
* `send_due` claims due deliveries the way the commands outbox does: a conditional
  update moves ``next_attempt_at`` forward by a lease, so two registry processes never
  send the same delivery at once. Each is POSTed (`post`) with an HMAC-SHA256
  signature; a 2xx answer delivers it; 410 Gone gives it up and disables the webhook
  (the receiver says it is gone for good); anything else (another status, a timeout,
  a refused connection) is retried after an exponential backoff with jitter until
  ``max_attempts`` or ``max_age_s``, then given up. A sender that dies mid-attempt
  leaves the row due again after the lease: delivery is at least once, and receivers
  deduplicate on ``X-Flowfleet-Delivery``.

`WebhookJob` runs both on a thread of the registry service. docs/webhooks.md has the
payload, the headers and how a receiver verifies the signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import peewee as pw

from flowfleet import __version__

from .. import metrics
from ..background import BackgroundLoop, thread_connection
from ..store.audit import audit
from ..store.db import AuditEntry, now
from ..store.locks import exclusive
from ..store.webhook_tables import Webhook, WebhookAttempt, WebhookCursor, WebhookDelivery
from .webhook_records import entry_dict

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CURSOR = "audit"
SIGNATURE_HEADER = "X-Flowfleet-Signature"
# Most of a receiver's answer that is read (and kept, shortened, in the error).
MAX_ANSWER = 64 * 1024
OWN_PREFIX = "webhook."


def matches(patterns: list[str], action: str) -> bool:
    """Whether an audit action matches one of a webhook's shell-style patterns.

    ``webhook.*`` actions (changes to webhooks themselves) match only patterns that
    start with ``webhook``: a catch-all ``*`` does not send a webhook its own changes.
    """
    own = action.startswith(OWN_PREFIX)
    return any(fnmatchcase(action, p) for p in patterns if not own or p.startswith(OWN_PREFIX[:-1]))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of
    ``timestamp + "." + body`` under ``secret``."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass(frozen=True)
class WebhookSettings:
    """How webhooks are sent (the ``[webhooks]`` config section, see registry.config)."""

    interval_s: float = 2.0
    timeout_s: float = 10.0
    max_attempts: int = 8
    max_age_s: float = 86_400.0
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 3_600.0
    concurrency: int = 4
    batch: int = 100
    gap_wait_s: float = 60.0

    def backoff(self, failures: int) -> float:
        """Wait after the ``failures``-th failure: doubling from ``backoff_initial_s``
        up to ``backoff_max_s``, of which a random half ("equal jitter"), so receivers
        that fail together are not retried in lockstep."""
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures - 1, 30))
        return base / 2 + random.uniform(0, base / 2)

    def lease_s(self) -> float:
        """How long a claimed delivery is left alone: past the attempt's timeout."""
        return 2 * self.timeout_s + 30.0


# -- dispatch ------------------------------------------------------------------------


def dispatch(db: pw.Database, settings: WebhookSettings | None = None) -> int:
    """Queue the deliveries of the audit entries after the cursor; returns how many
    were queued. Safe to run in several processes at once."""
    settings = settings or WebhookSettings()
    with exclusive(db, "webhooks.dispatch"):
        webhooks = [
            (w.id, json.loads(w.events), w.since_entry)
            for w in Webhook.select(Webhook.id, Webhook.events, Webhook.since_entry).where(
                Webhook.enabled == True  # noqa: E712 (peewee expression)
            )
        ]
        cursor = WebhookCursor.get_or_none(WebhookCursor.name == CURSOR)
        if cursor is None:
            # First run: start after the newest entry, or before the oldest webhook's
            # first event if entries came after a webhook was created.
            top = AuditEntry.select(pw.fn.MAX(AuditEntry.id)).scalar() or 0
            start = min([since for _, _, since in webhooks] + [top])
            cursor = WebhookCursor.create(name=CURSOR, last_id=start, updated_at=now())
        entries = list(
            AuditEntry.select()
            .where(AuditEntry.id > cursor.last_id)
            .order_by(AuditEntry.id)
            .limit(settings.batch)
        )
        rows = []
        t = now()
        for entry in entries:
            payload = None
            for webhook_id, patterns, since in webhooks:
                if entry.id <= since or not matches(patterns, entry.action):
                    continue
                payload = payload or json.dumps(entry_dict(entry), sort_keys=True)
                rows.append(
                    {
                        "webhook": webhook_id,
                        "audit_entry": entry.id,
                        "event": entry.action[:64],
                        "payload": payload,
                        "created_at": t,
                        "queued_at": t,
                        "next_attempt_at": t,
                    }
                )
        queued = 0
        for start in range(0, len(rows), 200):
            insert = WebhookDelivery.insert_many(rows[start : start + 200]).on_conflict_ignore()
            queued += insert.as_rowcount().execute()
        # Ids at or below every enabled webhook's first event concern none of them: a
        # gap there is passed at once (so is any gap while no webhook is enabled).
        floor = min((since for _, _, since in webhooks), default=None)
        _advance(db, cursor, [e.id for e in entries], settings, t, floor)
    return queued


def _advance(
    db: pw.Database,
    cursor: WebhookCursor,
    ids: list[int],
    settings: WebhookSettings,
    t: float,
    floor: int | None,
) -> None:
    """Move the cursor over the contiguous ids read, over a gap that lasted, and over a
    gap no webhook cares about (ids up to ``floor``; None: no webhook is enabled)."""
    last, gap_since = cursor.last_id, cursor.gap_since
    wait = settings.gap_wait_s if isinstance(db, pw.PostgresqlDatabase) else 0.0
    for entry_id in ids:
        unwatched = floor is None or entry_id - 1 <= floor
        if entry_id != last + 1 and not unwatched:
            if gap_since is None:
                gap_since = t
            if t - gap_since < wait:
                break
            log.debug(
                "webhooks: audit entries %d..%d never appeared; passing", last + 1, entry_id - 1
            )
        last, gap_since = entry_id, None
    WebhookCursor.update(last_id=last, gap_since=gap_since, updated_at=t).where(
        WebhookCursor.name == CURSOR
    ).execute()


# -- sending -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one HTTP attempt got: a status code, or an error without one."""

    status: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a new address: the signature names the URL's owner."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def build_request(delivery: WebhookDelivery, webhook: Webhook, at: float) -> tuple[bytes, dict]:
    """The body and headers of one attempt (the timestamp is the attempt's)."""
    entry = json.loads(delivery.payload)
    body = json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "delivery": delivery.id,
            "webhook": webhook.name,
            "event": delivery.event,
            "time": entry.get("ts"),
            "entry": entry,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")
    timestamp = str(int(at))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"flowfleet-registry/{__version__}",
        "X-Flowfleet-Event": delivery.event,
        "X-Flowfleet-Delivery": str(delivery.id),
        "X-Flowfleet-Timestamp": timestamp,
        SIGNATURE_HEADER: sign(webhook.secret, timestamp, body),
    }
    return body, headers


def post(url: str, body: bytes, headers: dict, timeout_s: float) -> Outcome:
    """POST ``body`` to ``url``; never raises (the error is in the outcome).
    ``timeout_s`` bounds the connection and each read."""
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with _OPENER.open(request, timeout=timeout_s) as resp:
            status = resp.status
            resp.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            answer = exc.read(MAX_ANSWER).decode("utf-8", "replace").strip()
        except Exception:
            answer = ""
        error = f"HTTP {exc.code} {exc.reason}" + (f": {answer[:200]}" if answer else "")
        if 300 <= exc.code < 400:
            error += " (redirects are not followed)"
    except urllib.error.URLError as exc:
        error = f"cannot reach {url}: {exc.reason}"
    except TimeoutError:
        error = f"no answer within {timeout_s:g} s"
    except Exception as exc:  # a reset connection, a bad TLS certificate, ...
        error = f"{type(exc).__name__}: {exc}"
    if error is not None and "timed out" in error:
        error = f"no answer within {timeout_s:g} s ({error})"
    return Outcome(status, error, round((time.monotonic() - started) * 1000.0, 1))


def _pending() -> pw.Expression:
    return WebhookDelivery.delivered_at.is_null() & WebhookDelivery.given_up_at.is_null()


class WebhookSender:
    """Sends due deliveries (see the module docstring); several may share a database."""

    def __init__(self, db: pw.Database, settings: WebhookSettings | None = None) -> None:
        self.db = db
        self.settings = settings or WebhookSettings()
        self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="webhook")
        self.sent = 0
        self.delivered = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def send_due(self, only: list[int] | None = None) -> int:
        """Claim the due deliveries (``only``: of these ids) and send them, several at
        a time; returns how many were attempted."""
        t = now()
        d = WebhookDelivery
        cond = _pending() & (d.next_attempt_at <= t) & (Webhook.enabled == True)  # noqa: E712
        if only is not None:
            cond &= d.id.in_(only)
        rows = list(
            d.select(d, Webhook)
            .join(Webhook)
            .where(cond)
            .order_by(d.next_attempt_at, d.id)
            .limit(self.settings.batch)
        )
        claimed = [row for row in rows if self._claim(row, t)]
        if not claimed:
            return 0
        list(self._pool.map(self._attempt, claimed))
        return len(claimed)

    def _claim(self, row: WebhookDelivery, t: float) -> bool:
        d = WebhookDelivery
        done = (
            d.update(attempts=d.attempts + 1, next_attempt_at=t + self.settings.lease_s())
            .where(
                (d.id == row.id)
                & (d.attempts == row.attempts)
                & _pending()
                & (d.next_attempt_at <= t)
            )
            .execute()
        )
        if done:
            row.attempts += 1
        return bool(done)

    def _attempt(self, row: WebhookDelivery) -> None:
        with thread_connection(self.db):
            try:
                self._send(row)
            except Exception:
                # The row stays claimed until its lease ends, then it is tried again.
                log.exception("webhooks: delivery %d failed unexpectedly", row.id)

    def _send(self, row: WebhookDelivery) -> None:
        webhook: Webhook = row.webhook
        started = now()
        body, headers = build_request(row, webhook, started)
        outcome = post(webhook.url, body, headers, self.settings.timeout_s)
        self.sent += 1
        t = now()
        d = WebhookDelivery
        with self.db.atomic():
            WebhookAttempt.create(
                delivery=row.id,
                number=row.attempts,
                started_at=started,
                duration_ms=outcome.duration_ms,
                status_code=outcome.status,
                error=outcome.error,
            )
            mine = (d.id == row.id) & (d.attempts == row.attempts) & _pending()
            if outcome.ok:
                d.update(delivered_at=t, status_code=outcome.status, last_error=None).where(
                    mine
                ).execute()
                self.delivered += 1
                metrics.WEBHOOK_ATTEMPTS.labels("delivered").inc()
                return
            update: dict[str, Any] = {"status_code": outcome.status, "last_error": outcome.error}
            failures = row.attempts - row.round_start
            delay = self.settings.backoff(failures)
            if outcome.status == 410:
                update["given_up_at"] = t
                update["last_error"] = f"{outcome.error} (the webhook is disabled)"
                self._disable(webhook, "the receiver answered 410 Gone")
            elif (
                failures >= self.settings.max_attempts
                or t + delay - row.queued_at > self.settings.max_age_s
            ):
                update["given_up_at"] = t
            else:
                update["next_attempt_at"] = t + delay
            d.update(update).where(mine).execute()
        metrics.WEBHOOK_ATTEMPTS.labels("given_up" if "given_up_at" in update else "failed").inc()
        if "given_up_at" in update:
            log.warning(
                "webhooks: gave up delivery %d (%s) to %s after %d attempts: %s",
                row.id,
                row.event,
                webhook.name,
                failures,
                outcome.error,
            )

    def _disable(self, webhook: Webhook, reason: str) -> None:
        changed = (
            Webhook.update(enabled=False, disabled_reason=reason, updated_at=now())
            .where((Webhook.id == webhook.id) & (Webhook.enabled == True))  # noqa: E712
            .execute()
        )
        if changed:
            log.warning("webhooks: disabled %s: %s", webhook.name, reason)
            audit("webhooks", "webhook.disable", f"webhook:{webhook.name}", reason, url=webhook.url)


class WebhookJob(BackgroundLoop):
    """Dispatches and sends every ``interval_s`` on a thread of the registry service;
    `wake` (a ping, a redelivery) runs a pass now."""

    thread_name = "registry-webhooks"
    what = "webhooks: a pass"

    def __init__(self, db: pw.Database, settings: WebhookSettings | None = None) -> None:
        super().__init__()
        self.db = db
        self.settings = settings or WebhookSettings()
        self.sender = WebhookSender(db, self.settings)

    def stop(self) -> None:
        self.stop_thread()
        self.sender.close()

    def join_s(self) -> float:
        return self.settings.timeout_s + 10

    def wait_s(self) -> float:
        return self.settings.interval_s

    def run_once(self) -> tuple[int, int]:
        """One pass: (deliveries queued, deliveries attempted)."""
        with thread_connection(self.db):
            queued = dispatch(self.db, self.settings)
            return queued, self.sender.send_due()

    def run_pass(self) -> bool:
        queued, sent = self.run_once()
        return queued >= self.settings.batch or sent >= self.settings.batch
