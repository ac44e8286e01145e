"""Per-device counters (migration 20): kept by ingest, trimmed by retention,
back-filled for an existing database, and always equal to what /api/devices used to
count from the raw tables on every request; on SQLite and PostgreSQL.

(tests/test_ingest_batch.py checks the same equality after its streams of
redeliveries, conflicts and malformed messages, one at a time and batched.)
"""

from __future__ import annotations

import json
import time

from flowfleet.contract import Topics
from flowfleet.registry.fleet import counters, retention
from flowfleet.registry.fleet.ingest import Ingestor
from flowfleet.registry.http.web import devices
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store import migrations
from flowfleet.registry.testing import fresh_database
from tests.factories import valid_payload

TOPICS = Topics()


def _kept() -> dict[str, dict]:
    fields = ("bins", "bin_seq_max", "last_bin_at", "beats", "beat_seq_max", "last_beat_at")
    fields += ("dead_letters",)
    return {d: {k: getattr(c, k) for k in fields} for d, c in counters.read().items()}


def _ingest(db, now: float) -> None:
    ing = Ingestor(db, TOPICS)
    items = []
    for device in ("cam-a", "cam-b"):
        for seq in range(1, 21):
            body = valid_payload("counts", device, seq, now=now)
            body["start"] = now - 3 * 3600 + 60 * seq
            body["end"] = body["start"] + 60
            items.append((TOPICS.device(device, "counts"), json.dumps(body).encode(), now))
        for seq in range(1, 6):
            beat = valid_payload("health", device, seq, now=now)
            items.append((TOPICS.device(device, "health"), json.dumps(beat).encode(), now))
    items.append((TOPICS.device("cam-a", "counts"), b"not json", now))
    assert set(ing.handle_batch(items)) == {"stored", "dead-letter"}
    # Redelivered: in a batch and one at a time. Stored once, counted once.
    assert set(ing.handle_batch(items[:25])) == {"duplicate"}
    assert ing.handle(*items[3]) == "duplicate" and ing.handle(*items[21]) == "duplicate"
    # One message at a time adds like a batch does.
    body = valid_payload("health", "cam-b", 6, now=now + 5)
    assert ing.handle(TOPICS.device("cam-b", "health"), json.dumps(body).encode(), now + 5) == (
        "stored"
    )


def test_counters_follow_ingest_retention_and_the_migration(db_url):
    db = regdb.open_database(fresh_database(db_url))
    now = float(int(time.time()))
    with db.connection_context():
        _ingest(db, now)
        kept = _kept()
        assert kept == counters.computed()
        assert kept["cam-a"]["bins"] == 20 and kept["cam-a"]["dead_letters"] == 1
        assert kept["cam-b"]["beats"] == 6 and kept["cam-b"]["last_beat_at"] == now + 5
        # What /api/devices shows comes from the counters and equals the raw count.
        api = {d["device"]: d for d in devices()}
        assert api["cam-a"]["bins"] == 20 and api["cam-a"]["highest_seq"] == 20
        assert api["cam-a"]["gaps"] == 0 and api["cam-a"]["health_beats"] == 5
        assert api["cam-b"]["last_health"] is not None and api["cam-a"]["dead_letters"] == 1

        # Retention removes old bins (still counted as received) and beats (no longer
        # stored): the counters follow.
        removed = retention.prune(db, keep_days=1, at=now + 10 * 86400)
        assert removed["bins"] > 0 and removed["health_beats"] > 0
        assert _kept() == counters.computed()
        api = {d["device"]: d for d in devices()}
        assert api["cam-a"]["bins"] == 20 and api["cam-a"]["health_beats"] == 1

        # A database from before migration 20: the migration back-fills the counters.
        expected = counters.computed()
        db.drop_tables([counters.DeviceCounters])
        # Back to schema 19 (later migrations only add tables and an index, made safely).
        migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version >= 20).execute()
    later = [v for v, _, _ in migrations.MIGRATIONS if v >= 20]
    assert migrations.migrate(db, backup=False) == later
    with db.connection_context():
        assert _kept() == expected
