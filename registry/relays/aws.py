"""AWS IoT Core relay: MQTT 5 over mutual TLS with `awsiotsdk` (the AWS CRT client).

The relay is one IoT thing (``client_id``) with its certificate and key
(`flowfleet provision aws` creates them). Each packet is a QoS 1 PUBLISH on
``<topic_prefix>/<device>/<kind>`` with the user properties ``id`` (the first message
id), ``device``, ``kind`` and ``count``; IoT Core's PUBACK is the acknowledgement.

The SDK keeps its operation queue in memory and, around a disconnect, may never
complete a QoS 1 publish unless an ack timeout is set: ``ack_timeout_sec`` is the
relay's ``timeout_s``, the queue fails every operation on disconnect
(``FAIL_ALL_ON_DISCONNECT``), and the outbox row stays until a PUBACK came back.

IoT Core's documented limits per connection: 100 publishes per second (the relay
paces at ``publishes_per_s``, 90 by default), 512 KB/s of outbound throughput (the
SDK's AWS_IOT_CORE_DEFAULTS flow control throttles to both) and 128 KB per payload.
It meters messages in 5 KB increments. So one connection forwards at most about
512 KB/s / message size: some 900 count bins per second, whatever the packing.

More throughput takes more connections: with ``connections = N`` the relay holds N
MQTT connections with the same certificate, each its own client id (`client_ids`:
the thing name, then ``<thing>-2`` .. ``<thing>-N``; the IoT policy must allow
``iot:Connect`` on each, which `flowfleet provision aws --connections N` writes), each
paced and flow-controlled on its own under the per-connection limits. A pass of the
relay job is one `send`: its packets are shared out among the connections, all of a
device's packets to one connection (so each device's messages stay in order), each
packet to exactly one, and the pass waits for every PUBACK before the next pass takes
rows: no id is ever in flight on two connections at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from .base import Packet, Relay, Unavailable
from .settings import AwsRelay

MAX_PAYLOAD = 128 * 1024
# A PUBACK reason that says the message itself is wrong (parked); any other failure
# (not authorized, quota) is the connection's and is retried.
_POISON = ("PAYLOAD_FORMAT_INVALID", "TOPIC_NAME_INVALID")


class Pacer:
    """At most ``rate`` events per second, spaced evenly (sleeps as needed)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = 0.0

    def wait(self) -> None:
        t = time.monotonic()
        if t < self.next:
            time.sleep(self.next - t)
            t = self.next
        self.next = max(t, self.next) + self.interval


def device_topic(prefix: str, device: str, kind: str) -> str:
    return f"{prefix}/{device}/{kind}"


def client_ids(thing: str, connections: int) -> list[str]:
    """The MQTT client ids of the relay's ``connections`` connections: the thing name
    first (IoT Core's thing policy variables apply to it), then ``<thing>-2`` ..."""
    return [thing] + [f"{thing}-{i}" for i in range(2, connections + 1)]


def share_out(packets: Sequence[Packet], n: int) -> list[list[int]]:
    """Indices of ``packets`` per connection: every packet of one device to the same
    connection (order per device), devices given to the least loaded connection by
    bytes, the largest first (balanced under the per-connection byte limit)."""
    by_device: dict[str, list[int]] = {}
    for i, p in enumerate(packets):
        by_device.setdefault(p.device, []).append(i)
    load = [0] * n
    shares: list[list[int]] = [[] for _ in range(n)]
    weight = {d: sum(packets[i].size + 64 for i in idx) for d, idx in by_device.items()}
    for device in sorted(by_device, key=lambda d: -weight[d]):
        k = load.index(min(load))
        shares[k].extend(by_device[device])
        load[k] += weight[device]
    for share in shares:
        share.sort()  # queue order within a connection
    return shares


@dataclass
class ConnectionStats:
    """What one connection published (for the benchmark and the pacing test)."""

    client_id: str
    publishes: int = 0
    bytes: int = 0
    first_at: float | None = None  # monotonic, first publish handed to the client
    last_at: float | None = None


class _Connection:
    """One MQTT 5 connection of the relay: its own client id, pacer and SDK flow
    control (IoT Core's limits are per connection)."""

    def __init__(self, settings: AwsRelay, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self.pacer = Pacer(settings.publishes_per_s)
        self.stats = ConnectionStats(client_id)
        self._client = None
        self._connected = threading.Event()
        self._failure: str | None = None

    def connect(self):
        if self._client is not None and self._connected.is_set():
            return self._client
        self.close()
        from awscrt import mqtt5
        from awsiot import mqtt5_client_builder

        s = self.settings
        self._connected.clear()
        self._failure = None
        ready = threading.Event()

        def on_success(data) -> None:
            self._connected.set()
            ready.set()

        def on_failure(data) -> None:
            self._failure = str(getattr(data, "exception", data))
            ready.set()

        def on_disconnect(data) -> None:
            self._connected.clear()

        flow = mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
        client = mqtt5_client_builder.mtls_from_path(
            endpoint=s.endpoint,
            port=s.port,
            cert_filepath=s.cert_file,
            pri_key_filepath=s.key_file,
            ca_filepath=s.ca_file,
            client_id=self.client_id,
            clean_start=True,
            ack_timeout_sec=max(1, math.ceil(s.timeout_s)),
            connack_timeout_ms=int(s.timeout_s * 1000),
            offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
            # 100 publishes/s and 512 KB/s per connection, enforced by the SDK (the
            # builder's default too; said here because the relay depends on it).
            extended_validation_and_flow_control_options=flow,
            min_reconnect_delay_ms=200,
            max_reconnect_delay_ms=5000,
            on_lifecycle_connection_success=on_success,
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_disconnection=on_disconnect,
        )
        client.start()
        self._client = client
        if not ready.wait(s.timeout_s) or not self._connected.is_set():
            why = self._failure or f"no CONNACK in {s.timeout_s:g}s"
            self.close()
            raise Unavailable(f"IoT Core {s.endpoint}:{s.port} as {self.client_id}: {why}")
        return client

    def send(self, packets: Sequence[Packet]) -> tuple[list[str | None], str | None]:
        """Publish ``packets`` in order, paced; per packet None (PUBACK) or why it is
        poison, up to the first failure, and that failure (None: all answered)."""
        from awscrt import mqtt5

        try:
            client = self.connect()
        except Unavailable as exc:
            return [], str(exc)
        s = self.settings
        stats = self.stats
        futures = []
        for p in packets:
            self.pacer.wait()
            props = [
                mqtt5.UserProperty("id", p.items[0].msg_id),
                mqtt5.UserProperty("device", p.device),
                mqtt5.UserProperty("kind", p.kind),
                mqtt5.UserProperty("count", str(len(p.items))),
            ]
            packet = mqtt5.PublishPacket(
                topic=device_topic(s.topic_prefix, p.device, p.kind),
                payload=p.body,
                qos=mqtt5.QoS.AT_LEAST_ONCE,
                payload_format_indicator=mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8,
                content_type="application/json",
                user_properties=props,
            )
            futures.append(client.publish(packet))
            t = time.monotonic()
            stats.first_at = stats.first_at or t
            stats.last_at = t
            stats.publishes += 1
            stats.bytes += p.size
        answers: list[str | None] = []
        deadline = time.monotonic() + s.timeout_s + 1.0
        for f in futures:
            try:
                done = f.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                return answers, f"no PUBACK from {s.endpoint} in {s.timeout_s:g}s"
            except Exception as exc:  # disconnected, ack timeout: outcome unknown
                return answers, f"{type(exc).__name__}: {exc}"
            code = getattr(done.puback, "reason_code", None)
            if (
                code is None
                or code == mqtt5.PubackReasonCode.SUCCESS
                or code.name == ("NO_MATCHING_SUBSCRIBERS")
            ):
                answers.append(None)
            elif code.name in _POISON:
                answers.append(f"PUBACK {code.name}")
            else:
                return answers, f"PUBACK {code.name}"
        return answers, None

    def close(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.stop()


class IotCoreRelay(Relay):
    name = "aws"
    unit_bytes = 5 * 1024
    max_payload = MAX_PAYLOAD

    def __init__(self, settings: AwsRelay) -> None:
        self.settings = settings
        self.connections = [
            _Connection(settings, cid)
            for cid in client_ids(settings.client_id, settings.connections)
        ]
        self._pool: ThreadPoolExecutor | None = None

    @property
    def stats(self) -> list[ConnectionStats]:
        """Per connection: what it published since the relay was made."""
        return [c.stats for c in self.connections]

    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        """Share ``packets`` out among the connections (`share_out`), publish the shares
        at once, one thread per connection, and wait for every answer."""
        shares = share_out(packets, len(self.connections))
        work = [(c, idx) for c, idx in zip(self.connections, shares, strict=True) if idx]
        if len(work) == 1:
            outcomes = [work[0][0].send([packets[i] for i in work[0][1]])]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.connections), "relay-aws")
            jobs = [self._pool.submit(c.send, [packets[i] for i in idx]) for c, idx in work]
            outcomes = [j.result() for j in jobs]
        answers: list[str | None] = [None] * len(packets)
        acked: list[int] = []
        failures = []
        for (conn, idx), (got, failed) in zip(work, outcomes, strict=True):
            for i, answer in zip(idx, got, strict=False):
                answers[i] = answer
                if answer is None:
                    acked.append(i)
            if failed is not None:
                conn.close()  # this connection starts afresh; the others keep theirs
                failures.append(failed)
        if failures:
            raise Unavailable("; ".join(dict.fromkeys(failures)), acked=sorted(acked))
        return answers

    def close(self) -> None:
        for c in self.connections:
            c.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
