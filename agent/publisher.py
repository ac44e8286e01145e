"""Drains the outbox to the broker and deletes exactly what the broker acknowledged.

At most ``window`` messages are in flight at once, oldest first, so after an outage
the backlog drains in order at a bounded rate. paho keeps every unacknowledged QoS 1
message and resends it (DUP) after a reconnect, so in-flight rows are not published
again by us while this process lives; after a restart everything still in the outbox
is sent again. The broker may thus see a message twice, and the registry's
(device, seq) idempotency stores it once.
"""

from __future__ import annotations

import logging
import threading

from flowfleet.mqtt import MqttConnection

from .outbox import Outbox

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, outbox: Outbox, window: int = 20, idle_s: float = 0.2) -> None:
        self.outbox = outbox
        self.window = window
        self.idle_s = idle_s
        self.connection: MqttConnection | None = None
        self._inflight: dict[int, int] = {}  # mid -> outbox row id
        self._early_acks: set[int] = set()  # acks that beat the mid's registration
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
        self._acked(row_id)

    def _acked(self, row_id: int) -> None:
        self.outbox.delete(row_id)
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

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def wait_drained(self, timeout: float) -> bool:
        """Block until the outbox is empty (all acknowledged) or the timeout passes."""
        deadline = threading.Event()
        end = timeout
        step = 0.05
        while end > 0:
            if self.outbox.depth() == 0:
                return True
            self._wake.set()
            deadline.wait(step)
            end -= step
        return self.outbox.depth() == 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_s)
            self._wake.clear()
            conn = self.connection
            if conn is None or not conn.connected.is_set():
                continue
            with self._lock:
                busy = set(self._inflight.values())
                room = self.window - len(busy)
            if room <= 0:
                continue
            for row_id, topic, payload in self.outbox.pending(room, exclude=busy):
                # Not under our lock: paho calls on_ack while holding its own message
                # lock, which publish() also takes. An ack may therefore arrive before
                # the mid is registered; on_ack parks it in _early_acks.
                mid = conn.publish(topic, payload, qos=1)
                if mid is None:
                    break
                self.sent += 1
                with self._lock:
                    early = mid in self._early_acks
                    if early:
                        self._early_acks.discard(mid)
                    else:
                        self._inflight[mid] = row_id
                if early:
                    self._acked(row_id)
