"""The registry's database: peewee models behind one `DatabaseProxy`.

Every model is bound to :data:`database_proxy`, never to a concrete database, so the
same code runs on SQLite (the embedded default, in WAL mode) and PostgreSQL:
:func:`open_database` picks the engine from a URL or path, points the proxy at it and
applies the numbered schema migrations (`flowfleet.registry.store.migrations`).

The proxy is process-wide, so a process works with one registry database at a time;
opening the same database again returns the database object that is already open.

Times are stored as float seconds since the Unix epoch (UTC), like the wire contract.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import peewee as pw

from flowfleet import speedhist

from .access_tables import ApiToken, AuditEntry, LoginFailure, User, WebSession
from .base import BaseModel, database_proxy
from .catalog_tables import Alias, ModelVersion, RegistryModel, Signature, SigningKey

# Applied by peewee to every new connection (each thread has its own). WAL lets the
# web UI read while ingest writes; synchronous=normal is durable across process
# crashes in WAL mode and much faster than full; busy_timeout makes a writer wait for
# the lock instead of failing at once with "database is locked".
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10_000,
}

# Dead letters keep at most this much of the offending payload.
DEAD_LETTER_MAX_BYTES = 64 * 1024

DEVICE_STATES = ("online", "offline", "unknown")


class Device(BaseModel):
    """One device, keyed by the id it authenticates with (its topic segment)."""

    id = pw.CharField(primary_key=True, max_length=64)
    first_seen = pw.DoubleField()
    last_seen = pw.DoubleField(null=True)
    state = pw.CharField(max_length=16, default="unknown")
    state_since = pw.DoubleField(null=True)
    agent_version = pw.CharField(max_length=128, null=True)
    # End-to-end acknowledgement (migration 7): every count bin 1..counts_acked is in
    # the registry's custody (stored, dead-lettered, or declared dropped by the
    # device); counts_max is the highest seq received. Sent to the device as its ack.
    # Nullable on purpose: adding a NOT NULL column to SQLite rebuilds the table, and
    # rebuilding `device` inside the migration's transaction would cascade-delete
    # every row that references it. Read through `flowfleet.registry.fleet.ack` (NULL is 0).
    counts_acked = pw.BigIntegerField(null=True, default=0)
    counts_max = pw.BigIntegerField(null=True, default=0)
    # Migration 8: count bins retention removed (they stay in the rollups), so bins
    # received = stored + pruned.
    bins_pruned = pw.BigIntegerField(null=True, default=0)
    # Migration 10: the device as a record (`flowfleet.registry.fleet.devices`). What an
    # operator edits: a display name, description, tags (JSON list), site, location.
    name = pw.CharField(max_length=128, null=True)
    description = pw.TextField(null=True)
    tags = pw.TextField(null=True, help_text="JSON list of strings")
    site = pw.CharField(max_length=64, null=True)
    latitude = pw.DoubleField(null=True)
    longitude = pw.DoubleField(null=True)
    # What the agent reports in its online status (JSON of the contract's Hardware and
    # camera geometry) and when it last did.
    hardware = pw.TextField(null=True, help_text="JSON: the status's hardware")
    cameras = pw.TextField(null=True, help_text="JSON: the status's camera geometry")
    reported_at = pw.DoubleField(null=True)
    # NULL: first seen through telemetry, not accepted by an operator (unregistered).
    accepted_at = pw.DoubleField(null=True)
    accepted_by = pw.CharField(max_length=128, null=True)


class CountBin(BaseModel):
    """One count bin as received; (device, seq) is unique so redelivery is a no-op."""

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    end = pw.DoubleField(column_name="window_end")
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        indexes = ((("device", "seq"), True),)


class LineTotal(BaseModel):
    """One (camera, line, class) entry of one bin; totals are a GROUP BY over these."""

    bin = pw.ForeignKeyField(CountBin, on_delete="CASCADE")
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    camera = pw.CharField(max_length=64)
    line = pw.CharField(max_length=64)
    class_ = pw.CharField(column_name="class", max_length=64)
    count_in = pw.BigIntegerField()
    count_out = pw.BigIntegerField()

    class Meta:
        # Covering index: the totals query reads only the index, never the table.
        indexes = ((("device", "camera", "line", "class_", "count_in", "count_out"), False),)


class ZoneTotal(BaseModel):
    """One (camera, zone, class) entry of one bin."""

    bin = pw.ForeignKeyField(CountBin, on_delete="CASCADE")
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    camera = pw.CharField(max_length=64)
    zone = pw.CharField(max_length=64)
    class_ = pw.CharField(column_name="class", max_length=64)
    entries = pw.BigIntegerField()
    exits = pw.BigIntegerField()
    peak_occupancy = pw.BigIntegerField()
    dwell_s_sum = pw.DoubleField(default=0.0)
    dwell_n = pw.BigIntegerField(default=0)

    class Meta:
        indexes = ((("device", "camera", "zone", "class_"), False),)


class HealthBeat(BaseModel):
    """One health beat; (device, seq) is unique like count bins."""

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    ts = pw.DoubleField()
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        # (device, ts), migration 24: a device's health over a range of time
        # (`flowfleet.registry.fleet.health_series`) reads only that range.
        indexes = ((("device", "seq"), True), (("device", "ts"), False))


class DeadLetter(BaseModel):
    """A message the registry could not accept, with the reason, kept for operators.

    ``device`` is whatever the topic names (possibly a device that does not exist), so
    it is plain text rather than a foreign key.
    """

    id = pw.AutoField()
    received_at = pw.DoubleField(index=True)
    topic = pw.TextField()
    device = pw.CharField(max_length=256, null=True, index=True)
    reason = pw.TextField()
    payload = pw.BlobField(help_text=f"first {DEAD_LETTER_MAX_BYTES} bytes")
    payload_size = pw.IntegerField(help_text="size of the original payload in bytes")
    # Migration 7: the topic's kind and the payload's seq where they could be read (a
    # dead-lettered count bin is in the registry's custody for the device's ack), and
    # the outcome of the last `flowfleet registry dead-letters replay`.
    kind = pw.CharField(max_length=16, null=True)
    seq = pw.BigIntegerField(null=True)
    replayed_at = pw.DoubleField(null=True)
    replay_outcome = pw.CharField(max_length=16, null=True)
    replay_reason = pw.TextField(null=True)


class CountGap(BaseModel):
    """Count bins a device declared it dropped (its outbox cap, policy drop_oldest).

    They will never arrive, so the device's ack may pass over them.
    """

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    first = pw.BigIntegerField()
    last = pw.BigIntegerField()
    declared_at = pw.DoubleField()

    class Meta:
        table_name = "count_gap"
        indexes = ((("device", "last"), False),)


# -- device events and drift summaries (schema migration 3) --------------------------


class Event(BaseModel):
    """One device event (outbox drop, camera failure, ...); (device, seq) is unique.

    Events have their own per-device sequence, separate from count bins and beats.
    The columns the API filters and shows are copied out of ``payload``.
    """

    id = pw.AutoField()
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    ts = pw.DoubleField()
    type = pw.CharField(max_length=64)
    severity = pw.CharField(max_length=16)
    camera = pw.CharField(max_length=64, null=True)
    message = pw.TextField(default="")
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        table_name = "event"
        indexes = (
            (("device", "seq"), True),
            (("ts",), False),  # newest first, fleet-wide
            (("device", "ts"), False),  # newest first, one device
        )


class DriftSummary(BaseModel):
    """One camera's drift window as received; (device, seq) is unique.

    Drift summaries have a fourth per-device sequence (one sequence for all the
    device's cameras).
    """

    id = pw.AutoField()
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    camera = pw.CharField(max_length=64)
    model = pw.TextField(null=True, help_text="model file or version the window ran")
    start = pw.DoubleField(column_name="window_start")
    end = pw.DoubleField(column_name="window_end")
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        table_name = "drift_summary"
        indexes = (
            (("device", "seq"), True),
            (("device", "camera", "start"), False),
        )


# -- reported state (schema migration 4) ---------------------------------------------


class ReportedState(BaseModel):
    """The latest reported state of one device: what each camera runs.

    Reported state is state, not a stream (no seq): one row per device, replaced only
    by a message with a newer ``ts``, so an older retained copy delivered late never
    overwrites a newer one.
    """

    device = pw.ForeignKeyField(Device, column_name="device", primary_key=True, on_delete="CASCADE")
    ts = pw.DoubleField(help_text="when the device took it (the payload's ts)")
    desired_version = pw.BigIntegerField(null=True)
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        table_name = "reported_state"


class DeviceGroup(BaseModel):
    """A named set of devices (schema migration 6): a deployment target."""

    id = pw.AutoField()
    name = pw.CharField(max_length=64, unique=True)
    created_at = pw.DoubleField()
    created_by = pw.CharField(max_length=128)

    class Meta:
        table_name = "device_group"


class DeviceGroupMember(BaseModel):
    """One device in one group (a device may be in several)."""

    id = pw.AutoField()
    group = pw.ForeignKeyField(DeviceGroup, backref="members", on_delete="CASCADE")
    device = pw.CharField(max_length=64, index=True)
    added_at = pw.DoubleField()

    class Meta:
        table_name = "device_group_member"
        indexes = ((("group", "device"), True),)


class Deployment(BaseModel):
    """The model one camera of a device should run: one current row per (device, camera).

    ``desired_version`` is the device's desired-state version published with the
    change that wrote this row (see `DesiredCounter`). The history of deployments is
    in the audit trail (``deployment.set``).
    """

    id = pw.AutoField()
    device = pw.CharField(max_length=64)
    camera = pw.CharField(max_length=64)
    model = pw.CharField(max_length=64)
    version = pw.IntegerField()
    desired_version = pw.BigIntegerField()
    created_at = pw.DoubleField()
    actor = pw.CharField(max_length=128)
    reason = pw.TextField(default="")

    class Meta:
        table_name = "deployment"
        indexes = ((("device", "camera"), True), (("model", "version"), False))


class DesiredCounter(BaseModel):
    """The last desired-state version published per device; only ever grows."""

    device = pw.CharField(primary_key=True, max_length=64)
    last_version = pw.BigIntegerField(default=0)

    class Meta:
        table_name = "desired_counter"


# -- rollups (schema migration 8): counts per time bucket ----------------------------

# Bucket steps as stored in the rollup tables' ``step`` column.
STEPS = {"minute": "m", "hour": "h", "day": "d"}


class _Rollup(BaseModel):
    """One (device, camera, line or zone, class) per time bucket of one step.

    ``bucket`` is the bucket's start (epoch seconds): minutes and hours are aligned
    to UTC, days to midnight in the registry's site timezone. A bin counts in the
    bucket of its window start. Kept by `flowfleet.registry.fleet.series` in the
    transaction that stores the bin, so a rollup always equals the sum of its bins.
    """

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    camera = pw.CharField(max_length=64)
    class_ = pw.CharField(column_name="class", max_length=64)
    step = pw.CharField(max_length=1)
    bucket = pw.DoubleField()
    bins = pw.BigIntegerField(default=0)


class LineRollup(_Rollup):
    line = pw.CharField(max_length=64)
    count_in = pw.BigIntegerField(default=0)
    count_out = pw.BigIntegerField(default=0)

    class Meta:
        table_name = "line_rollup"
        indexes = (
            (("device", "camera", "line", "class_", "step", "bucket"), True),
            (("step", "bucket"), False),
        )


# Migration 12: one device's buckets (the dashboard's device views) are read from this
# index alone. Rows are appended in time order across the fleet, so without it a
# device's day of minutes reads one table page per minute (issue 15; see
# docs/benchmarks.md). It replaces the (device, step, bucket) index, its prefix.
LineRollup.add_index(
    LineRollup.device,
    LineRollup.step,
    LineRollup.bucket,
    LineRollup.camera,
    LineRollup.line,
    LineRollup.class_,
    LineRollup.count_in,
    LineRollup.count_out,
    name="line_rollup_device_step_bucket_values",
)


class ZoneRollup(_Rollup):
    zone = pw.CharField(max_length=64)
    entries = pw.BigIntegerField(default=0)
    exits = pw.BigIntegerField(default=0)
    peak_occupancy = pw.BigIntegerField(default=0)
    dwell_s_sum = pw.DoubleField(default=0.0)
    dwell_n = pw.BigIntegerField(default=0)

    class Meta:
        table_name = "zone_rollup"
        indexes = (
            (("device", "camera", "zone", "class_", "step", "bucket"), True),
            (("device", "step", "bucket"), False),
            (("step", "bucket"), False),
        )


class SpeedRollup(_Rollup):
    """Speeds combine as n, the n-weighted sum of means (mean = kmh_sum / n) and max;
    ``line`` is "" for the camera-wide row (every track that ended). The columns
    `SPEED_HIST_COLUMNS` (migration 11, added below the class) hold the speed
    histogram, one column per bucket of `flowfleet.speedhist.EDGES_KMH`, added up
    like ``n``; they count only tracks from bins that carried a histogram.
    """

    line = pw.CharField(max_length=64)
    n = pw.BigIntegerField(default=0)
    kmh_sum = pw.DoubleField(default=0.0)
    kmh_max = pw.DoubleField(null=True)
    insufficient = pw.BigIntegerField(default=0)

    class Meta:
        table_name = "speed_rollup"
        indexes = (
            (("device", "camera", "line", "class_", "step", "bucket"), True),
            (("device", "step", "bucket"), False),
            (("step", "bucket"), False),
        )


# One additive column per histogram bucket (not a side table): a rollup upsert stays one
# statement per row and a query one SUM per column. Nullable as migration 11 adds them
# to an existing table (a NOT NULL column would make SQLite rebuild it), with a
# database default of 0 so existing rows, and inserts that leave them out, add up
# from 0 rather than staying NULL (NULL + n is NULL).
SPEED_HIST_COLUMNS: tuple[str, ...] = tuple(f"hist_{i:02d}" for i in range(speedhist.BUCKETS))
for _name in SPEED_HIST_COLUMNS:
    SpeedRollup._meta.add_field(
        _name, pw.BigIntegerField(null=True, default=0, constraints=[pw.SQL("DEFAULT 0")])
    )
del _name


class Command(BaseModel):
    """One message to a device (the commands outbox, migration 9).

    Written in the transaction of the change it carries (a deployment writes the
    device's desired state here), then published by `flowfleet.registry.fleet.commands`
    after commit, and marked ``published_at`` once the broker acknowledged it (PUBACK).
    For a retained message only the newest per topic matters: a newer one sets
    ``superseded_by`` on the older unpublished ones, which are then never sent.
    ``next_attempt_at`` is when it is due (again): a publisher claims a row by moving
    it forward (the ack timeout, with backoff), so several registry processes do not
    send the same row at once.
    """

    id = pw.AutoField()
    device = pw.CharField(max_length=64, index=True)
    topic = pw.CharField(max_length=255, index=True)
    payload = pw.BlobField()
    retain = pw.BooleanField(default=False)
    created_at = pw.DoubleField()
    published_at = pw.DoubleField(null=True)
    attempts = pw.IntegerField(default=0)
    last_error = pw.TextField(null=True)
    next_attempt_at = pw.DoubleField(default=0.0)
    superseded_by = pw.BigIntegerField(null=True)

    class Meta:
        table_name = "device_command"
        indexes = ((("published_at", "superseded_by", "next_attempt_at"), False),)


# Tables created by schema migration 1 (the ingest tables) and 2 (the model registry).
# Released migrations never change: new tables go in a new tuple and migration.
INGEST_MODELS: tuple[type[BaseModel], ...] = (
    Device,
    CountBin,
    LineTotal,
    ZoneTotal,
    HealthBeat,
    DeadLetter,
)
REGISTRY_MODELS: tuple[type[BaseModel], ...] = (
    RegistryModel,
    ModelVersion,
    Alias,
    SigningKey,
    Signature,
    AuditEntry,
    User,
    ApiToken,
)
# Created by schema migration 3.
DEVICE_EVENT_MODELS: tuple[type[BaseModel], ...] = (Event, DriftSummary)
# Created by schema migration 4.
REPORTED_MODELS: tuple[type[BaseModel], ...] = (ReportedState,)
# Created by schema migration 5.
DEPLOYMENT_MODELS: tuple[type[BaseModel], ...] = (Deployment, DesiredCounter)
# Created by schema migration 6 (which also adds api_token.device, api_user.password_hash).
ACCESS_AND_GROUP_MODELS: tuple[type[BaseModel], ...] = (
    WebSession,
    LoginFailure,
    DeviceGroup,
    DeviceGroupMember,
)
# Created by schema migration 7 (which also adds device.counts_acked, .counts_max and
# the dead_letter columns kind, seq, replayed_at, replay_outcome, replay_reason).
DELIVERY_MODELS: tuple[type[BaseModel], ...] = (CountGap,)
# Created by schema migration 8.
ROLLUP_MODELS: tuple[type[BaseModel], ...] = (LineRollup, ZoneRollup, SpeedRollup)
# Created by schema migration 9.
COMMAND_MODELS: tuple[type[BaseModel], ...] = (Command,)
MODELS: tuple[type[BaseModel], ...] = (
    INGEST_MODELS
    + REGISTRY_MODELS
    + DEVICE_EVENT_MODELS
    + REPORTED_MODELS
    + DEPLOYMENT_MODELS
    + ACCESS_AND_GROUP_MODELS
    + DELIVERY_MODELS
    + ROLLUP_MODELS
    + COMMAND_MODELS
)

DATABASE_URL_ENV = "FLOWFLEET_DATABASE_URL"
# Connections one registry process may hold on PostgreSQL (web threads + ingest).
POOL_MAX_CONNECTIONS = 32


def is_postgres_url(url_or_path: str | Path) -> bool:
    return str(url_or_path).lower().startswith(("postgresql://", "postgres://"))


def sqlite_path(url_or_path: str | Path) -> Path:
    """The filesystem path named by a plain path or a ``sqlite:///path`` URL.

    Like SQLAlchemy and ``playhouse.db_url``: ``sqlite:///data/r.db`` is relative,
    ``sqlite:////var/lib/r.db`` absolute.
    """
    text = str(url_or_path)
    lowered = text.lower()
    if is_postgres_url(text):
        raise ValueError(f"{url_or_path!r} is a PostgreSQL URL, not a SQLite path")
    if lowered.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise ValueError(
            f"unsupported database URL {url_or_path!r}: use a file path, sqlite:///path "
            "or postgresql://user@host:port/dbname"
        )
    if not text or text == ":memory:":
        # Every thread gets its own connection, and an in-memory database is per
        # connection: ingest and web would each see a different, empty database.
        raise ValueError("the registry needs a database file, not an in-memory database")
    return Path(text).expanduser()


def postgres_params(url: str) -> dict[str, object]:
    """Connection parameters from a ``postgresql://user:pass@host:port/db?opt=v`` URL."""
    from playhouse.db_url import parse

    params = parse(url)
    if not params.get("database"):
        raise ValueError(f"database URL {redact_url(url)!r} names no database")
    return params


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and errors)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(url))
    if parts.password is None:
        return str(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def describe(db: pw.Database) -> str:
    """A short, password-free description of a database for logs."""
    if isinstance(db, pw.PostgresqlDatabase):
        params = db.connect_params
        host = params.get("host", "localhost")
        return f"postgresql://{host}:{params.get('port', 5432)}/{db.database}"
    return str(db.database)


def open_database(
    url_or_path: str | Path | None = None, *, create: bool = True, backup: bool = True
) -> pw.Database:
    """Open the registry database, bind the models to it and migrate its schema.

    Args:
        url_or_path: a SQLite file path, ``sqlite:///path`` or
            ``postgresql://user:password@host:port/dbname``; None reads
            ``$FLOWFLEET_DATABASE_URL``.
        create: apply pending schema migrations (creating the tables of a new database).
        backup: copy a SQLite file that has tables before migrating it (see
            `flowfleet.registry.store.migrations.migrate`).

    Opening the database that is already open returns the same object, so the ingest
    worker and the web app share it.
    """
    if url_or_path is None:
        url_or_path = os.environ.get(DATABASE_URL_ENV) or ""
        if not url_or_path:
            raise ValueError(f"no database given and ${DATABASE_URL_ENV} is not set")
    current = database_proxy.obj
    if is_postgres_url(url_or_path):
        params = postgres_params(str(url_or_path))
        name = params.pop("database")
        if (
            isinstance(current, pw.PostgresqlDatabase)
            and current.database == name
            and current.connect_params == params
        ):
            return current
        from playhouse.pool import PooledPostgresqlDatabase

        # Pooled: the web app opens and closes a connection per request; the pool
        # turns that into a check-out instead of a new TCP connection and login.
        db: pw.Database = PooledPostgresqlDatabase(
            name, max_connections=POOL_MAX_CONNECTIONS, stale_timeout=300, timeout=30, **params
        )
    else:
        path = sqlite_path(url_or_path).resolve()
        if isinstance(current, pw.SqliteDatabase) and current.database == str(path):
            return current
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every transaction takes the write lock when it begins (BEGIN IMMEDIATE), so
        # busy_timeout applies: a deferred one that reads and then writes while another
        # connection committed fails at once with "database is locked" (SQLite cannot
        # upgrade a stale read snapshot), which the web UI hit moving an alias while
        # ingest was writing.
        db = pw.SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE")
    database_proxy.initialize(db)
    if create:
        from .migrations import migrate

        migrate(db, backup=backup)
    return db


def create_tables(db: pw.Database) -> None:
    """Bring the schema up to date (kept for callers of the first release)."""
    from .migrations import migrate

    require_bound(db)
    migrate(db)


def require_bound(db: pw.Database) -> None:
    """Raise unless the models are bound to ``db`` (open it with open_database)."""
    if database_proxy.obj is not db:
        raise RuntimeError(
            "the registry models are bound to a different database; "
            "open this one with flowfleet.registry.store.db.open_database()"
        )


def now() -> float:
    """Current time in seconds since the Unix epoch (one place to read the clock)."""
    return time.time()
