"""Helpers for tests that run the registry on both database engines.

`temporary_database(kind, tmp_path)` yields a database URL: a SQLite file in
``tmp_path``, or a freshly created PostgreSQL database with a random name on the
server named by ``$FLOWFLEET_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), dropped afterwards. An
unreachable server raises (tests must fail loudly, never skip).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import peewee as pw
from playhouse.pool import PooledDatabase

from .store import db as regdb

POSTGRES_ENV = "FLOWFLEET_TEST_POSTGRES"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
KINDS = ("sqlite", "postgresql")


class PostgresUnavailable(RuntimeError):
    pass


def _admin_connection(admin_url: str):
    import psycopg2

    params = regdb.postgres_params(admin_url)
    params["dbname"] = params.pop("database")
    try:
        conn = psycopg2.connect(connect_timeout=5, **params)
    except psycopg2.OperationalError as exc:
        raise PostgresUnavailable(
            f"PostgreSQL test server {regdb.redact_url(admin_url)} is not reachable "
            f"(set ${POSTGRES_ENV} or start it): {str(exc).strip()}"
        ) from None
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def temporary_postgres(admin_url: str | None = None) -> Iterator[str]:
    """Create a database with a random name, yield its URL, drop it afterwards."""
    admin_url = admin_url or os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES
    name = f"flowfleet_test_{secrets.token_hex(6)}"
    conn = _admin_connection(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        base = admin_url.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        release()
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextlib.contextmanager
def temporary_database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        try:
            yield str(tmp_path / "registry.db")
        finally:
            release()
    elif kind == "postgresql":
        with temporary_postgres() as url:
            yield url
    else:
        raise ValueError(f"unknown database kind {kind!r}")


def reset_database(db: pw.Database) -> None:
    """Bring ``db`` to an empty, fully migrated schema (much cheaper than a new database).

    Tables a test dropped are re-created; every table is emptied.
    """
    from .store.broker_tables import BROKER_MODELS
    from .store.camsetup_tables import CAMSETUP_MODELS
    from .store.counters_tables import COUNTER_MODELS
    from .store.drift_tables import DRIFT_MODELS
    from .store.enrollment_tables import ENROLLMENT_MODELS
    from .store.migrations import migrate
    from .store.relay_tables import RELAY_MODELS
    from .store.rollout_tables import ROLLOUT_MODELS
    from .store.shadow_tables import SHADOW_MODELS
    from .store.webhook_tables import WEBHOOK_MODELS

    migrate(db, backup=False)
    # Tables of later migrations live beside their subsystem, not in store/db.py.
    models = regdb.MODELS + DRIFT_MODELS + ROLLOUT_MODELS + SHADOW_MODELS + WEBHOOK_MODELS
    models += RELAY_MODELS
    models += ENROLLMENT_MODELS
    models += CAMSETUP_MODELS
    models += COUNTER_MODELS
    models += BROKER_MODELS
    with db.connection_context():
        db.create_tables(models, safe=True)
        # DELETE, not TRUNCATE: for a few rows it is far cheaper on PostgreSQL (TRUNCATE
        # rewrites every table's files). Children first, for the foreign keys.
        with db.atomic():
            for model in reversed(models):
                model.delete().execute()


def fresh_database(url: str) -> str:
    """Empty the shared database at ``url`` for the next test; returns ``url``."""
    release()
    reset_database(regdb.open_database(url))
    return url


def release() -> None:
    """Close the current database's connections and unbind the proxy."""
    current = regdb.database_proxy.obj
    if isinstance(current, pw.Database):
        with contextlib.suppress(Exception):
            current.close()
        if isinstance(current, PooledDatabase):
            # Also connections left checked out by threads that are gone (ingest
            # workers, HTTP handlers): nothing uses this database object any more.
            current.close_idle()
            current.close_stale(age=-1)
        regdb.database_proxy.initialize(None)


def fresh_registry(db_url: str, tmp_path: Path, *, max_upload_bytes: int | None = None):
    """A started `ModelRegistry` on an emptied database at ``db_url``, with its
    artifacts, keys and upload staging under ``tmp_path`` (8 MiB upload limit)."""
    from .catalog.artifacts import LocalStore
    from .catalog.keys import KeyRing
    from .catalog.modelreg import MIB, ModelRegistry

    db = regdb.open_database(db_url)
    reset_database(db)
    reg = ModelRegistry(
        db,
        LocalStore(tmp_path / "artifacts"),
        KeyRing(tmp_path / "keys"),
        max_upload_bytes=max_upload_bytes or 8 * MIB,
        staging_dir=tmp_path / "incoming",
    )
    reg.start()
    return reg
