"""Leases: one registry process at a time runs a singleton job (the rollout steps).

A lease is a row (`JobLease`) naming its holder and an expiry. `acquire` renews it
with a conditional UPDATE (the row is ours) or takes it over with another (the row
has expired); each is atomic on SQLite and PostgreSQL alike, so two processes never
both believe they hold it. A holder that dies simply stops renewing: another process takes over
once the lease expires. The lease only saves duplicate work; each step of a job
still runs in a transaction under `exclusive`, so even two holders (a lease that
expired mid-step) never apply one step twice.
"""

from __future__ import annotations

import peewee as pw

from .db import now
from .rollout_tables import JobLease


def acquire(db: pw.Database, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew lease ``name`` for ``holder`` for ``ttl_s`` seconds; True when held."""
    t = now()
    with db.atomic():
        JobLease.insert(
            name=name, holder=holder, acquired_at=t, expires_at=t + ttl_s
        ).on_conflict_ignore().execute()
        renewed = (
            JobLease.update(expires_at=t + ttl_s)
            .where((JobLease.name == name) & (JobLease.holder == holder))
            .execute()
        )
        if renewed:
            return True
        taken = (
            JobLease.update(holder=holder, acquired_at=t, expires_at=t + ttl_s)
            .where((JobLease.name == name) & (JobLease.expires_at < t))
            .execute()
        )
    return bool(taken)


def release(db: pw.Database, name: str, holder: str) -> None:
    """Give lease ``name`` up now (a clean stop), if ``holder`` has it."""
    with db.atomic():
        JobLease.update(expires_at=0.0).where(
            (JobLease.name == name) & (JobLease.holder == holder)
        ).execute()


def holder_of(name: str) -> dict | None:
    """Who holds lease ``name`` and until when (None: never taken)."""
    row = JobLease.get_or_none(JobLease.name == name)
    if row is None:
        return None
    return {
        "holder": row.holder,
        "acquired_at": row.acquired_at,
        "expires_at": row.expires_at,
        "held": row.expires_at > now(),
    }
