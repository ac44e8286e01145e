"""The generated broker config's persistence settings, against a real Mosquitto.

Issue 14's finding: with the registry offline (its persistent session queued on the
broker), a broker SIGKILLed 0.3 s after a PUBACK and restarted lost those messages,
because the config saved only every second. Count bins are now kept by the agent
until the registry confirms them (tests/test_delivery_faults.py kills the broker and
deletes its disk). Saving on every change (`autosave_on_changes=True`) also keeps the
other kinds; here it is killed the same way three times and the registry-like
subscriber must then receive every acknowledged message. Costs, and why it is not the
default: benchmarks/bench_broker_persistence.py, docs/operations.md.
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.mosquitto import Broker, BrokerConfig, BrokerSecurity

T = Topics()
TOPIC = T.counts("cam-1")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def subscriber(broker: Broker, got: list[bytes]) -> MqttConnection:
    conn = MqttConnection("registry", BrokerAddress(broker.host, broker.port), persistent=True)
    conn.subscribe(T.all_devices(), lambda topic, payload: got.append(payload))
    conn.start()
    assert conn.wait_connected(10)
    return conn


def publish_acked(broker: Broker, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam-1", protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(TOPIC, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
        assert all(i.is_published() for i in infos), "the broker did not acknowledge them"
    finally:
        client.disconnect()
        client.loop_stop()


def test_saving_on_every_change_keeps_what_the_broker_acknowledged(tmp_path):
    """The option for fleets that want every kind of message kept by the broker itself
    (count bins are kept by the end-to-end ack whatever the broker does:
    tests/test_delivery_faults.py)."""
    broker = Broker(tmp_path / "broker", autosave_on_changes=True).start()
    try:
        got: list[bytes] = []
        sub = subscriber(broker, got)
        for _ in range(20):  # until the subscription is active
            publish_acked(broker, [b"probe"])
            if wait_for(lambda: b"probe" in got, 0.5):
                break
        sub.stop()  # offline: from now on the broker queues for it

        sent = []
        for round_ in range(3):
            batch = [f"bin-{round_}-{i}".encode() for i in range(3)]
            publish_acked(broker, batch)
            sent += batch
            time.sleep(0.3)
            broker.proc.kill()
            broker.proc.wait()
            broker.start()

        got.clear()
        sub = subscriber(broker, got)
        wait_for(lambda: len(got) >= len(sent))
        time.sleep(0.3)
        sub.stop()
        assert got == sent
    finally:
        broker.stop()


def test_generated_settings(tmp_path):
    conf = BrokerConfig(port=1883, data_dir=tmp_path).render().splitlines()
    assert "autosave_on_changes false" in conf  # every second: see BrokerConfig
    assert "autosave_interval 1" in conf
    durable = BrokerConfig(port=1883, data_dir=tmp_path, autosave_on_changes=True).render()
    assert "autosave_on_changes true" in durable.splitlines()
    assert "persistence true" in conf
    # Anonymous (demo) config: no identities, so nothing to bind client ids to.
    assert not any(line.startswith("use_username_as_clientid") for line in conf)

    security = BrokerSecurity(
        password_file=tmp_path / "passwd",
        tls_port=8883,
        cafile=tmp_path / "ca.crt",
        certfile=tmp_path / "s.crt",
        keyfile=tmp_path / "s.key",
        require_certificate=True,
        use_identity_as_username=True,
    )
    conf = BrokerConfig(port=1883, data_dir=tmp_path, security=security).render().splitlines()
    listeners = [i for i, line in enumerate(conf) if line.startswith("listener ")]
    assert len(listeners) == 2
    for i in listeners:  # a per-listener option: right after each listener line
        assert conf[i + 1] == "use_username_as_clientid true"
    assert "allow_anonymous false" in conf
