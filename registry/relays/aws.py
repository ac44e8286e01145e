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
512 KB/s / message size: some 800 count bins per second, whatever the packing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout

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


class IotCoreRelay(Relay):
    name = "aws"
    unit_bytes = 5 * 1024
    max_payload = MAX_PAYLOAD

    def __init__(self, settings: AwsRelay) -> None:
        self.settings = settings
        self.pacer = Pacer(settings.publishes_per_s)
        self._client = None
        self._connected = threading.Event()
        self._failure: str | None = None

    def _connect(self):
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

        client = mqtt5_client_builder.mtls_from_path(
            endpoint=s.endpoint,
            port=s.port,
            cert_filepath=s.cert_file,
            pri_key_filepath=s.key_file,
            ca_filepath=s.ca_file,
            client_id=s.client_id,
            clean_start=True,
            ack_timeout_sec=max(1, math.ceil(s.timeout_s)),
            connack_timeout_ms=int(s.timeout_s * 1000),
            offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
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
            raise Unavailable(f"IoT Core {s.endpoint}:{s.port}: {why}")
        return client

    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        from awscrt import mqtt5

        client = self._connect()
        s = self.settings
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
        answers: list[str | None] = []
        deadline = time.monotonic() + s.timeout_s + 1.0
        failed: str | None = None
        for f in futures:
            try:
                done = f.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                failed = f"no PUBACK from {s.endpoint} in {s.timeout_s:g}s"
                break
            except Exception as exc:  # disconnected, ack timeout: outcome unknown
                failed = f"{type(exc).__name__}: {exc}"
                break
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
                failed = f"PUBACK {code.name}"
                break
        if failed is not None:
            self.close()
            raise Unavailable(failed, acked=[i for i, a in enumerate(answers) if a is None])
        return answers

    def close(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.stop()
