"""The AWS IoT Core relay (awsiotsdk, MQTT 5 over mutual TLS) against a Mosquitto TLS
listener that requires client certificates signed by a test CA made with the
project's provisioning code: topics per device and kind, payloads, user properties,
pacing under the per-connection publish limit; a certificate from another CA is
refused and nothing leaves the outbox."""

from __future__ import annotations

import json
import time

import pytest

from flowfleet.provisioning.pki import issue, make_ca
from flowfleet.registry.relays import usage
from flowfleet.registry.relays.aws import IotCoreRelay
from flowfleet.registry.relays.job import RelayRunner
from flowfleet.registry.relays.settings import AwsRelay
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.relay_tables import RelayMessage
from flowfleet.registry.testing import fresh_database, release
from tests.relay_endpoints import (
    Collector,
    TlsBroker,
    any_db_fixture,  # noqa: F401 (the any_db fixture)
    bin_messages,
    drain,
    queue_bins,
    ride_out_an_outage,
)

THING = "relay-aws"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    broker = TlsBroker(tmp_path_factory.mktemp("iotcore"), client_certs=True).start()
    collector = Collector(broker, "flowfleet/#")
    yield broker, collector
    collector.close()
    broker.stop()


@pytest.fixture
def db(tmp_path):
    url = fresh_database(str(tmp_path / "relay.db"))
    database = regdb.open_database(url)
    yield database
    release()


def _settings(broker, cert, **changes) -> AwsRelay:
    values = dict(
        endpoint="localhost",
        port=broker.tls_port,
        client_id=THING,
        cert_file=str(cert.cert),
        key_file=str(cert.key),
        ca_file=str(broker.ca.cert),
        timeout_s=3.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    values.update(changes)
    return AwsRelay(**values)


def _queue(database, stream) -> None:
    queue_bins(database, "aws", stream)


def test_messages_arrive_per_device_topic_paced_under_the_limit(endpoint, db):
    broker, collector = endpoint
    start = len(collector.messages)
    stream = bin_messages(2, 15)
    _queue(db, stream)
    settings = _settings(broker, broker.client_cert(THING), pack=False, publishes_per_s=40)
    runner = RelayRunner(db, IotCoreRelay(settings), settings, lease_s=5)
    began = time.monotonic()
    try:
        assert drain(runner) == 30
    finally:
        runner.stop()
    took = time.monotonic() - began
    messages = collector.wait_for(start + 30)[start:]
    props = collector.properties[start : start + 30]
    assert len(messages) == 30
    sent = {f"{json.loads(p)['device']}/counts/{json.loads(p)['seq']}": p for _, p, _ in stream}
    for (topic, payload), prop in zip(messages, props, strict=True):
        body = json.loads(payload)
        assert topic == f"flowfleet/{body['device']}/counts"
        assert prop == {
            "id": f"{body['device']}/counts/{body['seq']}",
            "device": body["device"],
            "kind": "counts",
            "count": "1",
        }
        assert body == json.loads(sent[prop["id"]])
    # 30 publishes at 40/s on one connection: never faster than the pace.
    assert took >= 29 / 40
    arrived = collector.arrived[start : start + 30]
    assert (arrived[-1] - arrived[0]) >= 29 / 40 * 0.9
    with db.connection_context():
        used = usage.summary(time.time() - 3600, time.time() + 1)["aws"]
    assert used["messages"] == 30 and used["units"] == 30  # each bin < 5 KB: one unit


def test_packed_messages_stay_under_the_payload_cap(endpoint, db):
    broker, collector = endpoint
    start = len(collector.messages)
    _queue(db, bin_messages(1, 200))
    settings = _settings(broker, broker.client_cert(THING), pack_units=64)
    runner = RelayRunner(db, IotCoreRelay(settings), settings, lease_s=5)
    try:
        assert drain(runner) == 200
    finally:
        runner.stop()
    time.sleep(0.2)
    got = collector.messages[start:]
    assert all(len(p) <= 128 * 1024 for _, p in got)
    ids = [i for _, p in got for i in json.loads(p)["ids"]]
    assert ids == [f"cam-0/counts/{s}" for s in range(1, 201)]


def test_several_connections_share_the_outbox_each_under_the_limit(endpoint, db):
    """connections = 3: three client ids under the relay's certificate, each device's
    messages on one connection and in order, every id sent once, and each connection
    paced under publishes_per_s on its own."""
    broker, collector = endpoint
    start = len(collector.messages)
    _queue(db, bin_messages(6, 10))
    rate = 30
    settings = _settings(
        broker, broker.client_cert(THING), pack=False, publishes_per_s=rate, connections=3
    )
    relay = IotCoreRelay(settings)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        assert drain(runner) == 60
    finally:
        runner.stop()
    collector.wait_for(start + 60)
    time.sleep(0.2)  # a duplicate would arrive by now
    ids = [p["id"] for p in collector.properties[start:]]
    assert sorted(ids) == sorted(f"cam-{d}/counts/{s}" for d in range(6) for s in range(1, 11))
    for d in range(6):
        seqs = [int(i.rsplit("/", 1)[1]) for i in ids if i.startswith(f"cam-{d}/")]
        assert seqs == list(range(1, 11))
    # Three connections, each its own client id, with the relay's certificate.
    log = (broker.folder / "mosquitto.log").read_text()
    for cid in (THING, f"{THING}-2", f"{THING}-3"):
        assert f" as {cid} (" in log, cid
    stats = relay.stats
    assert [c.client_id for c in stats] == [THING, f"{THING}-2", f"{THING}-3"]
    # 6 devices on 3 connections: 2 each, 20 publishes each, at most `rate` per second.
    assert [c.publishes for c in stats] == [20, 20, 20]
    for c in stats:
        assert (c.last_at - c.first_at) >= (c.publishes - 1) / rate * 0.999


def test_a_certificate_from_another_ca_is_refused(endpoint, db, tmp_path):
    broker, _ = endpoint
    _queue(db, bin_messages(1, 2))
    stranger = issue(make_ca(tmp_path / "other-ca"), THING, tmp_path / "stranger")
    settings = _settings(broker, stranger, timeout_s=2.0)
    runner = RelayRunner(db, IotCoreRelay(settings), settings, lease_s=5)
    try:
        result = runner.run_once()
    finally:
        runner.stop()
    assert result.failed == 2 and result.error
    with db.connection_context():
        assert RelayMessage.select().where(RelayMessage.attempts == 1).count() == 2


def test_registry_service_relays_what_devices_publish(endpoint, broker, tmp_path):
    """The whole path: devices publish over MQTT, the registry ingests and its relay
    job forwards to the IoT Core stand-in; /api/relays shows it."""
    import threading
    import urllib.request

    import paho.mqtt.client as mqtt

    from flowfleet.mqtt import BrokerAddress
    from flowfleet.registry.http import auth
    from flowfleet.registry.relays.settings import RelaysSection
    from flowfleet.registry.service import run_registry

    tls, collector = endpoint
    start = len(collector.messages)
    settings = _settings(tls, tls.client_cert(THING), pack=False)
    database = regdb.open_database(tmp_path / "reg.sqlite")
    with database.connection_context():
        auth.create_user("viewer", "viewer", actor="test")
        token, _ = auth.create_token("viewer", actor="test")
    release()
    stop = threading.Event()
    ready: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            run_registry(
                tmp_path / "reg.sqlite",
                BrokerAddress(broker.host, broker.port),
                "127.0.0.1",
                0,
                stop_event=stop,
                on_ready=ready.append,
                relays=RelaysSection(tick_s=0.1, aws=settings),
                drift=None,
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not ready and not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready and not errors, errors
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-pub")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for topic, payload, _ in bin_messages(2, 5):
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        got = collector.wait_for(start + 10)[start:]
        assert sorted(p["id"] for p in collector.properties[start : start + 10]) == sorted(
            f"cam-{d}/counts/{s}" for d in range(2) for s in range(1, 6)
        )
        assert len(got) == 10
        time.sleep(0.3)  # the pass that forwarded them commits its usage after the PUBACKs
        request = urllib.request.Request(
            f"{ready[0]}api/relays", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request) as resp:
            body = json.loads(resp.read())
        (aws,) = body["relays"]
        assert aws["running"] and aws["queued"] == 0 and aws["usage"]["messages"] == 10
        assert aws["state"]["circuit"] == "closed"
    finally:
        stop.set()
        thread.join(20)
        release()


def test_endpoint_stopped_and_restarted_nothing_lost(endpoint, any_db):
    """The broker stops mid-stream under a relay with two connections (each fails on
    its own and reconnects): once it is back every id has arrived."""
    db = any_db
    broker, collector = endpoint
    start = len(collector.messages)
    _queue(db, bin_messages(2, 10))
    settings = _settings(
        broker,
        broker.client_cert(THING),
        pack=False,
        timeout_s=1.0,
        breaker_failures=2,
        breaker_cooldown_s=0.3,
        publishes_per_s=100,
        connections=2,
    )
    runner = RelayRunner(db, IotCoreRelay(settings), settings, lease_s=5)
    try:
        more = bin_messages(2, 10, first_seq=11)
        ride_out_an_outage(runner, broker, collector, lambda: _queue(db, more), 15)
    finally:
        runner.stop()
    collector.wait_for(start + 40)
    ids = {p["id"] for p in collector.properties[start:]}
    assert ids == {f"cam-{d}/counts/{s}" for d in range(2) for s in range(1, 21)}
