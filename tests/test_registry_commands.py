"""The commands outbox (`flowfleet.registry.fleet.commands`) with a real Mosquitto, on
SQLite and PostgreSQL: only the newest retained state of a topic is sent, two
publishers on one database do not send a row twice, an older state that reaches the
broker late puts the newest back in the queue, and the pending count is visible in
/healthz and /metrics. Deploys through the API are in test_registry_deploy.py."""

# The deployment tests' fixtures are imported below; pytest injects them by name.
# ruff: noqa: F811

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.registry.fleet.commands import CommandPublisher, commands, enqueue_command
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store.db import Command, now
from tests.test_registry_deploy import (  # noqa: F401 - fixtures
    TFLITE,
    bearer,
    connection,
    deploy,
    tokens,
    upload,
    wait_until,
)


class Listener:
    """A plain paho client on a topic filter, recording (topic, payload, retain)."""

    def __init__(self, broker, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, 1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def received(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def settled(db) -> bool:
    with db.connection_context():
        return (
            not Command.select()
            .where(Command.published_at.is_null() & Command.superseded_by.is_null())
            .count()
        )


def statuses(db, ids) -> list[str]:
    with db.connection_context():
        return [c["status"] for c in commands(ids)]


def test_only_the_newest_retained_state_of_a_topic_is_sent(registry, broker, connection):
    db = registry.db
    publisher = CommandPublisher(db, connection)  # passes run by hand, no thread
    with db.connection_context(), db.atomic():
        ids = [enqueue_command("cam-1", "t/cam-1/desired", f"v{n}", retain=True) for n in (1, 2, 3)]
        other = enqueue_command("cam-2", "t/cam-2/desired", "only", retain=True)
        plain = enqueue_command("cam-1", "t/cam-1/note", "hello")
    assert statuses(db, [*ids, other, plain]) == ["superseded", "superseded"] + ["queued"] * 3
    assert publisher.publish_pending() == 3
    wait_until(lambda: publisher.publish_pending() == 0 and settled(db), what="the PUBACKs")
    assert statuses(db, [*ids, other, plain]) == ["superseded", "superseded"] + ["published"] * 3
    late = Listener(broker, "t/#")
    try:
        wait_until(lambda: len(late.received()) == 2, what="the retained messages")
        time.sleep(0.2)
        assert sorted(late.received()) == [
            ("t/cam-1/desired", b"v3", True),
            ("t/cam-2/desired", b"only", True),
        ]
    finally:
        late.close()


def test_two_publishers_on_one_database_send_each_command_once(registry, broker):
    db = registry.db
    conns = [
        MqttConnection(f"test-publisher-{n}", BrokerAddress(broker.host, broker.port))
        for n in (1, 2)
    ]
    for conn in conns:
        conn.start()
        assert conn.wait_connected(10)
    publishers = [CommandPublisher(db, conn, batch=7) for conn in conns]
    listener = Listener(broker, "t/#")
    try:
        with db.connection_context(), db.atomic():
            ids = [enqueue_command(f"cam-{n}", f"t/cam-{n}/c", f"{n}") for n in range(40)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(publisher: CommandPublisher) -> None:
            try:
                barrier.wait()
                deadline = time.monotonic() + 20
                while not settled(db) and time.monotonic() < deadline:
                    publisher.publish_pending()
                    time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p,)) for p in publishers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert statuses(db, ids) == ["published"] * 40
        wait_until(lambda: len(listener.received()) >= 40, what="40 messages")
        time.sleep(0.3)
        got = sorted(topic for topic, _, _ in listener.received())
        assert got == sorted(f"t/cam-{n}/c" for n in range(40)), "a command was sent twice"
        assert sum(p.sent for p in publishers) == 40
        with db.connection_context():
            assert {c.attempts for c in Command.select()} == {1}
    finally:
        listener.close()
        for publisher in publishers:
            publisher.stop()
        for conn in conns:
            conn.stop()


def test_an_older_state_acknowledged_after_the_newest_puts_the_newest_back(
    registry, broker, connection
):
    """v1 was in flight when v2 superseded it; v2 was published first (by another
    publisher, say), then v1's PUBACK arrives: the broker may now retain v1, so v2 is
    queued and sent again, and the broker ends on v2."""
    db = registry.db
    publisher = CommandPublisher(db, connection)
    with db.connection_context():
        v1 = enqueue_command("cam-1", "t/cam-1/desired", "v1", retain=True)
        v2 = enqueue_command("cam-1", "t/cam-1/desired", "v2", retain=True)
    publisher.publish_pending()
    wait_until(lambda: publisher.publish_pending() == 0 and settled(db), what="v2 published")
    assert statuses(db, [v1, v2]) == ["superseded", "published"]
    with db.connection_context(), db.atomic():
        publisher._mark_published(v1, now())  # v1's late PUBACK
        row = Command.get_by_id(v2)
        assert row.published_at is None and "older command" in row.last_error
    listener = Listener(broker, "t/#")
    try:
        assert publisher.publish_pending() == 1
        wait_until(lambda: publisher.publish_pending() == 0 and settled(db), what="v2 again")
        assert statuses(db, [v1, v2]) == ["published", "published"]
        wait_until(lambda: len(listener.received()) >= 2, what="retained v2, then v2 again")
        assert [payload for _, payload, _ in listener.received()] == [b"v2", b"v2"]
    finally:
        listener.close()


def test_queued_commands_show_in_healthz_and_metrics(registry, tokens, data):
    """A queue-only publisher (no MQTT connection): the deploy is accepted and queued,
    and the outbox's pending count and age are reported."""
    app = create_app(registry.db, registry=registry, commands=CommandPublisher(registry.db))
    client = app.test_client()
    upload(client, tokens["operator"], data / "models" / TFLITE, "yolo")
    assert client.get("/healthz").get_json()["commands"] == {
        "pending": 0,
        "oldest_pending_s": None,
    }
    resp = deploy(client, tokens["operator"], camera="road", model="yolo", version=1)
    assert resp.status_code == 201
    assert resp.get_json()["command"]["status"] == "queued"
    health = client.get("/healthz").get_json()
    assert health["commands"]["pending"] == 1 and health["commands"]["oldest_pending_s"] >= 0
    text = client.get("/metrics", headers=bearer(tokens["viewer"])).get_data(as_text=True)
    assert "flowfleet_registry_commands_pending 1.0" in text
    assert "flowfleet_registry_commands_oldest_pending_seconds" in text


@pytest.mark.parametrize("payload", ["text", b"\x00\xffbytes"])
def test_payloads_round_trip_as_bytes(registry, payload):
    with registry.db.connection_context():
        row = Command.get_by_id(enqueue_command("cam-1", "t/x", payload))
        want = payload.encode() if isinstance(payload, str) else payload
        assert bytes(row.payload) == want
