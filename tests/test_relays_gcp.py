"""The Pub/Sub relay against Google's real Pub/Sub emulator, with the relay core
(outbox filled by ingest, packing, usage, metrics, API) on SQLite and PostgreSQL;
and the faults: the emulator stopped and restarted, the relay process SIGKILLed
mid-batch: every id arrives, exactly once after deduplication on the receiving side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from flowfleet.contract import Topics
from flowfleet.registry import metrics
from flowfleet.registry.fleet.ingest import DUPLICATE, STORED, Ingestor
from flowfleet.registry.relays import outbox, usage
from flowfleet.registry.relays.base import ENVELOPE_SCHEMA
from flowfleet.registry.relays.gcp import PubSubRelay
from flowfleet.registry.relays.job import RelayRunner
from flowfleet.registry.relays.provision import provision_gcp
from flowfleet.registry.relays.settings import GcpRelay
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.relay_tables import RelayMessage
from flowfleet.registry.testing import fresh_database, release
from tests.factories import valid_payload
from tests.relay_endpoints import PubSubEmulator, bin_messages, drain

PROJECT = "flowfleet-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = PubSubEmulator(tmp_path_factory.mktemp("pubsub")).start()
    yield emu
    emu.stop()


def _settings(emulator, topic: str, **changes) -> GcpRelay:
    values = dict(project=PROJECT, topic=topic, emulator_host=emulator.host, timeout_s=5.0)
    values.update(changes)
    return GcpRelay(**values)


def _subscriber(emulator):
    import grpc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    transport = SubscriberGrpcTransport(
        channel=grpc.insecure_channel(emulator.host), credentials=AnonymousCredentials()
    )
    return pubsub_v1.SubscriberClient(transport=transport)


def pull_all(emulator, subscription: str, expect, timeout: float = 60.0):
    """Pull (and ack) until every expected message id arrived, or ``timeout``; returns
    the messages as (attributes, body, ordering key) in arrival order.

    ``expect``: the set of ids, or how many distinct ids. Distinct, not messages: after
    a resend (at least once) duplicates arrive too, and the emulator hands out what it
    holds over several pulls, so counting messages stopped before the last ids came
    (a flaky SIGKILL test: 100 duplicates counted, 100 ids still in the emulator)."""
    sub = _subscriber(emulator)
    path = f"projects/{PROJECT}/subscriptions/{subscription}"
    got = []
    seen: set[str] = set()

    def done() -> bool:
        return expect <= seen if isinstance(expect, set) else len(seen) >= expect

    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            resp = sub.pull(request={"subscription": path, "max_messages": 1000}, timeout=5)
            if resp.received_messages:
                sub.acknowledge(
                    request={
                        "subscription": path,
                        "ack_ids": [m.ack_id for m in resp.received_messages],
                    }
                )
            for m in resp.received_messages:
                message = (dict(m.message.attributes), m.message.data, m.message.ordering_key)
                got.append(message)
                seen.update(i for i, _ in unpack([message]))
    finally:
        sub.close()
    return got


def unpack(got) -> list[tuple[str, dict]]:
    """(id, payload) of every device message in the pulled Pub/Sub messages."""
    out = []
    for attrs, body, _ in got:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("schema") == ENVELOPE_SCHEMA:
            assert doc["device"] == attrs["device"] and doc["kind"] == attrs["kind"]
            assert doc["ids"][0] == attrs["id"] and len(doc["ids"]) == int(attrs["count"])
            out.extend(zip(doc["ids"], doc["messages"], strict=True))
        else:
            out.append((attrs["id"], doc))
    return out


@pytest.fixture
def db(db_url):
    url = fresh_database(db_url)
    database = regdb.open_database(url)
    yield database
    release()


def test_ingest_queues_what_it_stores_and_the_relay_forwards_it(emulator, db, db_url):
    name = "ingest-pg" if db_url.startswith("postgresql") else "ingest-sqlite"
    settings = _settings(emulator, name, kinds=("counts", "health"), pack_units=4)
    provision_gcp(settings, name)
    topics = Topics()
    ingestor = Ingestor(db, topics, relay_routes=GcpRelaySection(settings).routes())
    stream = bin_messages(3, 20)
    with db.connection_context():
        assert set(ingestor.handle_batch(stream[:40])) == {STORED}
        # One message at a time, a redelivery (stored once: queued once), a health beat.
        assert ingestor.handle(*stream[40]) == STORED
        assert ingestor.handle(*stream[0]) == DUPLICATE
        assert set(ingestor.handle_batch(stream[41:] + stream[:5])) == {STORED, DUPLICATE}
        beat = valid_payload("health", "cam-0", 1)
        assert ingestor.handle(topics.device("cam-0", "health"), json.dumps(beat).encode()) == (
            STORED
        )
        assert RelayMessage.select().count() == 61
    before = metrics.RELAY_MESSAGES.labels("gcp", "forwarded")._value.get()
    runner = RelayRunner(db, PubSubRelay(settings), settings, lease_s=5)
    try:
        assert drain(runner) == 61
    finally:
        runner.stop()
    got = pull_all(emulator, name, 61)
    items = unpack(got)
    ids = [i for i, _ in items]
    assert sorted(ids) == sorted(
        [f"cam-{d}/counts/{s}" for d in range(3) for s in range(1, 21)] + ["cam-0/health/1"]
    )
    sent = {
        f"cam-{d}/counts/{s}": json.loads(p)
        for (_, p, _), (d, s) in zip(
            stream, [(d, s) for s in range(1, 21) for d in range(3)], strict=True
        )
    }
    for msg_id, payload in items:
        if "/counts/" in msg_id:
            assert payload == sent[msg_id]
    # Ordering key per device, and each device's bins in seq order.
    for attrs, _, key in got:
        assert key == attrs["device"]
    for d in range(3):
        seqs = [int(i.rsplit("/", 1)[1]) for i in ids if i.startswith(f"cam-{d}/counts/")]
        assert seqs == sorted(seqs)
    # Packed up to 4 units of 1,000 bytes: fewer cloud messages than bins.
    assert len(got) < 61
    with db.connection_context():
        assert RelayMessage.select().count() == 0
        used = usage.summary(time.time() - 3600, time.time() + 1)["gcp"]
    assert used["messages"] == 61 and used["publishes"] == len(got)
    assert used["bytes"] == sum(len(b) for _, b, _ in got)
    assert used["units"] == sum(max(1, -(-max(len(b), 1000) // 1000)) for _, b, _ in got)
    assert used["latency_ms"]["p50"] is not None
    assert metrics.RELAY_MESSAGES.labels("gcp", "forwarded")._value.get() - before == 61


class GcpRelaySection:
    """Routes of a one-relay `[relays]` section."""

    def __init__(self, settings: GcpRelay) -> None:
        from flowfleet.registry.relays.settings import RelaysSection

        self.section = RelaysSection(gcp=settings)

    def routes(self):
        return self.section.routes()


@pytest.fixture
def db_and_url(db_url):
    """The emptied module database of this kind (SQLite, PostgreSQL) and its URL (for
    the relay process the SIGKILL test starts)."""
    url = fresh_database(db_url)
    database = regdb.open_database(url)
    yield database, url
    release()


def _kind(url: str) -> str:
    return "pg" if url.startswith("postgresql") else "sqlite"


def _ingest(database, settings, stream) -> None:
    ingestor = Ingestor(database, Topics(), relay_routes=GcpRelaySection(settings).routes())
    with database.connection_context():
        for i in range(0, len(stream), 200):
            assert set(ingestor.handle_batch(stream[i : i + 200])) == {STORED}


def _expected(devices: int, seqs: range) -> set[str]:
    return {f"cam-{d}/counts/{s}" for d in range(devices) for s in seqs}


def test_emulator_stopped_and_restarted_nothing_lost(emulator, db_and_url):
    """The endpoint goes away mid-stream: sends fail, back off, the circuit opens; once
    it is back every message arrives (exactly once after dedup on the ids)."""
    database, url = db_and_url
    name = f"faults-{_kind(url)}"
    settings = _settings(
        emulator,
        name,
        timeout_s=1.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        breaker_failures=2,
        breaker_cooldown_s=0.5,
    )
    provision_gcp(settings, name)
    _ingest(database, settings, bin_messages(3, 30))
    runner = RelayRunner(database, PubSubRelay(settings), settings, lease_s=5)
    try:
        drain(runner)
        first = unpack(pull_all(emulator, name, 90))
        emulator.stop()
        _ingest(database, settings, bin_messages(3, 30, first_seq=31))
        results = []
        deadline = time.monotonic() + 15
        while runner.circuit != "open" and time.monotonic() < deadline:
            results.append(runner.run_once())
            time.sleep(0.05)
        assert runner.circuit == "open", results
        assert any(r.failed for r in results)
        assert metrics.RELAY_CIRCUIT.labels("gcp")._value.get() == 1
        with database.connection_context():
            assert RelayMessage.select().where(RelayMessage.attempts > 0).count() > 0
        emulator.start()
        provision_gcp(settings, name)  # the emulator keeps nothing across restarts
        time.sleep(0.5)  # the cooldown
        drain(runner)
        assert runner.circuit == "closed"
        assert metrics.RELAY_CIRCUIT.labels("gcp")._value.get() == 0
        second = unpack(pull_all(emulator, name, 90))
    finally:
        runner.stop()
    ids = [i for i, _ in first + second]
    assert set(ids) == _expected(3, range(1, 61))
    with database.connection_context():
        used = usage.summary(time.time() - 3600, time.time() + 1)["gcp"]
        assert RelayMessage.select().count() == 0
    assert used["failures"] > 0 and used["retries"] >= 90 and used["messages"] == 180


KILLED_RELAY = """
import sys, time
from flowfleet.registry.store import db as regdb
from flowfleet.registry.relays.gcp import PubSubRelay
from flowfleet.registry.relays.job import RelayRunner
from flowfleet.registry.relays.settings import GcpRelay
settings = GcpRelay.model_validate_json(sys.argv[2])
stall_after = int(sys.argv[3])

class Stalling(PubSubRelay):
    # The real relay; after its stall_after-th acknowledged send it says so and stops
    # there, before the job deletes the rows: the test kills it at that very point.
    sends = 0

    def send(self, packets):
        answers = super().send(packets)
        Stalling.sends += 1
        if Stalling.sends == stall_after:
            print("acked", flush=True)
            time.sleep(600)
        return answers

database = regdb.open_database(sys.argv[1])
runner = RelayRunner(database, Stalling(settings), settings, lease_s=1.0, holder="doomed")
while True:
    runner.run_once()
"""


def _wait_line(proc, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().decode().strip()


@pytest.mark.parametrize("kill", ["after_ack", "anytime"])
def test_relay_sigkilled_mid_batch_sends_everything_again(emulator, db_and_url, kill):
    """A registry killed mid-stream: after the restart (another process, once the lease
    lapsed) every id arrives, exactly once after deduplication. ``after_ack``: killed
    when the cloud had acknowledged its 3rd batch and the rows were not yet deleted,
    so exactly that batch arrives twice; ``anytime``: killed whenever the outbox has
    shrunk (between passes, in a publish, in a deletion)."""
    database, url = db_and_url
    name = f"killed-{_kind(url)}-{kill}"
    settings = _settings(emulator, name, pack=False, batch_max=100)
    provision_gcp(settings, name)
    _ingest(database, settings, bin_messages(4, 300))
    stall_after = 3 if kill == "after_ack" else 0
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RELAY, url, settings.model_dump_json(), str(stall_after)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        if stall_after:
            line = _wait_line(proc, 120)
            assert line == "acked", (line, proc.poll())
        else:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with database.connection_context():
                    left = RelayMessage.select().count()
                if left < 900:
                    break
                time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    with database.connection_context():
        left = RelayMessage.select().count()
        stalled = [r.msg_id for r in RelayMessage.select().order_by(RelayMessage.id).limit(100)]
    if stall_after:
        assert left == 1000  # two batches deleted; the acknowledged third was not
    else:
        assert 0 < left < 1200
    runner = RelayRunner(database, PubSubRelay(settings), settings, lease_s=5)
    try:
        deadline = time.monotonic() + 10
        while runner.run_once().taken == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # the killed process's lease (1 s) runs out first
        drain(runner)
    finally:
        runner.stop()
    expected = _expected(4, range(1, 301))
    ids = [i for i, _ in unpack(pull_all(emulator, name, expected))]
    assert set(ids) == expected
    counts = Counter(ids)
    if stall_after:
        assert {i for i, n in counts.items() if n > 1} == set(stalled)
        assert max(counts.values()) == 2 and len(ids) == 1300
    else:
        assert len(ids) >= 1200
    with database.connection_context():
        assert outbox.due("gcp", 1) == []


def test_provision_gcp_cli_creates_topic_and_subscription_once(emulator, capsys):
    from flowfleet.cli import main

    args = ["provision", "gcp", "--project", PROJECT, "--topic", "cli-topic"]
    args += ["--emulator-host", emulator.host, "--subscription", "cli-sub", "--json"]
    assert main(args) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["topic_created"] and done["subscription_created"]
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert not again["topic_created"] and not again["subscription_created"]
    assert main([*args[:3], "Bad_Project", *args[4:]]) == 2
    assert "project" in capsys.readouterr().err
