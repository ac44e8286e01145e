"""Database-wide locks so several registry workers never race on one decision.

Check-then-write sequences (is there a signing key yet? does this camera have a
deployment yet?) are correct in one process but race when several workers share a
database. `exclusive` runs such a sequence in a transaction that holds a named lock:

* PostgreSQL: ``pg_advisory_xact_lock`` on a 64-bit key derived from the name,
  released when the transaction ends (commit or rollback), so a crashed worker
  never leaves it held;
* SQLite: ``BEGIN IMMEDIATE``, which takes the database's write lock up front (one
  writer at a time anyway), so a second worker waits (``busy_timeout``) instead of
  failing when it upgrades a read to a write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import peewee as pw


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    digest = hashlib.sha256(b"flowfleet:" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def exclusive(db: pw.Database, name: str) -> Iterator[None]:
    """A transaction holding the lock ``name`` until it commits or rolls back.

    Inside an enclosing transaction on SQLite it is a savepoint of that transaction
    (which then decides the locking); on PostgreSQL the advisory lock is taken in
    the enclosing transaction and held until it ends.
    """
    if isinstance(db, pw.PostgresqlDatabase):
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock_key(name),))
            yield
    elif isinstance(db, pw.SqliteDatabase) and db.transaction_depth() == 0:
        with db.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield
