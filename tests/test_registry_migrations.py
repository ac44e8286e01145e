"""Numbered schema migrations: new databases, adopting a first-release file, backups."""

from __future__ import annotations

import sqlite3

import peewee as pw
import pytest

from flowfleet.registry.store import db as regdb
from flowfleet.registry.store import migrations
from flowfleet.registry.testing import KINDS, release, temporary_database, temporary_postgres


@pytest.fixture(autouse=True)
def _unbind():
    yield
    release()


def versions(db) -> list[int]:
    return [v for (v,) in db.execute_sql("SELECT version FROM schema_version ORDER BY version")]


def test_a_new_sqlite_database_gets_every_migration_and_no_backup(tmp_path):
    db = regdb.open_database(tmp_path / "r.db")
    assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
    assert migrations.current_version(db) == migrations.LATEST
    assert {"model", "model_version", "api_token", "device", "count_bin"} <= set(db.get_tables())
    assert not list(tmp_path.glob("r.db.bak-*"))


def test_a_first_release_file_is_backed_up_then_adopted(tmp_path):
    path = tmp_path / "old.db"
    # What the first release created: the ingest tables, no schema_version, some data.
    old = pw.SqliteDatabase(str(path), pragmas=regdb.SQLITE_PRAGMAS)
    regdb.database_proxy.initialize(old)
    old.create_tables(regdb.INGEST_MODELS)
    regdb.Device.create(id="cam-1", first_seen=1.0)
    old.close()
    release()

    db = regdb.open_database(path)

    assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
    assert regdb.Device.get_by_id("cam-1").first_seen == 1.0, "existing data kept"
    (backup,) = tmp_path.glob("old.db.bak-v0-*")
    with sqlite3.connect(backup) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "device" in tables and "model" not in tables
        assert conn.execute("SELECT id FROM device").fetchall() == [("cam-1",)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_2_database_gets_the_event_and_drift_tables(tmp_path, kind):
    with temporary_database(kind, tmp_path) as url:
        # A database as the release with migrations 1 and 2 left it, with data.
        db = regdb.open_database(url)
        with db.connection_context():
            db.drop_tables(regdb.DEVICE_EVENT_MODELS)
            migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version > 2).execute()
            regdb.Device.create(id="cam-1", first_seen=1.0)
        release()

        db = regdb.open_database(url)

        with db.connection_context():
            assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
            assert {"event", "drift_summary"} <= set(db.get_tables())
            assert regdb.Device.get_by_id("cam-1").first_seen == 1.0
            regdb.Event.create(
                device="cam-1",
                seq=1,
                ts=2.0,
                type="t",
                severity="info",
                received_at=2.0,
                payload="{}",
            )
            with pytest.raises(pw.IntegrityError), db.atomic():  # UNIQUE (device, seq)
                regdb.Event.create(
                    device="cam-1",
                    seq=1,
                    ts=3.0,
                    type="t",
                    severity="info",
                    received_at=3.0,
                    payload="{}",
                )
        if kind == "sqlite":
            assert len(list(tmp_path.glob("registry.db.bak-v2-*"))) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_3_database_gets_the_reported_state_table(tmp_path, kind):
    with temporary_database(kind, tmp_path) as url:
        # A database as the release with migrations 1 to 3 left it, with data.
        db = regdb.open_database(url)
        with db.connection_context():
            db.drop_tables(regdb.REPORTED_MODELS)
            migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version > 3).execute()
            regdb.Device.create(id="cam-1", first_seen=1.0)
            assert "reported_state" not in db.get_tables()
        release()

        db = regdb.open_database(url)

        with db.connection_context():
            assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
            assert "reported_state" in db.get_tables()
            assert regdb.Device.get_by_id("cam-1").first_seen == 1.0
            regdb.ReportedState.create(device="cam-1", ts=2.0, received_at=2.0, payload="{}")
            with pytest.raises(pw.IntegrityError), db.atomic():  # one row per device
                regdb.ReportedState.create(device="cam-1", ts=3.0, received_at=3.0, payload="{}")
        if kind == "sqlite":
            assert len(list(tmp_path.glob("registry.db.bak-v3-*"))) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_5_database_gets_device_tokens_passwords_sessions_and_groups(tmp_path, kind):
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as apply_ops

    with temporary_database(kind, tmp_path) as url:
        # A database as the release with migrations 1 to 5 left it, with a token.
        db = regdb.open_database(url)
        with db.connection_context():
            db.drop_tables(regdb.ACCESS_AND_GROUP_MODELS)
            m = SchemaMigrator.from_database(db)
            apply_ops(m.drop_index("api_token", "api_token_device"))
            apply_ops(
                m.drop_column("api_token", "device"),
                m.drop_column("api_user", "password_hash"),
            )
            migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version > 5).execute()
            db.execute_sql(
                "INSERT INTO api_user (name, role, created_at) VALUES ('ops', 'operator', 1.0)"
            )
            db.execute_sql(
                "INSERT INTO api_token (user_id, token_hash, prefix, label, role, created_at) "
                "VALUES (1, 'h', 'ffr_x', '', 'operator', 1.0)"
            )
        release()

        db = regdb.open_database(url)

        with db.connection_context():
            assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
            tables = set(db.get_tables())
            assert {"web_session", "login_failure", "device_group", "device_group_member"} <= tables
            token = regdb.ApiToken.get()
            assert token.device is None and token.role == "operator"
            assert regdb.User.get().password_hash is None
            group = regdb.DeviceGroup.create(name="lobby", created_at=2.0, created_by="t")
            regdb.DeviceGroupMember.create(group=group, device="cam-1", added_at=2.0)
            with pytest.raises(pw.IntegrityError), db.atomic():  # once per group
                regdb.DeviceGroupMember.create(group=group, device="cam-1", added_at=3.0)
        if kind == "sqlite":
            assert len(list(tmp_path.glob("registry.db.bak-v5-*"))) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_9_database_gets_device_records_and_keeps_its_devices_accepted(tmp_path, kind):
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as apply_ops

    with temporary_database(kind, tmp_path) as url:
        # A database as migrations 1 to 9 left it, with a device and one of its bins.
        db = regdb.open_database(url)
        with db.connection_context():
            m = SchemaMigrator.from_database(db)
            apply_ops(*(m.drop_column("device", c) for c in migrations.DEVICE_RECORD_COLUMNS))
            migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version > 9).execute()
            db.execute_sql(
                "INSERT INTO device (id, first_seen, state) VALUES ('cam-1', 1.0, 'online')"
            )
            db.execute_sql(
                "INSERT INTO count_bin (device, seq, window_start, window_end, received_at, "
                "payload) VALUES ('cam-1', 1, 0.0, 60.0, 61.0, '{}')"
            )
        release()

        db = regdb.open_database(url)

        with db.connection_context():
            assert 10 in versions(db)
            dev = regdb.Device.get_by_id("cam-1")
            assert dev.accepted_by == "migration 10" and dev.accepted_at is not None
            assert (dev.name, dev.hardware, dev.latitude) == (None, None, None)
            assert regdb.CountBin.select().count() == 1  # the table was not rebuilt


def test_reopening_an_up_to_date_database_changes_nothing(tmp_path):
    path = tmp_path / "r.db"
    db = regdb.open_database(path)
    assert migrations.migrate(db) == []
    release()
    regdb.open_database(path)
    assert not list(tmp_path.glob("r.db.bak-*"))


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    db = regdb.open_database(tmp_path / "r.db")
    migrations.SchemaVersion.create(
        version=migrations.LATEST + 1, description="future", applied_at=0
    )
    with pytest.raises(RuntimeError, match="newer than this flowfleet"):
        migrations.migrate(db)


def test_postgresql_database_is_migrated_and_url_password_is_redacted():
    with temporary_postgres() as url:
        db = regdb.open_database(url)
        assert isinstance(db, pw.PostgresqlDatabase)
        assert versions(db) == [n for n, _, _ in migrations.MIGRATIONS]
        assert migrations.migrate(db) == []
        assert regdb.open_database(url) is db
        assert regdb.describe(db).startswith("postgresql://")
    assert regdb.redact_url("postgresql://u:secret@h:5432/d") == "postgresql://u:***@h:5432/d"


def test_database_url_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(regdb.DATABASE_URL_ENV, f"sqlite:///{tmp_path}/env.db")
    db = regdb.open_database()
    assert db.database == str(tmp_path / "env.db")
    monkeypatch.delenv(regdb.DATABASE_URL_ENV)
    release()
    with pytest.raises(ValueError, match="FLOWFLEET_DATABASE_URL"):
        regdb.open_database()


def test_an_unreachable_postgres_server_fails_loudly(monkeypatch):
    from flowfleet.registry import testing

    monkeypatch.setenv(testing.POSTGRES_ENV, "postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(testing.PostgresUnavailable, match="not reachable"), temporary_postgres():
        pass
