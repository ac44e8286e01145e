"""Retention: raw count bins and health beats older than a limit are removed.

The minute, hour and day rollups (`flowfleet.registry.fleet.series`) keep every
count, so totals and series do not change when raw bins go. What retention keeps so
that nothing is counted twice later:

- only bins the device's end-to-end ack already covers go (``seq <= counts_acked``):
  a bin that is re-sent after its raw record went is recognised by the ack and
  stored as a duplicate, not again (`flowfleet.registry.fleet.ingest`);
- each device's newest stored bin stays, so its highest seq is still known, and
  ``device.bins_pruned`` counts what went, so bins received and gaps stay right;
- each device's newest health beat stays (its last health on the dashboard).

Beside them, with their own limits:

- shadow-comparison windows (`prune_shadow_windows`) older than the raw limit too,
  except each device camera's newest (the last agreement an operator saw stays);
- the webhook delivery log (`prune_webhook_log`): deliveries *finished* (delivered or
  given up) longer ago than ``[webhooks] log_retention_days``, with their attempts.
  A delivery still waiting to be sent is never removed.

`prune` and the others work in small transactions under a named lock, so they never
hold the database for long and two registry processes never prune at once;
`RetentionJob` runs them once an hour in the registry.
"""

from __future__ import annotations

import logging
import threading

import peewee as pw

from ..store.db import CountBin, Device, HealthBeat, now
from ..store.locks import exclusive
from ..store.shadow_tables import ShadowWindow
from ..store.webhook_tables import WebhookAttempt, WebhookDelivery
from . import counters

log = logging.getLogger(__name__)

DAY = 86400.0
BATCH = 1000


def prune(db: pw.Database, keep_days: float, at: float | None = None) -> dict[str, int]:
    """Remove raw bins and health beats older than ``keep_days``; returns how many."""
    cutoff = (now() if at is None else at) - keep_days * DAY
    out = {"bins": 0, "health_beats": 0}
    for device, acked in Device.select(Device.id, Device.counts_acked).tuples():
        top = CountBin.select(pw.fn.MAX(CountBin.seq)).where(CountBin.device == device).scalar()
        upto = min(acked or 0, (top or 0) - 1)  # covered by the ack, and not the newest
        while upto > 0:
            with exclusive(db, "retention"):
                ids = [
                    i
                    for (i,) in CountBin.select(CountBin.id)
                    .where(
                        (CountBin.device == device)
                        & (CountBin.seq <= upto)
                        & (CountBin.end < cutoff)
                    )
                    .limit(BATCH)
                    .tuples()
                ]
                if not ids:
                    break
                n = CountBin.delete().where(CountBin.id.in_(ids)).execute()
                Device.update(bins_pruned=pw.fn.COALESCE(Device.bins_pruned, 0) + n).where(
                    Device.id == device
                ).execute()
            out["bins"] += n
        newest = (
            HealthBeat.select(pw.fn.MAX(HealthBeat.seq)).where(HealthBeat.device == device).scalar()
        )
        if newest is not None:
            with exclusive(db, "retention"):
                gone = (
                    HealthBeat.delete()
                    .where(
                        (HealthBeat.device == device)
                        & (HealthBeat.seq < newest)
                        & (HealthBeat.ts < cutoff)
                    )
                    .execute()
                )
                counters.remove_beats(device, gone)  # /api/devices counts stored beats
            out["health_beats"] += gone
    return out


def prune_shadow_windows(db: pw.Database, keep_days: float, at: float | None = None) -> int:
    """Remove shadow-comparison windows that ended more than ``keep_days`` ago, except
    each device camera's newest; returns how many went."""
    cutoff = (now() if at is None else at) - keep_days * DAY
    newest = [
        i
        for (i,) in ShadowWindow.select(pw.fn.MAX(ShadowWindow.id))
        .group_by(ShadowWindow.device, ShadowWindow.camera)
        .tuples()
    ]
    removed = 0
    while True:
        with exclusive(db, "retention"):
            query = ShadowWindow.select(ShadowWindow.id).where(ShadowWindow.end < cutoff)
            if newest:
                query = query.where(ShadowWindow.id.not_in(newest))
            ids = [i for (i,) in query.limit(BATCH).tuples()]
            if not ids:
                return removed
            removed += ShadowWindow.delete().where(ShadowWindow.id.in_(ids)).execute()


def prune_webhook_log(db: pw.Database, keep_days: float, at: float | None = None) -> dict[str, int]:
    """Remove webhook deliveries delivered or given up more than ``keep_days`` ago, and
    their attempts; returns how many of each went."""
    cutoff = (now() if at is None else at) - keep_days * DAY
    finished = pw.fn.COALESCE(WebhookDelivery.delivered_at, WebhookDelivery.given_up_at)
    out = {"webhook_deliveries": 0, "webhook_attempts": 0}
    while True:
        with exclusive(db, "retention"):
            ids = [
                i
                for (i,) in WebhookDelivery.select(WebhookDelivery.id)
                .where(finished.is_null(False) & (finished < cutoff))
                .limit(BATCH)
                .tuples()
            ]
            if not ids:
                return out
            # Attempts first: the log must not depend on the database's cascade.
            out["webhook_attempts"] += (
                WebhookAttempt.delete().where(WebhookAttempt.delivery.in_(ids)).execute()
            )
            out["webhook_deliveries"] += (
                WebhookDelivery.delete().where(WebhookDelivery.id.in_(ids)).execute()
            )


def prune_all(
    db: pw.Database,
    keep_days: float | None,
    webhook_log_days: float | None = None,
    at: float | None = None,
) -> dict[str, int]:
    """Every retention rule: raw bins, health beats and shadow windows after
    ``keep_days``, the webhook delivery log after ``webhook_log_days`` (None or 0:
    kept)."""
    out: dict[str, int] = {}
    if keep_days:
        out.update(prune(db, keep_days, at))
        out["shadow_windows"] = prune_shadow_windows(db, keep_days, at)
    if webhook_log_days:
        out.update(prune_webhook_log(db, webhook_log_days, at))
    return out


class RetentionJob:
    """Runs `prune_all` every ``every_s`` on a thread (first run a minute after start).

    ``keep_days``: raw bins, health beats and shadow windows; ``webhook_log_days``:
    the webhook delivery log (None or 0: kept)."""

    def __init__(
        self,
        db: pw.Database,
        keep_days: float | None,
        every_s: float = 3600.0,
        *,
        webhook_log_days: float | None = None,
    ) -> None:
        self.db = db
        self.keep_days = keep_days
        self.webhook_log_days = webhook_log_days
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, first_after_s: float = 60.0) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(first_after_s,), name="retention", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, wait: float) -> None:
        while not self._stop.wait(wait):
            wait = self.every_s
            try:
                with self.db.connection_context():
                    done = prune_all(self.db, self.keep_days, self.webhook_log_days)
                if any(done.values()):
                    log.info(
                        "retention: removed %s (the rollups keep the counts)",
                        ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in done.items() if n),
                    )
            except Exception:
                log.exception("retention failed; trying again in %.0f s", self.every_s)
