"""Azure IoT Hub relay: device-to-cloud messages over IoT Hub's MQTT protocol.

Why not `azure-iot-device`: its 2.14 release requires ``paho-mqtt<2`` while flowfleet
uses paho 2, and every extra must install into one environment. IoT Hub documents
its MQTT protocol for devices that use no SDK ("Communicate with an IoT hub using the
MQTT protocol"), and that is what this module speaks, through the paho 2 client the
project already uses: nothing extra to install, no second process.

The relay is one IoT Hub device identity (``DeviceId`` of the connection string):

- MQTT 3.1.1 over TLS on port 8883; client id the device id; username
  ``<hub>/<device>/?api-version=2021-04-12``; password a SAS token
  (`sas_token`) signed with the device's key, renewed by reconnecting before it
  expires.
- each packet is published QoS 1 on ``devices/<device>/messages/events/<properties>``
  with the system properties ``$.mid`` (message id), ``$.ct`` (content type,
  application/json) and ``$.ce`` (utf-8), and the application properties
  ``device``, ``kind`` and ``count``; IoT Hub's PUBACK is the acknowledgement.

IoT Hub meters device-to-cloud messages in 4 KB blocks against a daily quota per unit,
and accepts messages up to 256 KB. With ``tier`` (and ``units``) configured the relay
job keeps under the day's quota (`flowfleet.registry.relays.quota`): what would
exceed it waits in the outbox for the next UTC day.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowfleet.configfile import ConfigError, read_secret

from .base import Packet, Relay, Unavailable
from .quota import DailyQuota
from .settings import AzureRelay

log = logging.getLogger(__name__)

API_VERSION = "2021-04-12"
MAX_PAYLOAD = 256 * 1024


@dataclass(frozen=True)
class ConnectionString:
    """The parts of a device connection string that the relay uses."""

    host: str
    device: str
    key: str

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        parts = {}
        for field in text.strip().split(";"):
            if "=" in field:
                k, v = field.split("=", 1)
                parts[k.strip()] = v.strip()
        missing = [k for k in ("HostName", "DeviceId", "SharedAccessKey") if not parts.get(k)]
        if missing:
            raise ConfigError(f"the Azure connection string lacks {', '.join(missing)}")
        try:
            base64.b64decode(parts["SharedAccessKey"], validate=True)
        except ValueError:
            raise ConfigError(
                "the Azure connection string's SharedAccessKey is not base64"
            ) from None
        return cls(parts["HostName"], parts["DeviceId"], parts["SharedAccessKey"])

    @property
    def hub(self) -> str:
        return self.host


def sas_token(resource: str, key: str, expiry: int) -> str:
    """An IoT Hub SAS token for ``resource`` (``<hub>/devices/<device>``) valid until
    ``expiry`` (epoch seconds), signed with the base64 ``key``: HMAC-SHA256 of the
    URL-encoded resource, a newline and the expiry (IoT Hub's "Control access to IoT
    Hub with shared access signatures")."""
    to_sign = f"{urllib.parse.quote_plus(resource)}\n{expiry}".encode()
    sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign, hashlib.sha256).digest())
    fields = {"sr": resource, "sig": sig.decode(), "se": str(expiry)}
    return "SharedAccessSignature " + urllib.parse.urlencode(fields)


def events_topic(device: str, properties: dict[str, str]) -> str:
    """The device-to-cloud topic with its URL-encoded property bag."""
    bag = urllib.parse.urlencode(properties, quote_via=urllib.parse.quote, safe="")
    return f"devices/{device}/messages/events/{bag}"


def read_connection_string(settings: AzureRelay) -> ConnectionString:
    text = read_secret(
        "relays.azure.connection_string",
        settings.connection_string_file,
        settings.connection_string_env,
        strip_env=True,
    )
    return ConnectionString.parse(text or "")


class IotHubRelay(Relay):
    name = "azure"
    unit_bytes = 4096
    max_payload = MAX_PAYLOAD

    def __init__(
        self,
        settings: AzureRelay,
        *,
        clock: Callable[[], float] = time.time,
        connection: ConnectionString | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock  # the SAS token's expiry is computed from it
        self.conn = connection or read_connection_string(settings)
        self.quota = DailyQuota.azure(settings.tier, settings.units) if settings.tier else None
        self._client = None
        self._expires = 0.0
        self._connected = threading.Event()
        self._refused: str | None = None

    # -- connection -----------------------------------------------------------------

    def _connect(self):
        import paho.mqtt.client as mqtt

        if self._client is not None and self._client.is_connected():
            if self.clock() < self._expires - 60:
                return self._client
            self.close()  # the token is about to expire: a new one on a new connection
        self.close()
        expiry = int(self.clock()) + self.settings.token_ttl_s
        resource = f"{self.conn.host}/devices/{self.conn.device}"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.conn.device,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(
            f"{self.conn.host}/{self.conn.device}/?api-version={API_VERSION}",
            sas_token(resource, self.conn.key, expiry),
        )
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        client.tls_set_context(context)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        self._connected.clear()
        self._refused = None

        def on_connect(c, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                self._refused = str(reason_code)
            self._connected.set()

        def on_disconnect(c, userdata, flags, reason_code, properties):
            self._connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(self.conn.host, self.settings.port, keepalive=60)
        except (OSError, ssl.SSLError) as exc:
            raise Unavailable(f"connect to {self.conn.host}:{self.settings.port}: {exc}") from exc
        client.loop_start()
        if not self._connected.wait(self.settings.timeout_s) or self._refused:
            why = self._refused or f"no CONNACK in {self.settings.timeout_s:g}s"
            client.loop_stop()
            client.disconnect()
            raise Unavailable(f"IoT Hub {self.conn.host} refused the connection: {why}")
        self._client = client
        self._expires = expiry
        return client

    # -- sending --------------------------------------------------------------------

    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        client = self._connect()
        infos = []
        for p in packets:
            props = {
                "$.mid": p.items[0].msg_id,
                "$.ct": "application/json",
                "$.ce": "utf-8",
                "device": p.device,
                "kind": p.kind,
                "count": str(len(p.items)),
            }
            infos.append(client.publish(events_topic(self.conn.device, props), p.body, qos=1))
        deadline = time.monotonic() + self.settings.timeout_s
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait(info, left):
                acked = [i for i, x in enumerate(infos) if x.is_published()]
                self.close()
                raise Unavailable(
                    f"IoT Hub {self.conn.host}: {len(infos) - len(acked)} messages without "
                    f"PUBACK in {self.settings.timeout_s:g}s",
                    acked=acked,
                )
        return [None] * len(packets)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()


def _wait(info, timeout: float) -> bool:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):  # not queued: the connection is gone
        return False
    return info.is_published()
