"""TLS, per-device credentials and the broker ACL: a device speaks only for itself.

A real Mosquitto with the generated config: a password listener and a mutual-TLS
listener (certificates from a test CA made with `cryptography`), and the generated
ACL. Devices connect with the agent's own `MqttConnection`.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.agent.config import AgentConfig
from flowfleet.agent.service import AgentService
from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.mosquitto import (
    Broker,
)
from flowfleet.provisioning.pki import issue, make_ca

from .factories import secured_broker_config

T = Topics()


class Listener:
    """The registry: reads every device topic with its own credentials."""

    def __init__(self, broker: Broker, password: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set("registry", password)
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("flowfleet/v1/devices/#", 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.ready.wait(5), "registry listener did not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def connect(address: BrokerAddress, name: str, acks: list | None = None) -> MqttConnection:
    conn = MqttConnection(name, address, on_ack=(acks.append if acks is not None else None))
    conn.start()
    return conn


def test_tls_and_passwords_with_per_device_acl(tmp_path):
    security, ca = secured_broker_config(
        tmp_path, {"registry": "reg-secret", "cam-p": "cam-p-secret"}, mtls=True
    )
    cam_a = issue(ca, "cam-a", tmp_path / "pki")
    stranger_ca = make_ca(tmp_path / "other")
    forged = issue(stranger_ca, "cam-b", tmp_path / "other")
    assert oct(security.password_file.stat().st_mode & 0o777) == "0o600"
    with Broker(tmp_path / "broker", security=security) as broker:
        conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and "require_certificate true" in conf
        registry = Listener(broker, "reg-secret")
        tls = BrokerAddress(
            "127.0.0.1",
            broker.tls_port,
            ca_file=str(ca.cert),
            cert_file=str(cam_a.cert),
            key_file=str(cam_a.key),
        )
        acks_a: list[int] = []
        a = connect(tls, "cam-a", acks_a)
        p = connect(BrokerAddress(broker.host, broker.port, "cam-p", "cam-p-secret"), "cam-p")
        bad_pw = connect(BrokerAddress(broker.host, broker.port, "cam-p", "wrong"), "bad-pw")
        anonymous = connect(BrokerAddress(broker.host, broker.port), "anon")
        forged_conn = connect(
            BrokerAddress(
                "127.0.0.1",
                broker.tls_port,
                ca_file=str(ca.cert),
                cert_file=str(forged.cert),
                key_file=str(forged.key),
            ),
            "forged",
        )
        try:
            assert a.wait_connected(10), "mTLS device did not connect"
            assert p.wait_connected(10), "password device did not connect"

            own = a.publish(T.counts("cam-a"), b"a-own")
            a.publish(T.counts("cam-b"), b"a-as-b")
            p.publish(T.health("cam-p"), b"p-own")
            p.publish(T.counts("cam-a"), b"p-as-a")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(registry.got) < 2:
                time.sleep(0.05)
            time.sleep(0.5)  # anything forbidden would have arrived by now too
            assert sorted(registry.got) == [
                (T.counts("cam-a"), b"a-own"),
                (T.health("cam-p"), b"p-own"),
            ]
            # Only the allowed publish counts as acknowledged: a refused one stays in
            # the agent's outbox instead of being deleted as if delivered.
            assert acks_a == [own]

            # Commands: a device reads its own subtree only.
            reg = registry.client
            reg.publish(T.desired("cam-a"), b"for-a", qos=1, retain=True).wait_for_publish(5)
            reg.publish(T.desired("cam-p"), b"for-p", qos=1, retain=True).wait_for_publish(5)
            got: list[bytes] = []
            a.subscribe("flowfleet/v1/commands/#", lambda t, m: got.append(m))
            time.sleep(1.0)
            assert got == [b"for-a"]

            # Wrong password, no credentials, a certificate from another CA: refused.
            for conn in (bad_pw, anonymous, forged_conn):
                assert not conn.connected.is_set()

            # The agent itself, configured from its TOML keys: mTLS and a password file.
            (tmp_path / "cam-p.pw").write_text("cam-p-secret\n")
            for device, broker_keys in (
                (
                    "cam-a",
                    {
                        "port": broker.tls_port,
                        "ca_file": str(ca.cert),
                        "cert_file": str(cam_a.cert),
                        "key_file": str(cam_a.key),
                    },
                ),
                (
                    "cam-p",
                    {
                        "port": broker.port,
                        "username": "cam-p",
                        "password_file": str(tmp_path / "cam-p.pw"),
                    },
                ),
            ):
                service = AgentService(
                    AgentConfig.model_validate(
                        {
                            "device_id": device,
                            "state_dir": str(tmp_path / f"state-{device}"),
                            "drift_seconds": 0,
                            "broker": {"host": "127.0.0.1", **broker_keys},
                            "cameras": [
                                {"name": "c", "source": "/nonexistent.mp4", "model": "m.tflite"}
                            ],
                        }
                    )
                )
                service.start()
                try:
                    assert service.connection.wait_connected(10), device
                    online = T.status(device)
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and not any(
                        t == online and b'"online"' in m for t, m in registry.got
                    ):
                        time.sleep(0.05)
                    assert any(t == online and b'"online"' in m for t, m in registry.got)
                finally:
                    service.stop()
        finally:
            for conn in (a, p, bad_pw, anonymous, forged_conn):
                conn.stop()
            registry.close()
