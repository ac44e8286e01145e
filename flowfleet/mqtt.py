"""The one place that talks to paho-mqtt.

Agent and registry both use `MqttConnection`. It reports "connected" only after the
broker accepted the session (CONNACK success), hands every PUBACK to a callback so
the agent's outbox can delete exactly what the broker acknowledged, and reconnects
with exponential backoff and jitter on its own network thread (so a fleet that lost
its broker does not reconnect in lockstep).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Delivery:
    """A received message whose acknowledgement its handler sends later (`MqttConnection.ack`).

    ``session`` numbers the connection it arrived on: a PUBACK belongs to that
    connection only, so an ack for an older one is dropped and the broker's redelivery
    of the message is acknowledged instead.
    """

    topic: str
    payload: bytes
    mid: int
    qos: int
    session: int
    received_at: float


DeliveryHandler = Callable[[Delivery], None]


class NotAcknowledged(Exception):
    """Raised by a message handler that could not commit a message.

    The message is then not acknowledged, so the broker keeps it in the (persistent)
    session and delivers it again when the client reconnects.
    """


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # a secret: never in logs
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


# CONNACK reason codes that mean "these credentials are not accepted" (MQTT 5):
# 134 Bad user name or password, 135 Not authorized, 138 Banned, 140 Bad
# authentication method. Retrying does not help until someone changes them.
AUTH_REFUSALS = frozenset({134, 135, 138, 140})


def backoff_delay(attempt: int, min_delay: float, max_delay: float, rng=random) -> float:
    """Seconds to wait before reconnect ``attempt`` (1, 2, ...): "equal jitter".

    The ceiling doubles per attempt from ``min_delay`` up to ``max_delay``; the delay
    is uniform in [ceiling / 2, ceiling], never below ``min_delay``.
    """
    ceiling = min(max_delay, min_delay * 2 ** max(0, attempt - 1))
    return max(min_delay, ceiling / 2 + rng.uniform(0, ceiling / 2))


class _JitterClient(mqtt.Client):
    """paho's client with jittered exponential reconnect delays.

    Overrides paho 2.x's ``_reconnect_wait`` (same contract: sleep until the next
    attempt, return early when the client is being stopped).
    """

    attempt = 0
    last_error: OSError | None = None  # why the latest connection attempt failed

    def reconnect(self):
        # paho reports a failed attempt (DNS, refused, TLS handshake) only as "connect
        # failed"; keep the exception so the log can say why.
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise

    def _reconnect_wait(self) -> None:
        self.attempt += 1
        delay = backoff_delay(self.attempt, self._reconnect_min_delay, self._reconnect_max_delay)
        log.debug("reconnecting in %.1fs (attempt %d)", delay, self.attempt)
        end = time.monotonic() + delay
        while not self._thread_terminate and time.monotonic() < end:
            if _CS is not None and self._state in (
                _CS.MQTT_CS_DISCONNECTING,
                _CS.MQTT_CS_DISCONNECTED,
            ):
                return
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))


_CS = getattr(mqtt, "_ConnectionState", None)  # paho 2.x internals; checked in tests


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class MqttConnection:
    """A long-lived MQTT 5 session on paho's background thread.

    Args:
        client_id: unique per connection; the registry uses a fixed id with a
            persistent session so the broker queues messages while it is down.
        persistent: keep the broker-side session (and its queued QoS 1 messages)
            across disconnects for ``session_expiry`` seconds.
        on_ack: called with the message id of every publish the broker acknowledged.
        on_refused: called with the message id and the broker's reason of every
            publish the broker refused (an MQTT 5 PUBACK reason code >= 0x80, such as
            135 "Not authorized" when the ACL forbids the topic).
        on_connect / on_disconnect: called on paho's thread after state changes.
        on_connect_refused: called on paho's thread with the broker's reason (text)
            and reason code when it refuses the session (a CONNACK failure, such as
            135 "Not authorized" for wrong credentials); the owner then reports it
            and this class logs it at debug level only.
    """

    def __init__(
        self,
        client_id: str,
        address: BrokerAddress,
        *,
        will: Will | None = None,
        persistent: bool = False,
        session_expiry: int = 7 * 24 * 3600,
        keepalive: int = 30,
        on_ack: Callable[[int], None] | None = None,
        on_refused: Callable[[int, str], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_connect_refused: Callable[[str, int], None] | None = None,
        max_inflight: int = 20,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.persistent = persistent
        self.session_expiry = session_expiry if persistent else 0
        self.keepalive = keepalive
        self.on_ack = on_ack
        self.on_refused = on_refused
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_connect_refused_cb = on_connect_refused
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._deferred: list[tuple[str, int, DeliveryHandler]] = []
        self._drop_filters: list[str] = []
        self.connected = threading.Event()
        # Set once the broker acknowledged every subscription of the current
        # connection: before that, a message published by another client may find no
        # subscriber (it is not queued for a new session's filters).
        self.subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._stopping = False
        self.connects = 0  # successful sessions (CONNACK accepted) since start
        self._client = _JitterClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            # We acknowledge a received QoS 1 message only after every handler has
            # committed it, so a crash or a refused message is redelivered, not lost.
            manual_ack=True,
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.reconnect_delay_set(
            min_delay=max(1, round(reconnect_min_s)), max_delay=max(1, round(reconnect_max_s))
        )
        self._client._reconnect_min_delay = reconnect_min_s  # paho stores ints; allow floats
        self._client._reconnect_max_delay = reconnect_max_s
        _log_in(self._client, address)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_connect_fail = self._handle_connect_fail
        self._failures = 0
        self._client.on_publish = self._handle_publish
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once. Watch ``connected``."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        self._client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self.keepalive,
            clean_start=not self.persistent,
            properties=props,
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the Last Will) and stop."""
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()

    def resync(self) -> None:
        """Drop the connection so paho reconnects (with its backoff) and the broker
        delivers again every QoS 1 message this session has not acknowledged.

        MQTT 5 lets a broker resend an unacknowledged message only on a new
        connection; a handler that could not commit a message calls this so the
        message comes back instead of waiting for the next network failure.
        """
        sock = self._client.socket()
        if sock is None:
            return
        with contextlib.suppress(OSError):  # already gone: paho reconnects anyway
            sock.shutdown(socket.SHUT_RDWR)

    def reload_client_certificate(self) -> None:
        """Read the client certificate and key again (a renewal rewrote them) and
        reconnect, so the next TLS handshake presents the new certificate. Messages
        not yet acknowledged are resent on the new connection (QoS 1)."""
        context = self._client._ssl_context  # paho keeps the context it made in tls_set
        if context is None or not self.address.cert_file:
            raise ValueError("this connection has no client certificate")
        context.load_cert_chain(self.address.cert_file, self.address.key_file)
        self.resync()

    # -- publish / subscribe -----------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Send a message; returns its message id, or None if not connected now.

        Callers that must not lose the message keep it until ``on_ack(mid)``.
        """
        if not self.connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Register a handler; (re)subscribed on every connect."""
        self._handlers.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def subscribe_deferred(self, topic_filter: str, handler: DeliveryHandler, qos: int = 1) -> None:
        """Register a handler that acknowledges later: it gets a `Delivery` on paho's
        thread and must return at once; the message is acknowledged only when the
        owner calls `ack` (after committing it), so the broker keeps it until then.

        The broker sends at most its inflight window (Mosquitto's
        ``max_inflight_messages``) of unacknowledged messages, which bounds how many
        wait for a commit at once.
        """
        self._deferred.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def drop_subscription(self, topic_filter: str) -> None:
        """Unsubscribe ``topic_filter`` on every connect: a persistent session keeps
        the subscriptions of an earlier configuration (a plain filter after moving to a
        shared one would deliver every message twice)."""
        self._drop_filters.append(topic_filter)

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a deferred delivery (thread-safe). Returns False when the
        connection it arrived on is gone: the broker delivers it again on the new one."""
        if delivery.qos == 0:
            return True
        if delivery.session != self.connects or not self.connected.is_set():
            return False
        return self._client.ack(delivery.mid, delivery.qos) == mqtt.MQTT_ERR_SUCCESS

    # -- paho callbacks (network thread) -------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failures += 1
            if self._on_connect_refused_cb is not None:
                log.debug("broker %s refused the connection: %s", self.address, reason_code)
                self._on_connect_refused_cb(str(reason_code), reason_code.value)
            else:  # the first refusal of an outage, then every 20th
                level = logging.WARNING if self._failures % 20 == 1 else logging.DEBUG
                log.log(level, "broker %s refused the connection: %s", self.address, reason_code)
            return
        for topic_filter in self._drop_filters:
            client.unsubscribe(topic_filter)
        self.subscribed.clear()
        pending = set()
        for topic_filter, qos, _ in self._handlers + self._deferred:
            result, mid = client.subscribe(topic_filter, qos=qos)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                pending.add(mid)
        self._pending_subs = pending
        if not pending:
            self.subscribed.set()
        self._client.attempt = 0
        self._failures = 0
        self.connects += 1
        self.connected.set()
        log.info("connected to %s as %s", self.address, self.client_id)
        if self._on_connect_cb:
            self._on_connect_cb()

    def _handle_connect_fail(self, client, userdata) -> None:
        # Warn on the first failure of an outage and then every 20th, not every try.
        self._failures += 1
        level = logging.WARNING if self._failures % 20 == 1 else logging.DEBUG
        error = self._client.last_error
        why = f": {error}" if error is not None else ""
        log.log(
            level, "cannot reach %s%s (attempt %d); retrying", self.address, why, self._failures
        )

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._pending_subs.discard(mid)
        for code in reason_codes:
            if code.is_failure:
                log.error(
                    "broker %s refused a subscription of %s: %s", self.address, self.client_id, code
                )
        if not self._pending_subs:
            self.subscribed.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if was:
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "disconnected from %s: %s", self.address, reason_code)
        if self._on_disconnect_cb:
            self._on_disconnect_cb(str(reason_code))

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self.on_refused:
                self.on_refused(mid, f"{reason_code} ({reason_code.value})")
        elif self.on_ack:
            self.on_ack(mid)

    def _handle_message(self, client, userdata, message) -> None:
        for topic_filter, _, deferred in self._deferred:
            if mqtt.topic_matches_sub(_strip_share(topic_filter), message.topic):
                delivery = Delivery(
                    message.topic,
                    message.payload,
                    message.mid,
                    message.qos,
                    self.connects,
                    time.time(),
                )
                try:
                    deferred(delivery)
                except Exception:  # a handler bug must not kill the network thread
                    log.exception("handler for %s failed on %s", topic_filter, message.topic)
                return  # its owner acknowledges it (or not) once committed
        committed = True
        for topic_filter, _, handler in self._handlers:
            if mqtt.topic_matches_sub(_strip_share(topic_filter), message.topic):
                try:
                    handler(message.topic, message.payload)
                except NotAcknowledged as exc:
                    committed = False
                    log.error("not acknowledging %s: %s", message.topic, exc)
                except Exception:  # a handler bug must not kill the network thread
                    committed = False
                    log.exception("handler for %s failed on %s", topic_filter, message.topic)
        if committed and message.qos > 0:
            client.ack(message.mid, message.qos)


def _strip_share(topic_filter: str) -> str:
    """`$share/group/a/b` -> `a/b`: shared subscriptions deliver plain topics."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _log_in(client: mqtt.Client, address: BrokerAddress) -> None:
    """Give ``client`` the credentials and TLS settings of ``address``."""
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(
            ca_certs=address.ca_file,
            certfile=address.cert_file,
            keyfile=address.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )


def discard_session(address: BrokerAddress, client_id: str, timeout: float = 5.0) -> bool:
    """Make the broker drop ``client_id``'s persistent session (its subscriptions and
    queued messages): resume it with a session expiry of 0, then leave at once.

    Returns whether there was a session to drop (False also when the broker refused
    the login or could not be reached: then it would not hand us any session).
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,  # whatever was queued there is dropped with it, not taken
    )
    _log_in(client, address)
    existed = threading.Event()
    answered = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure and flags.session_present:
            existed.set()
        answered.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0  # the session ends with this connection
    try:
        client.connect(
            address.host, address.port, keepalive=10, clean_start=False, properties=props
        )
    except (OSError, ssl.SSLError):
        return False
    client.loop_start()
    try:
        answered.wait(timeout)
        client.disconnect()
    finally:
        client.loop_stop()
    return existed.is_set()
