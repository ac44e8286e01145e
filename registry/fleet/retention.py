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

`prune` works in small transactions under a named lock, so it never holds the
database for long and two registry processes never prune at once; `RetentionJob`
runs it once an hour in the registry.
"""

from __future__ import annotations

import logging
import threading

import peewee as pw

from ..store.db import CountBin, Device, HealthBeat, now
from ..store.locks import exclusive

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
                out["health_beats"] += (
                    HealthBeat.delete()
                    .where(
                        (HealthBeat.device == device)
                        & (HealthBeat.seq < newest)
                        & (HealthBeat.ts < cutoff)
                    )
                    .execute()
                )
    return out


class RetentionJob:
    """Runs `prune` every ``every_s`` on a thread (first run a minute after start)."""

    def __init__(self, db: pw.Database, keep_days: float, every_s: float = 3600.0) -> None:
        self.db = db
        self.keep_days = keep_days
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
                    done = prune(self.db, self.keep_days)
                if any(done.values()):
                    log.info(
                        "retention: removed %d raw count bins and %d health beats older "
                        "than %g days (the rollups keep the counts)",
                        done["bins"],
                        done["health_beats"],
                        self.keep_days,
                    )
            except Exception:
                log.exception("retention failed; trying again in %.0f s", self.every_s)
