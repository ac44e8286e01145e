"""Numbered schema migrations, applied in order when the registry opens its database.

The ``schema_version`` table records every migration applied (number, description,
time). `migrate` applies the missing ones, each in its own transaction, so a failure
leaves the database at the last complete version. Before changing a SQLite file that
already has tables, it writes a consistent copy next to it
(``<file>.bak-v<from>-<UTC time>``, through SQLite's online backup API, so the WAL is
included). On PostgreSQL an advisory lock, held while migrating, serialises workers
that start at the same time.

A migration is a function of the database; once released it never changes. New
schema changes append a new number (use ``playhouse.migrate`` for ALTERs). Migration
1 is the schema of the first release (the ingest tables), so databases created
before migrations existed are adopted without change.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import peewee as pw

from . import db as regdb

log = logging.getLogger(__name__)

# Key for pg_advisory_lock: any constant unique to this application.
PG_MIGRATION_LOCK = 0x666C6F77  # "flow"


class SchemaVersion(pw.Model):
    version = pw.IntegerField(primary_key=True)
    description = pw.TextField()
    applied_at = pw.DoubleField()

    class Meta:
        database = regdb.database_proxy
        table_name = "schema_version"


def _m1_ingest(db: pw.Database) -> None:
    db.create_tables(regdb.INGEST_MODELS, safe=True)


def _m2_model_registry(db: pw.Database) -> None:
    db.create_tables(regdb.REGISTRY_MODELS, safe=True)


def _m3_events_and_drift(db: pw.Database) -> None:
    db.create_tables(regdb.DEVICE_EVENT_MODELS, safe=True)


def _m4_reported_state(db: pw.Database) -> None:
    db.create_tables(regdb.REPORTED_MODELS, safe=True)


def _m5_deployments(db: pw.Database) -> None:
    db.create_tables(regdb.DEPLOYMENT_MODELS, safe=True)


def _m6_access_and_groups(db: pw.Database) -> None:
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as apply_ops

    migrator = SchemaMigrator.from_database(db)
    token_columns = {c.name for c in db.get_columns("api_token")}
    user_columns = {c.name for c in db.get_columns("api_user")}
    ops = []
    # A database created by this code already has the columns (create_tables uses
    # the current models); one from an older release gets them added.
    if "device" not in token_columns:  # add_column also adds the field's index
        ops.append(migrator.add_column("api_token", "device", regdb.ApiToken.device))
    if "password_hash" not in user_columns:
        ops.append(migrator.add_column("api_user", "password_hash", regdb.User.password_hash))
    apply_ops(*ops)
    db.create_tables(regdb.ACCESS_AND_GROUP_MODELS, safe=True)


def _add_missing_columns(db: pw.Database, table: str, fields: dict[str, pw.Field]) -> None:
    """Add the columns a table created by an older release lacks (a database created
    by this code already has them: create_tables uses the current models)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as apply_ops

    migrator = SchemaMigrator.from_database(db)
    have = {c.name for c in db.get_columns(table)}
    apply_ops(*(migrator.add_column(table, n, f) for n, f in fields.items() if n not in have))


def _m7_end_to_end_ack(db: pw.Database) -> None:
    _add_missing_columns(
        db,
        "device",
        {"counts_acked": regdb.Device.counts_acked, "counts_max": regdb.Device.counts_max},
    )
    dl = regdb.DeadLetter
    _add_missing_columns(
        db,
        "dead_letter",
        {
            "kind": dl.kind,
            "seq": dl.seq,
            "replayed_at": dl.replayed_at,
            "replay_outcome": dl.replay_outcome,
            "replay_reason": dl.replay_reason,
        },
    )
    db.create_tables(regdb.DELIVERY_MODELS, safe=True)
    # Devices from before: their stored bins set where the ack starts.
    cb = regdb.CountBin
    for device, top in cb.select(cb.device, pw.fn.MAX(cb.seq)).group_by(cb.device).tuples():
        regdb.Device.update(counts_max=top).where(regdb.Device.id == device).execute()
    from ..fleet.ack import advance_counts_ack

    for (device,) in regdb.Device.select(regdb.Device.id).tuples():
        advance_counts_ack(device)


def _m8_rollups(db: pw.Database) -> None:
    # Empty: the registry fills them from the stored bins at its next start, in the
    # site's timezone (`flowfleet.registry.fleet.series.rebuild`).
    db.create_tables(regdb.ROLLUP_MODELS, safe=True)
    _add_missing_columns(db, "device", {"bins_pruned": regdb.Device.bins_pruned})


def _m9_commands(db: pw.Database) -> None:
    db.create_tables(regdb.COMMAND_MODELS, safe=True)


DEVICE_RECORD_COLUMNS = (
    "name",
    "description",
    "tags",
    "site",
    "latitude",
    "longitude",
    "hardware",
    "cameras",
    "reported_at",
    "accepted_at",
    "accepted_by",
)


def _m10_device_records(db: pw.Database) -> None:
    # Every column nullable: a NOT NULL one would make SQLite rebuild `device`, and the
    # rebuild would cascade-delete every row that references it.
    dev = regdb.Device
    _add_missing_columns(db, "device", {c: getattr(dev, c) for c in DEVICE_RECORD_COLUMNS})
    # Devices the registry already knew were the operator's fleet: accepted, not
    # listed as unregistered after the upgrade.
    dev.update(accepted_at=time.time(), accepted_by="migration 10").where(
        dev.accepted_at.is_null()
    ).execute()


def _m11_speed_histograms(db: pw.Database) -> None:
    # Nullable columns with a database default of 0: existing buckets read 0 (they
    # hold no histogram: no agent could send one before this release) and later bins
    # add to them. No backfill: the stored payloads have no histograms either.
    fields = regdb.SpeedRollup._meta.fields
    _add_missing_columns(
        db, "speed_rollup", {name: fields[name] for name in regdb.SPEED_HIST_COLUMNS}
    )


def _m12_line_rollup_covering_index(db: pw.Database) -> None:
    regdb.LineRollup._schema.create_indexes(safe=True)
    db.execute_sql('DROP INDEX IF EXISTS "line_rollup_device_step_bucket"')


def _m13_drift_judge(db: pw.Database) -> None:
    from .drift_tables import DRIFT_MODELS

    db.create_tables(DRIFT_MODELS, safe=True)


def _m14_rollouts(db: pw.Database) -> None:
    from .rollout_tables import ROLLOUT_MODELS

    db.create_tables(ROLLOUT_MODELS, safe=True)


def _m15_shadow(db: pw.Database) -> None:
    from .shadow_tables import SHADOW_MODELS

    db.create_tables(SHADOW_MODELS, safe=True)


def _m16_webhooks(db: pw.Database) -> None:
    from .webhook_tables import WEBHOOK_MODELS

    db.create_tables(WEBHOOK_MODELS, safe=True)
    # No cursor row: the dispatcher starts after the newest entry when it first runs,
    # so existing history is never sent to the webhooks created later.


def _m17_relays(db: pw.Database) -> None:
    from .relay_tables import RELAY_MODELS

    db.create_tables(RELAY_MODELS, safe=True)


def _m18_enrollment(db: pw.Database) -> None:
    from .enrollment_tables import ENROLLMENT_MODELS

    db.create_tables(ENROLLMENT_MODELS, safe=True)


def _m19_camera_setup(db: pw.Database) -> None:
    from .camsetup_tables import CAMSETUP_MODELS

    db.create_tables(CAMSETUP_MODELS, safe=True)


def _m20_device_counters(db: pw.Database) -> None:
    from ..fleet.counters import backfill
    from .counters_tables import COUNTER_MODELS

    db.create_tables(COUNTER_MODELS, safe=True)
    # One pass over the raw tables, once: from now on ingest keeps the counts.
    n = backfill(db)
    log.info("device_counters: back-filled %d devices from the raw tables", n)


def _m22_broker_access(db: pw.Database) -> None:
    from .broker_tables import BROKER_MODELS

    db.create_tables(BROKER_MODELS, safe=True)


def _m24_health_beat_by_time(db: pw.Database) -> None:
    # The name peewee gives the model's index, so a new database (which gets it from
    # the model in migration 1) and an upgraded one end up alike.
    db.execute_sql("CREATE INDEX IF NOT EXISTS health_beat_device_ts ON health_beat (device, ts)")


MIGRATIONS: tuple[tuple[int, str, Callable[[pw.Database], None]], ...] = (
    (
        1,
        "ingest tables: device, count_bin, line_total, zone_total, health_beat, dead_letter",
        _m1_ingest,
    ),
    (
        2,
        "model registry: model, model_version, model_alias, signing_key, model_signature, "
        "audit_entry, api_user, api_token",
        _m2_model_registry,
    ),
    (
        3,
        "device events and drift summaries: event, drift_summary",
        _m3_events_and_drift,
    ),
    (
        4,
        "latest reported state per device: reported_state",
        _m4_reported_state,
    ),
    (
        5,
        "deployments: deployment (current model per device camera), desired_counter",
        _m5_deployments,
    ),
    (
        6,
        "access and groups: api_token.device, api_user.password_hash, web_session, "
        "login_failure, device_group, device_group_member",
        _m6_access_and_groups,
    ),
    (
        7,
        "end-to-end acknowledgement: device.counts_acked, device.counts_max, dead_letter "
        "kind/seq/replay columns, count_gap",
        _m7_end_to_end_ack,
    ),
    (
        8,
        "rollups per minute, hour and day: line_rollup, zone_rollup, speed_rollup; "
        "device.bins_pruned (raw bins removed by retention)",
        _m8_rollups,
    ),
    (
        9,
        "commands outbox: device_command (desired states published after commit)",
        _m9_commands,
    ),
    (
        10,
        "devices as records: device name, description, tags, site, latitude, longitude, "
        "hardware, cameras, reported_at, accepted_at, accepted_by",
        _m10_device_records,
    ),
    (
        11,
        "speed histograms: speed_rollup.hist_00 .. hist_48 (tracks per km/h bucket of "
        "flowfleet.speedhist.EDGES_KMH), so rollups have percentiles",
        _m11_speed_histograms,
    ),
    (
        12,
        "line_rollup: a device's buckets read from one covering index "
        "(device, step, bucket, camera, line, class, count_in, count_out), replacing "
        "(device, step, bucket)",
        _m12_line_rollup_covering_index,
    ),
    (
        13,
        "drift judge: drift_activation, drift_camera, drift_verdict, drift_cursor",
        _m13_drift_judge,
    ),
    (
        14,
        "staged rollouts: rollout, rollout_device (wave, state, reason, previous model per "
        "device), job_lease (singleton jobs such as the rollout steps)",
        _m14_rollouts,
    ),
    (
        15,
        "shadow comparisons: shadow_request (candidate per device camera), shadow_window",
        _m15_shadow,
    ),
    (
        16,
        "webhooks: webhook, webhook_delivery, webhook_attempt (the delivery log), "
        "webhook_cursor (how far the audit trail is dispatched)",
        _m16_webhooks,
    ),
    (
        17,
        "cloud relays: relay_message (the relays' outbox), relay_usage (per relay and hour)",
        _m17_relays,
    ),
    (
        18,
        "enrollment by claim: enrollment_token (bootstrap tokens), enrollment, reenroll_allowance",
        _m18_enrollment,
    ),
    (
        19,
        "camera set-up: camera_setup (desired lines and zones per device camera), "
        "camera_snapshot (latest calibration snapshot request and image)",
        _m19_camera_setup,
    ),
    (
        20,
        "device_counters: per-device bins, beats and dead letters kept by ingest "
        "(back-filled from the raw tables)",
        _m20_device_counters,
    ),
    (
        22,
        "broker access from the device records: broker_credential (device passwords, "
        "hashed), device_revocation",
        _m22_broker_access,
    ),
    (
        24,
        "health_beat (device, ts) index: a device's health over a range of time",
        _m24_health_beat_by_time,
    ),
)
LATEST = MIGRATIONS[-1][0]


def current_version(db: pw.Database) -> int:
    """The highest applied migration, 0 for a database without ``schema_version``."""
    if not db.table_exists("schema_version"):
        return 0
    top = SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar()
    return int(top or 0)


def migrate(db: pw.Database, *, backup: bool = True) -> list[int]:
    """Apply pending migrations; returns the numbers applied (empty when up to date).

    Raises RuntimeError if the database is newer than this code (a downgrade).
    """
    regdb.require_bound(db)
    postgres = isinstance(db, pw.PostgresqlDatabase)
    with db.connection_context():
        if postgres:
            # Session lock: workers starting together migrate one after the other.
            db.execute_sql("SELECT pg_advisory_lock(%s)", (PG_MIGRATION_LOCK,))
        try:
            return _migrate_locked(db, backup)
        finally:
            if postgres:
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (PG_MIGRATION_LOCK,))


def _migrate_locked(db: pw.Database, backup: bool) -> list[int]:
    db.create_tables([SchemaVersion], safe=True)
    version = current_version(db)
    if version > LATEST:
        raise RuntimeError(
            f"database {regdb.describe(db)} has schema version {version}, newer than "
            f"this flowfleet understands ({LATEST}); upgrade flowfleet"
        )
    if version == LATEST:
        return []
    if backup and isinstance(db, pw.SqliteDatabase):
        tables = set(db.get_tables()) - {"schema_version"}
        if tables:
            backup_sqlite(db, version)
    applied = []
    for number, description, apply in MIGRATIONS:
        if number <= version:
            continue
        with db.atomic():
            log.info(
                "database %s: applying migration %d (%s)", regdb.describe(db), number, description
            )
            apply(db)
            SchemaVersion.create(version=number, description=description, applied_at=time.time())
        applied.append(number)
    return applied


def backup_sqlite(db: pw.SqliteDatabase, version: int) -> Path:
    """Copy the open SQLite database next to its file; returns the copy's path."""
    source = Path(db.database)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = source.with_name(f"{source.name}.bak-v{version}-{stamp}")
    dest = sqlite3.connect(str(target))
    try:
        db.connection().backup(dest)
    finally:
        dest.close()
    log.info("backed up %s (schema version %d) to %s", source, version, target)
    return target
