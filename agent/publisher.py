"""Drains the outbox to the broker and settles exactly what the broker acknowledged.

A PUBACK deletes a health beat, event or drift summary; a count bin stays in the
outbox, "sent, unconfirmed", until the registry's end-to-end acknowledgement
confirms it (see `Outbox.broker_acked`), unless ``confirm_counts`` is off (a device
that publishes to consumers other than a flowfleet registry).

A publish the broker refuses (MQTT 5 PUBACK reason >= 0x80, e.g. 135 "Not
authorized" when the ACL forbids the topic because the device id and the broker
identity differ) keeps its row, is reported through ``on_refused`` and is tried
again after ``refused_retry_s``, so a misconfigured device says what is wrong
instead of filling its outbox in silence.

At most ``window`` messages are in flight at once, oldest first, and at most
``rate`` messages per second are published, so after an outage the backlog drains
in order at a bounded rate. paho keeps every unacknowledged QoS 1 message and
resends it (DUP) after a reconnect, so in-flight rows are not published again by us
while this process lives; after a restart everything still in the outbox is sent
again. The broker may thus see a message twice, and the registry's (device, seq)
idempotency stores it once.

Acknowledged rows are deleted in batches (one transaction per loop turn, not one
fsync per message): a crash can only make us resend a message, never lose one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flowfleet.mqtt import MqttConnection

from .outbox import Outbox

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        outbox: Outbox,
        window: int = 20,
        idle_s: float = 0.2,
        rate: float = 5000.0,
        *,
        confirm_counts: bool = True,
        confirm_timeout_s: float = 120.0,
        confirm_timeout_max_s: float = 3600.0,
        refused_retry_s: float = 30.0,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.window = window
        self.idle_s = idle_s
        self.rate = rate
        self.confirm_counts = confirm_counts
        self.confirm_timeout_s = confirm_timeout_s
        self.confirm_timeout_max_s = confirm_timeout_max_s
        self.refused_retry_s = refused_retry_s
        self.on_refused_cb = on_refused
        self.connection: MqttConnection | None = None
        self._inflight: dict[int, tuple[int, str]] = {}  # mid -> (outbox row id, topic)
        self._refused: dict[int, float] = {}  # row id -> monotonic time to try again
        self.refused = 0  # publishes the broker refused, since start
        self._early_acks: set[int] = set()  # acks that beat the mid's registration
        self._early_refusals: dict[int, str] = {}  # refusals that did, with the reason
        self._acked_rows: list[int] = []  # acknowledged, not yet deleted
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tokens = float(window)
        self._last_refill = time.monotonic()
        self.sent = 0
        self.acked = 0

    def attach(self, connection: MqttConnection) -> None:
        """Use this connection; wire its ack and connect callbacks before start()."""
        self.connection = connection
        connection.on_ack = self.on_ack
        connection.on_refused = self.on_refused

    def on_connect(self) -> None:
        self._wake.set()

    def on_ack(self, mid: int) -> None:
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early_acks.add(mid)
                return
            self._acked_rows.append(entry[0])
            self.acked += 1
        self._wake.set()

    def on_refused(self, mid: int, reason: str) -> None:
        """The broker refused a publish: keep the row, retry later, report it."""
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early_refusals[mid] = reason  # it beat the mid's registration
                return
            row_id, topic = entry
            self._refused[row_id] = time.monotonic() + self.refused_retry_s
            self.refused += 1
        if self.on_refused_cb is not None:
            self.on_refused_cb(topic, reason)
        self._wake.set()

    def notify(self) -> None:
        """Something was enqueued: send it without waiting for the idle tick."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(5)
        self._flush_acked()

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def busy_rows(self) -> set[int]:
        """Rows in flight or acknowledged but not yet settled (the cap leaves them)."""
        with self._lock:
            return {row for row, _ in self._inflight.values()} | set(self._acked_rows)

    def _held_rows(self) -> set[int]:
        """Busy rows, and refused rows still waiting for their retry time."""
        now = time.monotonic()
        with self._lock:
            for row in [r for r, at in self._refused.items() if at <= now]:
                del self._refused[row]
            return (
                {row for row, _ in self._inflight.values()}
                | set(self._acked_rows)
                | set(self._refused)
            )

    def wait_drained(self, timeout: float, *, confirmed: bool = False) -> bool:
        """Block until the broker has acknowledged everything or the timeout passes;
        with ``confirmed``, until the registry also confirmed every count bin (the
        outbox is empty). Returns whether that happened."""

        def done() -> bool:
            return (self.outbox.depth() if confirmed else self.outbox.unsent()) == 0

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._flush_acked()
            if done():
                return True
            self._wake.set()
            time.sleep(0.02)
        self._flush_acked()
        return done()

    def _flush_acked(self) -> None:
        with self._lock:
            rows, self._acked_rows = self._acked_rows, []
        if rows:
            try:
                self.outbox.broker_acked(
                    rows,
                    keep_counts=self.confirm_counts,
                    timeout_s=self.confirm_timeout_s,
                    timeout_max_s=self.confirm_timeout_max_s,
                )
            except Exception:
                log.exception(
                    "could not settle %d acknowledged rows; they will be resent", len(rows)
                )

    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(float(self.window), self._tokens + (now - self._last_refill) * self.rate)
        self._last_refill = now
        return self._tokens

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_s)
            self._wake.clear()
            self._flush_acked()
            conn = self.connection
            if conn is None or not conn.connected.is_set():
                continue
            busy = self._held_rows()
            with self._lock:
                room = self.window - len(self._inflight)
            if room <= 0:
                continue
            room = min(room, int(self._refill()))
            if room <= 0:
                self._stop.wait(1.0 / self.rate)
                self._wake.set()
                continue
            rows = self.outbox.pending(room, exclude=busy)
            for row_id, topic, payload in rows:
                # Not under our lock: paho calls on_ack while holding its own message
                # lock, which publish() also takes. An ack may therefore arrive before
                # the mid is registered; on_ack parks it in _early_acks.
                mid = conn.publish(topic, payload, qos=1)
                if mid is None:
                    break
                self.sent += 1
                self._tokens -= 1
                with self._lock:
                    refused = self._early_refusals.pop(mid, None)
                    if mid in self._early_acks:
                        self._acked_rows.append(row_id)
                        self.acked += 1
                    else:
                        self._inflight[mid] = (row_id, topic)
                    # Anything else parked is the ack of a publish that is not ours
                    # (the status message): forget it, or a later row that reuses the
                    # mid once paho's counter wraps would count as acknowledged.
                    self._early_acks.clear()
                    self._early_refusals.clear()
                if refused is not None:
                    self.on_refused(mid, refused)
            if len(rows) == room:
                self._wake.set()  # more may be waiting: go again without the idle tick
