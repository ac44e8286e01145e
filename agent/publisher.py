"""Drains the outbox to the broker and deletes exactly what the broker acknowledged.

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

from flowfleet.mqtt import MqttConnection

from .outbox import Outbox

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self, outbox: Outbox, window: int = 20, idle_s: float = 0.2, rate: float = 5000.0
    ) -> None:
        self.outbox = outbox
        self.window = window
        self.idle_s = idle_s
        self.rate = rate
        self.connection: MqttConnection | None = None
        self._inflight: dict[int, int] = {}  # mid -> outbox row id
        self._early_acks: set[int] = set()  # acks that beat the mid's registration
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

    def on_connect(self) -> None:
        self._wake.set()

    def on_ack(self, mid: int) -> None:
        with self._lock:
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                self._early_acks.add(mid)
                return
            self._acked_rows.append(row_id)
            self.acked += 1
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
        self._flush_deletes()

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def busy_rows(self) -> set[int]:
        """Rows in flight or acknowledged but not yet deleted (the cap leaves them)."""
        with self._lock:
            return set(self._inflight.values()) | set(self._acked_rows)

    def wait_drained(self, timeout: float) -> bool:
        """Block until the outbox is empty (all acknowledged) or the timeout passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._flush_deletes()
            if self.outbox.depth() == 0:
                return True
            self._wake.set()
            time.sleep(0.02)
        self._flush_deletes()
        return self.outbox.depth() == 0

    def _flush_deletes(self) -> None:
        with self._lock:
            rows, self._acked_rows = self._acked_rows, []
        if rows:
            try:
                self.outbox.delete_many(rows)
            except Exception:
                log.exception(
                    "could not delete %d acknowledged rows; they will be resent", len(rows)
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
            self._flush_deletes()
            conn = self.connection
            if conn is None or not conn.connected.is_set():
                continue
            with self._lock:
                busy = set(self._inflight.values()) | set(self._acked_rows)
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
                    if mid in self._early_acks:
                        self._acked_rows.append(row_id)
                        self.acked += 1
                    else:
                        self._inflight[mid] = row_id
                    # Anything else parked is the ack of a publish that is not ours
                    # (the status message): forget it, or a later row that reuses the
                    # mid once paho's counter wraps would count as acknowledged.
                    self._early_acks.clear()
            if len(rows) == room:
                self._wake.set()  # more may be waiting: go again without the idle tick
