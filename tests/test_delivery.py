"""End-to-end acknowledgement of count bins, piece by piece (no processes):

- the agent's outbox keeps a bin the broker took ("sent, unconfirmed") until the
  registry confirms it, sends it again when overdue (doubling) or when the registry
  has a later bin but not it, and upgrades an outbox from before the ack;
- the publisher keeps a publish the broker refused, retries it later and reports it;
- the registry's ack (stored, dead-lettered whole, or declared dropped) on both
  database kinds, and migration 7 computing it for devices stored before.

Whole-system runs (real agent, broker killed and its disk lost) are in
tests/test_delivery_faults.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from flowfleet.agent.outbox import Outbox
from flowfleet.agent.publisher import Publisher
from flowfleet.contract import Event, Topics, parse_payload
from flowfleet.registry.fleet.ack import ack_state
from flowfleet.registry.fleet.ingest import DEAD_LETTER, DUPLICATE, STORED, Ingestor
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store import migrations
from flowfleet.registry.testing import release

from .factories import count_bin

TOPICS = Topics()
DEVICE = "cam-1"


def enqueue_bins(box: Outbox, n: int) -> list[int]:
    for _ in range(n):
        box.enqueue_bin(TOPICS.counts(DEVICE), lambda seq: count_bin(DEVICE, seq))
    return [r[0] for r in box.pending(1000)]


def pending_seqs(box: Outbox, now: float | None = None) -> list[int]:
    return [parse_payload("counts", r[2]).seq for r in box.pending(1000, now=now)]


# -- the agent's outbox ----------------------------------------------------------------


def test_a_bin_the_broker_took_waits_for_the_registry(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    rows = enqueue_bins(box, 3)
    box.enqueue("health", TOPICS.health(DEVICE), lambda seq: b"{}")
    health_row = box.pending(10)[-1][0]

    deleted = box.broker_acked([*rows, health_row], keep_counts=True, timeout_s=60, now=1000.0)

    assert deleted == 1  # the health beat; count bins stay
    assert (box.depth(), box.depth("counts"), box.unsent(), box.unconfirmed()) == (3, 3, 0, 3)
    assert pending_seqs(box, now=1000.0) == []  # nothing to send until overdue
    assert box.confirm_counts(2) == 2
    assert (box.depth("counts"), box.unconfirmed()) == (1, 1)
    assert box.confirm_counts(2) == 0  # a repeated ack changes nothing


def test_an_overdue_bin_is_sent_again_each_time_after_twice_as_long(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    (row,) = enqueue_bins(box, 1)
    t = 1000.0
    for wait in (10, 20, 40, 80, 80):  # doubling, capped at timeout_max_s
        box.broker_acked([row], keep_counts=True, timeout_s=10, timeout_max_s=80, now=t)
        assert pending_seqs(box, now=t + wait - 0.1) == []
        assert pending_seqs(box, now=t + wait) == [1]
        t += wait


def test_the_registry_lacking_earlier_bins_makes_them_go_again_at_once(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    rows = enqueue_bins(box, 5)
    box.broker_acked(rows[:4], keep_counts=True, timeout_s=600, now=1000.0)

    # The registry has 1..2 and 4 (ack 2, max 4): 3 was lost; 4 it has; 5 is unsent.
    box.confirm_counts(2)
    assert box.resend_counts(2, 4, sent_before=1000.0) == 0  # too recent: in transit
    assert box.resend_counts(2, 4, sent_before=1005.0) == 2
    assert pending_seqs(box, now=1006.0) == [3, 4, 5]


def test_without_a_registry_the_broker_ack_settles_a_bin(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    rows = enqueue_bins(box, 2)
    assert box.broker_acked(rows, keep_counts=False) == 2
    assert box.depth() == 0


def test_an_outbox_from_before_the_ack_is_upgraded_and_its_bins_are_unsent(tmp_path):
    path = tmp_path / "o.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,"
        " seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,"
        " created REAL NOT NULL);"
    )
    old.execute(
        "INSERT INTO outbox(stream, seq, topic, payload, created) VALUES('counts', 1, ?, ?, 1)",
        (TOPICS.counts(DEVICE), count_bin(DEVICE, 1).to_json()),
    )
    old.commit()
    old.close()

    box = Outbox(path)

    assert pending_seqs(box) == [1] and box.unsent() == 1


# -- the publisher and a refusing broker ---------------------------------------------


class RefusingConnection:
    """Hands out message ids and lets the test answer each publish."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[tuple[int, str]] = []
        self.on_ack = self.on_refused = None
        self._mid = 0

    def publish(self, topic, payload, qos=1, retain=False):
        self._mid += 1
        self.sent.append((self._mid, topic))
        return self._mid


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_refused_publish_is_kept_reported_and_retried_later(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    enqueue_bins(box, 1)
    conn = RefusingConnection()
    reports: list[tuple[str, str]] = []
    pub = Publisher(
        box, window=5, refused_retry_s=0.5, on_refused=lambda t, r: reports.append((t, r))
    )
    pub.attach(conn)
    pub.start()
    try:
        wait_until(lambda: len(conn.sent) == 1)
        conn.on_refused(conn.sent[0][0], "Not authorized (135)")
        assert reports == [(TOPICS.counts(DEVICE), "Not authorized (135)")]
        assert pub.refused == 1 and pub.inflight() == 0 and box.depth() == 1
        time.sleep(0.3)
        assert len(conn.sent) == 1, "a refused publish was retried before its time"
        wait_until(lambda: len(conn.sent) == 2)  # after refused_retry_s
        conn.on_ack(conn.sent[1][0])
        wait_until(lambda: box.unsent() == 0)
        assert box.depth("counts") == 1  # accepted by the broker, awaiting the registry
    finally:
        pub.stop()


# -- the registry's ack ------------------------------------------------------------------


@pytest.fixture
def ingestor(registry) -> Ingestor:
    return Ingestor(registry.db, TOPICS)


def store(ingestor: Ingestor, seq: int) -> str:
    return ingestor.handle(TOPICS.counts(DEVICE), count_bin(DEVICE, seq).to_json())


def test_the_ack_covers_what_is_stored_without_a_hole(ingestor):
    for seq in (1, 2, 4, 5):
        assert store(ingestor, seq) == STORED
    assert ack_state(DEVICE) == (2, 5)
    assert ingestor.take_acks() == {DEVICE: (2, 5)}
    assert ingestor.take_acks() == {}

    assert store(ingestor, 3) == STORED  # the hole filled: the ack jumps over 4 and 5
    assert ack_state(DEVICE) == (5, 5)
    assert store(ingestor, 3) == DUPLICATE  # a resend is answered with the ack again
    assert ingestor.take_acks() == {DEVICE: (5, 5)}


def test_a_dead_lettered_bin_is_in_custody_and_a_declared_drop_is_passed_over(ingestor):
    assert store(ingestor, 1) == STORED
    bad = json.loads(count_bin(DEVICE, 2).to_json())
    bad["unknown_field"] = 1
    assert ingestor.handle(TOPICS.counts(DEVICE), json.dumps(bad).encode()) == DEAD_LETTER
    (letter,) = regdb.DeadLetter.select()
    assert (letter.kind, letter.seq) == ("counts", 2)
    assert ack_state(DEVICE) == (2, 2)

    assert store(ingestor, 6) == STORED
    assert ack_state(DEVICE) == (2, 6)
    dropped = Event(
        device=DEVICE,
        seq=1,
        ts=time.time(),
        type="outbox_dropped",
        severity="warning",
        data={"stream": "counts", "n": 3, "first_seq": 3, "last_seq": 5},
    )
    assert ingestor.handle(TOPICS.events(DEVICE), dropped.to_json()) == STORED
    assert ack_state(DEVICE) == (6, 6)
    assert ingestor.take_acks()[DEVICE] == (6, 6)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_7_computes_the_ack_of_devices_stored_before(tmp_path, kind):
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as apply_ops

    from flowfleet.registry.testing import temporary_database

    with temporary_database(kind, tmp_path) as url:
        db = regdb.open_database(url)
        ingestor = Ingestor(db, TOPICS)
        for seq in (1, 2, 3, 5):
            assert store(ingestor, seq) == STORED
        with db.connection_context():
            # Back to the schema of the release before migration 7, data kept.
            db.drop_tables(regdb.DELIVERY_MODELS)
            if kind == "sqlite":  # its drop_column rebuilds the table: no cascade
                db.execute_sql("PRAGMA foreign_keys=0")
            m = SchemaMigrator.from_database(db)
            apply_ops(
                m.drop_column("device", "counts_acked"), m.drop_column("device", "counts_max")
            )
            apply_ops(
                *(
                    m.drop_column("dead_letter", c)
                    for c in ("kind", "seq", "replayed_at", "replay_outcome", "replay_reason")
                )
            )
            migrations.SchemaVersion.delete().where(migrations.SchemaVersion.version > 6).execute()
            assert regdb.CountBin.select().count() == 4
        release()

        db = regdb.open_database(url)

        with db.connection_context():
            assert migrations.current_version(db) == migrations.LATEST
            assert regdb.CountBin.select().count() == 4, "data kept"
            assert ack_state(DEVICE) == (3, 5)
        release()
