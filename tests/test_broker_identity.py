"""Client ids are bound to identities: no device can take over the registry's session.

A real Mosquitto with the generated config: a password listener and a mutual-TLS
listener whose certificate CN becomes the username, the generated password file and
ACL. The registry is a persistent subscriber (`MqttConnection(persistent=True)` under
the username ``registry``, client id ``flowfleet-registry`` as the ingest worker
uses). While it is offline with messages queued, a device with its own valid
credentials connects with the registry's client id (``flowfleet-registry``, and
``registry``, the id the binding gives the registry): once taking over the session
(clean start false, which acknowledges and so drops what was queued) and once
discarding it (clean start). The registry then reconnects and must still receive
every queued message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.mosquitto import (
    Broker,
)
from flowfleet.provisioning.pki import Issued, issue

from .factories import secured_broker_config

T = Topics()
REGISTRY_PW = "reg-secret"
DEVICE_PW = "cam-p-secret"


@dataclass
class Setup:
    broker: Broker
    ca: Issued
    cam_a: Issued  # client certificate, CN cam-a (mTLS listener)

    def registry_address(self) -> BrokerAddress:
        return BrokerAddress(self.broker.host, self.broker.port, "registry", REGISTRY_PW)

    def device_address(self, listener: str) -> BrokerAddress:
        if listener == "password":
            return BrokerAddress(self.broker.host, self.broker.port, "cam-p", DEVICE_PW)
        return BrokerAddress(
            "127.0.0.1",
            self.broker.tls_port,
            ca_file=str(self.ca.cert),
            cert_file=str(self.cam_a.cert),
            key_file=str(self.cam_a.key),
        )


@pytest.fixture
def setup(tmp_path: Path):
    security, ca = secured_broker_config(
        tmp_path, {"registry": REGISTRY_PW, "cam-p": DEVICE_PW}, mtls=True
    )
    cam_a = issue(ca, "cam-a", tmp_path / "pki")
    with Broker(tmp_path / "broker", security=security) as broker:
        yield Setup(broker, ca, cam_a)


class Registry:
    """A registry-like persistent subscriber to every device topic."""

    def __init__(self, address: BrokerAddress, client_id: str = "flowfleet-registry") -> None:
        self.got: list[bytes] = []
        self.conn = MqttConnection(client_id, address, persistent=True)
        self.conn.subscribe(T.all_devices(), lambda topic, payload: self.got.append(payload))
        self.conn.start()
        assert self.conn.wait_connected(10), "registry did not connect"

    def stop(self) -> None:
        self.conn.stop()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def connected(name: str, address: BrokerAddress, **kw) -> MqttConnection:
    conn = MqttConnection(name, address, **kw)
    conn.start()
    assert conn.wait_connected(10), f"{name} did not connect"
    return conn


def publish_all(device: MqttConnection, topic: str, payloads: list[bytes]) -> None:
    acked: list[int] = []
    device.on_ack = acked.append
    mids = [device.publish(topic, p) for p in payloads]
    assert None not in mids
    assert wait_for(lambda: set(mids) <= set(acked)), "the broker did not acknowledge them"


def subscribed(registry: Registry, device: MqttConnection, topic: str) -> None:
    """Block until the registry's subscription is active (a probe arrives): its
    connection reports "connected" on CONNACK, before the SUBACK."""
    for _ in range(20):
        publish_all(device, topic, [b"probe"])
        if wait_for(lambda: b"probe" in registry.got, timeout=0.5):
            return
    raise AssertionError("the registry's subscription is not active")


@pytest.mark.parametrize("listener", ["password", "mtls"])
@pytest.mark.parametrize("stolen_id", ["flowfleet-registry", "registry"])
def test_a_device_cannot_take_over_the_registry_session(setup: Setup, listener, stolen_id):
    device_id = "cam-p" if listener == "password" else "cam-a"
    topic = T.counts(device_id)
    device = connected(f"flowfleet-agent-{device_id}", setup.device_address(listener))
    registry = Registry(setup.registry_address())
    try:
        subscribed(registry, device, topic)
        registry.stop()
        queued = [f"bin-{i}".encode() for i in range(20)]
        publish_all(device, topic, queued)

        # The same device, with its own valid credentials, claims the registry's id:
        # first resuming the session (it would receive and acknowledge the queue),
        # then with a clean start (the broker would discard the session).
        for persistent in (True, False):
            thief = connected(stolen_id, setup.device_address(listener), persistent=persistent)
            time.sleep(0.5)
            thief.stop()

        registry = Registry(setup.registry_address())
        wait_for(lambda: len(registry.got) >= len(queued), timeout=5)
        time.sleep(0.3)  # anything more (duplicates) would have arrived by now
        assert registry.got == queued
    finally:
        registry.stop()
        device.stop()


def test_registry_session_survives_registry_and_broker_restarts(setup: Setup):
    """Under the binding the registry's session is keyed by its username; it comes
    back after the registry restarts and after the broker restarts (persistence)."""
    device = connected("flowfleet-agent-cam-p", setup.device_address("password"))
    topic = T.counts("cam-p")
    registry = Registry(setup.registry_address())
    try:
        subscribed(registry, device, topic)
        registry.stop()
        first = [f"a-{i}".encode() for i in range(10)]
        publish_all(device, topic, first)

        registry = Registry(setup.registry_address())
        # Generous: the suite runs four files at once on two cores.
        assert wait_for(lambda: len(registry.got) == len(first), 30)
        registry.stop()

        second = [f"b-{i}".encode() for i in range(10)]
        publish_all(device, topic, second)
        device.stop()
        setup.broker.stop()
        setup.broker.start()

        registry = Registry(setup.registry_address())
        assert wait_for(lambda: len(registry.got) == len(second), 30), registry.got
        time.sleep(0.3)
        assert registry.got == second
    finally:
        registry.stop()
        device.stop()
