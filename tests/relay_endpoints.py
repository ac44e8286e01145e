"""Local stand-ins for the clouds the relays talk to (real protocol endpoints):

- `PubSubEmulator`: Google's Pub/Sub emulator (``gcloud beta emulators pubsub start``,
  package google-cloud-cli-pubsub-emulator, needs Java);
- `TlsBroker`: a Mosquitto with a TLS listener laid out like an IoT endpoint, either
  with passwords (Azure IoT Hub: the SAS token is the password) or requiring client
  certificates signed by a test CA (AWS IoT Core), plus a plain listener on
  localhost for the test's own subscriber.

Each can be stopped and started again on the same port (the fault tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flowfleet.provisioning.mosquitto import find_mosquitto, free_port, hash_password
from flowfleet.provisioning.pki import issue, make_ca


@pytest.fixture(name="any_db")
def any_db_fixture(db_url):
    """The test module's registry database of each kind (SQLite, then PostgreSQL, from
    conftest's ``db_url``), emptied: for the fault tests that must hold on both."""
    from flowfleet.registry.store import db as regdb
    from flowfleet.registry.testing import fresh_database, release

    database = regdb.open_database(fresh_database(db_url))
    yield database
    release()


class PubSubEmulator:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PubSubEmulator:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "emulator.log", "a")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [
                "gcloud",
                "beta",
                "emulators",
                "pubsub",
                "start",
                f"--host-port={self.host}",
                f"--data-dir={self.folder / 'data'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the emulator's java child goes with the group
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log.write(line)
            if "Server started" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Pub/Sub emulator did not start")
        else:
            raise RuntimeError(f"the Pub/Sub emulator exited: see {self.folder / 'emulator.log'}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


class TlsBroker:
    """Mosquitto: a TLS listener for the relay (server certificate for localhost from a
    test CA made with flowfleet.provisioning.pki) and a plain one for the test."""

    def __init__(
        self,
        folder: Path,
        *,
        users: dict[str, str] | None = None,
        client_certs: bool = False,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca(folder / "ca", name="relay test CA")
        self.server = issue(
            self.ca, "localhost", folder / "server", server=True, hosts=("localhost", "127.0.0.1")
        )
        self.tls_port = free_port()
        self.port = free_port()
        self.users = dict(users or {})
        self.users.setdefault("tester", "tester-secret")
        self.client_certs = client_certs
        self.proc: subprocess.Popen | None = None

    def client_cert(self, name: str):
        """A client certificate signed by the test CA (the AWS thing's)."""
        return issue(self.ca, name, self.folder / "clients")

    def _config(self) -> Path:
        pw = self.folder / "passwords"
        pw.write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in self.users.items()))
        pw.chmod(0o600)
        lines = [
            "per_listener_settings true",
            # As root, mosquitto would switch to its own user and not read our files.
            *(["user root"] if os.geteuid() == 0 else []),
            "persistence false",
            "set_tcp_nodelay true",  # PUBACKs at once, as a cloud endpoint sends them
            f"log_dest file {self.folder / 'mosquitto.log'}",
            "log_type all",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {pw}",
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {self.ca.cert}",
            f"certfile {self.server.cert}",
            f"keyfile {self.server.key}",
            "max_inflight_messages 0",
            "max_queued_messages 100000",
        ]
        if self.client_certs:
            lines += [
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        else:
            lines += ["allow_anonymous false", f"password_file {pw}"]
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> TlsBroker:
        import socket

        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self._config())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        for port in (self.port, self.tls_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"mosquitto did not start: {self.proc.stderr.read().decode()}"
                        ) from None
                    time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Collector:
    """The test's subscriber on the plain listener: every message received on
    ``topic_filter`` as (topic, payload, properties)."""

    def __init__(self, broker: TlsBroker, topic_filter: str) -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        # Per message: its MQTT 5 user properties and when it arrived (monotonic).
        self.properties: list[dict[str, str]] = []
        self.arrived: list[float] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tester", protocol=mqtt.MQTTv5)
        c.username_pw_set("tester", broker.users["tester"])

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe(topic_filter, qos=1)

        def on_disconnect(client, userdata, flags, rc, props):
            self._ready.clear()

        def on_subscribe(client, userdata, mid, rcs, props):
            self._ready.set()

        def on_message(client, userdata, msg):
            props = getattr(msg.properties, "UserProperty", None) or []
            with self._lock:
                self.messages.append((msg.topic, bytes(msg.payload)))
                self.properties.append(dict(props))
                self.arrived.append(time.monotonic())

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.on_disconnect = on_disconnect
        c.reconnect_delay_set(0.05, 0.5)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        self.client = c
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the subscription stands (again, after a broker restart)."""
        if not self._ready.wait(timeout):
            raise RuntimeError("the test subscriber could not subscribe")

    def wait_for(self, n: int, timeout: float = 20.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bin_messages(devices: int, per_device: int, *, first_seq: int = 1, now: float | None = None):
    """(topic, payload, received_at) count bins of ``devices`` devices, interleaved."""
    import json

    from flowfleet.contract import Topics
    from tests.factories import valid_payload

    topics = Topics()
    t = time.time() if now is None else now
    out = []
    for seq in range(first_seq, first_seq + per_device):
        for d in range(devices):
            body = valid_payload("counts", f"cam-{d}", seq, now=t)
            body["start"] = t - 86400 + 60 * seq
            body["end"] = body["start"] + 60
            out.append((topics.device(f"cam-{d}", "counts"), json.dumps(body).encode(), t))
    return out


def drain(runner, passes: int = 1000) -> int:
    """Run a relay's passes until its outbox has nothing due; returns rows forwarded."""
    from flowfleet.registry.relays import outbox

    forwarded = 0
    for _ in range(passes):
        result = runner.run_once()
        forwarded += result.forwarded
        with runner.db.connection_context():
            if not outbox.due(runner.name, 1):
                return forwarded
        if result.error:
            raise AssertionError(f"relay {runner.name} failed: {result.error}")
    raise AssertionError(f"relay {runner.name} still has rows after {passes} passes")


def queue_bins(database, relay: str, stream) -> None:
    """Queue (topic, payload, received_at) count bins in ``relay``'s outbox, as ingest
    does when it stores them."""
    from flowfleet.registry.relays import outbox
    from flowfleet.registry.relays.outbox import Route, Stored

    rows = []
    for _topic, payload, t in stream:
        body = json.loads(payload)
        rows.append(Stored(body["device"], "counts", body["seq"], payload.decode(), t))
    with database.connection_context(), database.atomic():
        outbox.queue_stored(database, [Route(relay, ("counts",))], rows)


def ride_out_an_outage(runner, broker, collector, more, open_within_s: float) -> None:
    """Forward what is queued, queue ``more`` and stop the endpoint's broker until the
    relay's circuit opens (within ``open_within_s``), then restart it and forward the
    rest once the breaker's cooldown (0.3 s in these tests) is over."""
    drain(runner)
    more()
    broker.stop()
    deadline = time.monotonic() + open_within_s
    while runner.circuit != "open" and time.monotonic() < deadline:
        runner.run_once()
        time.sleep(0.02)
    assert runner.circuit == "open"
    broker.start()
    collector.wait_ready()
    time.sleep(0.3)  # the cooldown
    drain(runner)
