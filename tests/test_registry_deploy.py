"""Deployments through the REST API with real components, on SQLite and PostgreSQL.

A registry app whose command publisher (the commands outbox, published after commit)
runs on a real `flowfleet.mqtt.MqttConnection` to a real Mosquitto; a plain paho
client subscribes to the device's desired-state topic and checks what arrives the way
an agent would (contract parse, signature).
"""

from __future__ import annotations

import base64
import io
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet import signing
from flowfleet.contract import Desired, Topics, parse_payload
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.registry.catalog.keys import KeyRing
from flowfleet.registry.catalog.modelreg import ModelRegistry
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.db import Command, Deployment

TFLITE = "yolov8n_full_integer_quant.tflite"
TFLITE_DYN = "yolov8n_int8_dynamic.tflite"
DEVICE = "cam-01"
TOPICS = Topics()


@pytest.fixture
def connection(broker):
    conn = MqttConnection("test-registry", BrokerAddress(broker.host, broker.port))
    conn.start()
    assert conn.wait_connected(10)
    yield conn
    conn.stop()


@pytest.fixture
def commands(registry, connection):
    """The registry's command publisher on ``connection``, running."""
    publisher = CommandPublisher(registry.db, connection, tick_s=0.2)
    publisher.start()
    yield publisher
    publisher.stop()


class Subscriber:
    """A plain paho client on the device's desired topic."""

    def __init__(self, broker, device: str = DEVICE) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.messages.append(msg)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(TOPICS.desired(device), 1)
        assert self.subscribed.wait(10)

    def wait(self, count: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.messages) >= count, f"got {len(self.messages)} messages, want {count}"
        return self.messages

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def tokens(registry) -> dict[str, str]:
    out = {}
    with registry.db.connection_context():
        for role in auth.ROLES:
            auth.create_user(f"{role}-user", role, actor="test")
            out[role], _ = auth.create_token(f"{role}-user", actor="test")
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client, token, path, name):
    resp = client.post(
        f"/api/models/{name}/versions",
        data={"file": (io.BytesIO(path.read_bytes()), path.name)},
        headers=bearer(token),
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def deploy(client, token, device=DEVICE, **body):
    return client.post(f"/api/devices/{device}/deployments", json=body, headers=bearer(token))


def verified(desired: Desired, camera: str, bundle: dict) -> dict:
    ref = desired.models[camera]
    manifest = base64.b64decode(ref.manifest)
    doc = signing.verify_manifest(manifest, ref.signature, ref.key_id, signing.load_bundle(bundle))
    assert (doc["name"], doc["version"], doc["sha256"]) == (ref.name, ref.version, ref.sha256)
    return doc


def test_deploy_publishes_a_retained_signed_desired_state(registry, tokens, broker, commands, data):
    app = create_app(registry.db, registry=registry, commands=commands)
    client = app.test_client()
    op = tokens["operator"]
    v1 = upload(client, op, data / "models" / TFLITE, "yolo")
    v2 = upload(client, op, data / "models" / TFLITE_DYN, "yolo")
    bundle = client.get("/api/keys").get_json()

    resp = deploy(client, op, camera="road", model="yolo", version=1, reason="first")
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["deployment"]["desired_version"] == 1
    assert body["topic"] == TOPICS.desired(DEVICE)
    # Published after commit; the request waited for the broker's PUBACK.
    assert body["command"]["status"] == "published", body["command"]
    assert body["command"]["topic"] == TOPICS.desired(DEVICE)
    assert body["command"]["id"] == body["deployment"]["command_id"]

    # A subscriber that arrives later gets the retained message.
    sub = Subscriber(broker)
    try:
        (msg,) = sub.wait(1)
        assert msg.retain
        desired = parse_payload("desired", msg.payload, device=DEVICE)
        assert isinstance(desired, Desired)
        assert desired.version == 1
        assert verified(desired, "road", bundle)["sha256"] == v1["sha256"]
        ref = desired.models["road"]
        assert ref.url == v1["download_url"]  # relative to the registry
        art = client.get(ref.url, headers=bearer(tokens["viewer"]))
        assert art.status_code == 200 and art.headers["X-Checksum-Sha256"] == ref.sha256

        # A second camera, by alias: the whole device state, next version.
        client.put(
            "/api/models/yolo/aliases/production",
            json={"version": 2},
            headers=bearer(op),
        )
        resp = deploy(client, op, camera="yard", model="yolo", alias="production")
        assert resp.status_code == 201, resp.get_json()
        msgs = sub.wait(2)
        desired = parse_payload("desired", msgs[1].payload, device=DEVICE)
        assert desired.version == 2
        assert set(desired.models) == {"road", "yard"}
        assert desired.models["road"].version == 1
        assert verified(desired, "yard", bundle)["sha256"] == v2["sha256"]

        # Moving a camera: the version keeps growing, never reused.
        resp = deploy(client, op, camera="road", model="yolo", version=2)
        assert resp.status_code == 201
        desired = parse_payload("desired", sub.wait(3)[2].payload, device=DEVICE)
        assert desired.version == 3
        assert desired.models["road"].version == 2

        listed = client.get(f"/api/devices/{DEVICE}/deployments", headers=bearer(tokens["viewer"]))
        assert listed.status_code == 200
        doc = listed.get_json()
        assert doc["desired_version"] == 3
        assert [(d["camera"], d["model"], d["version"]) for d in doc["deployments"]] == [
            ("road", "yolo", 2),
            ("yard", "yolo", 2),
        ]

        # Refusals publish nothing and store nothing.
        for body, status in (
            ({"camera": "road", "model": "nope", "version": 1}, 404),
            ({"camera": "road", "model": "yolo", "version": 9}, 404),
            ({"camera": "road", "model": "yolo", "alias": "missing"}, 404),
            ({"camera": "road", "model": "yolo"}, 400),
            ({"camera": "road", "model": "yolo", "version": 1, "alias": "production"}, 400),
            ({"camera": "../x", "model": "yolo", "version": 1}, 400),
        ):
            resp = deploy(client, op, **body)
            assert resp.status_code == status, (body, resp.get_json())
        resp = deploy(client, tokens["viewer"], camera="road", model="yolo", version=1)
        assert resp.status_code == 403
        time.sleep(0.3)
        assert len(sub.messages) == 3

        # The deployed version cannot be deleted; version 1 no longer is deployed.
        client.delete("/api/models/yolo/aliases/production", headers=bearer(op))
        resp = client.delete("/api/models/yolo/versions/2", headers=bearer(op))
        assert resp.status_code == 409
        assert resp.get_json()["error"]["code"] == "version_in_use"
        assert client.delete("/api/models/yolo/versions/1", headers=bearer(op)).status_code == 204

        # The audit trail has every deployment.
        trail = client.get(
            f"/api/audit?target=device:{DEVICE}", headers=bearer(tokens["operator"])
        ).get_json()
        actions = [(e["action"], e["details"]["desired_version"]) for e in trail["entries"]]
        assert actions == [("deployment.set", 3), ("deployment.set", 2), ("deployment.set", 1)]
    finally:
        sub.close()


def test_without_a_publisher_deploying_answers_503_and_stores_nothing(registry, tokens, data):
    client = create_app(registry.db, registry=registry).test_client()
    upload(client, tokens["operator"], data / "models" / TFLITE, "yolo")
    resp = deploy(client, tokens["operator"], camera="road", model="yolo", version=1)
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "no_publisher"
    with registry.db.connection_context():
        assert Deployment.select().count() == 0
        assert Command.select().count() == 0
    listed = client.get(f"/api/devices/{DEVICE}/deployments", headers=bearer(tokens["viewer"]))
    assert listed.get_json() == {"device": DEVICE, "desired_version": None, "deployments": []}


def test_a_failed_transaction_publishes_no_desired_state(registry, broker, commands, data):
    """The desired state is queued inside the deployment's transaction: when that
    transaction fails after the command was written, there is no row and nothing
    reaches the broker (the publisher was even woken up before the rollback)."""
    with registry.db.connection_context():
        registry.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="t")
    sub = Subscriber(broker)
    try:
        with registry.db.connection_context():
            with pytest.raises(RuntimeError, match="after enqueue"), registry.db.atomic():
                desired, row = registry.deploy(
                    DEVICE, "road", "yolo", 1, actor="t", commands=commands
                )
                assert Command.get_by_id(row["command_id"]).published_at is None
                raise RuntimeError("the transaction fails after enqueue")
            assert Command.select().count() == 0
            assert Deployment.select().count() == 0
        commands.publish_pending()
        time.sleep(0.5)
        assert sub.messages == []

        # The next deployment is delivered, with the version the failed one did not use.
        with registry.db.connection_context():
            desired, row = registry.deploy(DEVICE, "road", "yolo", 1, actor="t", commands=commands)
        (msg,) = sub.wait(1)
        assert parse_payload("desired", msg.payload, device=DEVICE).version == desired.version == 1
    finally:
        sub.close()
    late = Subscriber(broker)  # the retained state is that one
    try:
        (msg,) = late.wait(1)
        assert msg.retain and parse_payload("desired", msg.payload, device=DEVICE).version == 1
    finally:
        late.close()


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_deploy_while_the_broker_is_down_is_queued_and_published_when_it_is_back(
    registry, tokens, broker, data
):
    """Accepted and queued during a broker outage (201, command "queued"); published
    once the broker is back, and marked published only after its PUBACK."""
    conn = MqttConnection(
        "test-registry-outage",
        BrokerAddress(broker.host, broker.port),
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )
    conn.start()
    assert conn.wait_connected(10)
    publisher = CommandPublisher(registry.db, conn, tick_s=0.1)
    publisher.start()
    acked: list[int] = []
    on_ack = conn.on_ack
    conn.on_ack = lambda mid: (acked.append(mid), on_ack(mid))  # observe the PUBACKs
    sub = None
    try:
        client = create_app(registry.db, registry=registry, commands=publisher).test_client()
        upload(client, tokens["operator"], data / "models" / TFLITE, "yolo")
        broker.stop()
        wait_until(lambda: not conn.connected.is_set(), what="the disconnect")

        started = time.monotonic()
        resp = deploy(client, tokens["operator"], camera="road", model="yolo", version=1)
        assert resp.status_code == 201, resp.get_json()
        assert time.monotonic() - started < 1.0, "must not wait for a broker that is down"
        command = resp.get_json()["command"]
        assert command["status"] == "queued" and command["published_at"] is None
        time.sleep(0.5)  # several publisher ticks
        with registry.db.connection_context():
            row = Command.get_by_id(command["id"])
            assert row.published_at is None and row.attempts == 0
        assert acked == []

        broker.start()

        def marked() -> bool:
            with registry.db.connection_context():
                return Command.get_by_id(command["id"]).published_at is not None

        wait_until(marked, what="the command to be marked published")
        assert acked, "marked published without a PUBACK"
        with registry.db.connection_context():
            assert Command.get_by_id(command["id"]).attempts >= 1
        sub = Subscriber(broker)  # after the publish: it gets the retained message
        (msg,) = sub.wait(1)
        assert msg.retain
        assert parse_payload("desired", msg.payload, device=DEVICE).version == 1
        health = client.get("/healthz").get_json()
        assert health["commands"] == {"pending": 0, "oldest_pending_s": None}
    finally:
        if sub is not None:
            sub.close()
        publisher.stop()
        conn.stop()


def test_run_registry_publishes_deployments_on_its_mqtt_session(tmp_path, broker, data):
    """The service wiring: run_registry's publisher is its ingest connection."""
    import json
    import urllib.request

    from flowfleet.registry.catalog.modelreg import RegistryConfig
    from flowfleet.registry.service import run_registry
    from flowfleet.registry.testing import release

    db_path = tmp_path / "r.db"
    db = regdb.open_database(db_path)
    reg = ModelRegistry.from_config(db, RegistryConfig.beside(db_path))
    reg.start()
    with db.connection_context():
        reg.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="test")
        auth.create_user("ops", "operator", actor="test")
        token, _ = auth.create_token("ops", actor="test")
    stop = threading.Event()
    ready: list[str] = []
    thread = threading.Thread(
        target=run_registry,
        args=(db_path, BrokerAddress(broker.host, broker.port)),
        kwargs={"http_port": 0, "stop_event": stop, "on_ready": ready.append},
        daemon=True,
    )
    thread.start()
    sub = None
    try:
        deadline = time.monotonic() + 15
        while not ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready
        req = urllib.request.Request(
            f"{ready[0]}api/devices/{DEVICE}/deployments",
            data=json.dumps({"camera": "road", "model": "yolo", "version": 1}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
        sub = Subscriber(broker)  # after the publish: it gets the retained message
        (msg,) = sub.wait(1)
        assert msg.retain
        assert parse_payload("desired", msg.payload, device=DEVICE).version == 1

        def health() -> dict:
            with urllib.request.urlopen(f"{ready[0]}healthz", timeout=10) as resp:
                return json.load(resp)

        deadline = time.monotonic() + 10
        while health()["commands"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health()["commands"] == {"pending": 0, "oldest_pending_s": None}
    finally:
        if sub is not None:
            sub.close()
        stop.set()
        thread.join(15)
        release()


def test_concurrent_first_deploys_to_one_new_camera_all_succeed_in_order(
    registry, broker, commands, data
):
    """Several operators deploying to the same new camera at once: no 500 from the
    unique (device, camera) index; each gets its own desired version, the row left
    holds the last one, and so does the broker's retained desired state."""
    with registry.db.connection_context():
        registry.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="t")
    results: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def deploy_once() -> None:
        try:
            with registry.db.connection_context():
                start.wait()
                desired, _ = registry.deploy(
                    "cam-02", "new", "yolo", 1, actor="t", commands=commands
                )
                results.append(desired.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deploy_once) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    with registry.db.connection_context():
        rows = list(Deployment.select().where(Deployment.device == "cam-02"))
    assert len(rows) == 1 and rows[0].desired_version == 6

    def settled() -> bool:  # every command published or superseded, none queued
        with registry.db.connection_context():
            return (
                not Command.select()
                .where(Command.published_at.is_null() & Command.superseded_by.is_null())
                .count()
            )

    wait_until(settled, what="the commands to be published")
    sub = Subscriber(broker, "cam-02")
    try:
        (msg,) = sub.wait(1)
        assert parse_payload("desired", msg.payload, device="cam-02").version == 6
    finally:
        sub.close()


def test_workers_starting_together_on_an_empty_database_create_one_signing_key(registry, tmp_path):
    with registry.db.connection_context():
        regdb.Signature.delete().execute()
        regdb.SigningKey.delete().execute()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def start_worker() -> None:
        try:
            with registry.db.connection_context():
                start.wait()
                KeyRing(tmp_path / "shared-keys").ensure_key()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with registry.db.connection_context():
        assert regdb.SigningKey.select().count() == 1
    assert len(list((tmp_path / "shared-keys").glob("*.key"))) == 1
