"""The commands outbox: messages to devices, published after the transaction commits.

A change that tells a device something (a deployment: its retained desired state)
calls `enqueue_command` inside its own transaction. The row commits with the change
or not at all, so the database and the broker never disagree: a transaction that
fails publishes nothing, and a command stored while the broker is down waits in the
table until it is back.

`CommandPublisher` runs in the registry service on the ingest worker's MQTT session.
It publishes due rows (QoS 1), and marks a row ``published_at`` only when the broker
acknowledged it (PUBACK through ``MqttConnection.on_ack``). A row not acknowledged
within ``ack_timeout_s`` (lost connection) or refused by the broker is sent again
later, with exponential backoff; a broker outage just waits (nothing is tried until
the session is back). ``wake()`` (called by a deployment after its commit) publishes
at once instead of at the next tick.

Retained messages: only the newest per topic needs to reach the broker, so
`enqueue_command` marks older unpublished rows of the topic ``superseded_by`` the new
one and they are never sent. Several registry processes may each run a publisher on
one database: a publisher claims a row with a conditional update of
``next_attempt_at`` before sending it, so the same row is not sent by two at once (a
row sent twice is harmless: marking published is idempotent, and a retained state
sent again changes nothing). If an older retained state still reaches the broker
after a newer one was acknowledged (for example resent by the MQTT client after a
reconnect), the newer one is put back in the queue, so the broker ends on the newest.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import peewee as pw

from .. import metrics
from ..background import BackgroundLoop, thread_connection
from ..store.db import Command, now

if TYPE_CHECKING:
    from flowfleet.mqtt import MqttConnection

log = logging.getLogger(__name__)

QUEUED, PUBLISHED, SUPERSEDED = "queued", "published", "superseded"


def enqueue_command(device: str, topic: str, payload: bytes | str, *, retain: bool = False) -> int:
    """Store one command for ``device``; returns its id. Call it inside the transaction
    of the change the command carries. A retained command supersedes the older
    unpublished commands of its topic."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    row = Command.create(
        device=device, topic=topic, payload=payload, retain=retain, created_at=now()
    )
    if retain:
        Command.update(superseded_by=row.id).where(
            (Command.topic == topic)
            & (Command.id < row.id)
            & Command.published_at.is_null()
            & Command.superseded_by.is_null()
        ).execute()
    return row.id


def _status(row: Command) -> str:
    if row.published_at is not None:
        return PUBLISHED
    return SUPERSEDED if row.superseded_by is not None else QUEUED


def command_dict(row: Command) -> dict[str, Any]:
    return {
        "id": row.id,
        "device": row.device,
        "topic": row.topic,
        "status": _status(row),
        "created_at": row.created_at,
        "published_at": row.published_at,
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


def commands(ids: list[int]) -> list[dict[str, Any]]:
    """The commands with these ids, in id order."""
    if not ids:
        return []
    query = Command.select().where(Command.id.in_(ids)).order_by(Command.id)
    return [command_dict(row) for row in query]


def _pending() -> pw.Expression:
    return Command.published_at.is_null() & Command.superseded_by.is_null()


def pending_summary() -> dict[str, Any]:
    """``{"pending": n, "oldest_pending_s": age or None}`` of the whole outbox."""
    count, oldest = (
        Command.select(pw.fn.COUNT(Command.id), pw.fn.MIN(Command.created_at))
        .where(_pending())
        .tuples()
        .get()
    )
    age = round(max(0.0, now() - oldest), 3) if oldest is not None else None
    return {"pending": int(count or 0), "oldest_pending_s": age}


class CommandPublisher(BackgroundLoop):
    """Publishes the commands outbox on ``connection`` after commit (see the module).

    Args:
        db: the registry database (opened with `open_database`).
        connection: the MQTT session to publish on; its ``on_ack`` and ``on_refused``
            are taken over. None: a queue-only publisher (``wake`` does nothing; the
            rows wait for a registry process that has a connection).
        tick_s: how often the table is looked at without a wake-up (rows written by
            other processes, the end of a broker outage).
        ack_timeout_s: how long a sent row waits for its PUBACK before it is due again;
            the wait doubles per attempt up to ``backoff_max_s``.
        batch: rows claimed per pass.
    """

    def __init__(
        self,
        db: pw.Database,
        connection: MqttConnection | None = None,
        *,
        tick_s: float = 1.0,
        ack_timeout_s: float = 10.0,
        backoff_max_s: float = 300.0,
        batch: int = 100,
    ) -> None:
        super().__init__()
        self.db = db
        self.connection = connection
        self.tick_s = tick_s
        self.ack_timeout_s = ack_timeout_s
        self.backoff_max_s = backoff_max_s
        self.batch = batch
        self._lock = threading.Lock()  # the maps below; never held while calling paho
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (row id, monotonic sent)
        self._early_acks: set[int] = set()  # acks that beat the mid's registration
        self._early_refusals: dict[int, str] = {}
        self._acked: list[int] = []  # row ids acknowledged, not yet marked
        self._refused: list[tuple[int, str]] = []
        self._pass_lock = threading.Lock()  # one pass at a time
        self.sent = 0  # publishes handed to the broker since start
        self.acked = 0  # of which acknowledged
        if connection is not None:
            connection.on_ack = self._on_ack
            connection.on_refused = self._on_refused

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.connection is not None:
            super().start()

    def stop(self) -> None:
        """Stop the loop and mark what was acknowledged meanwhile."""
        self.stop_thread()
        try:
            with self._pass_lock, thread_connection(self.db):
                self._flush_outcomes()
        except Exception:
            log.exception("commands: could not mark the last acknowledgements")

    def wake(self) -> None:
        """A command was committed: publish now rather than at the next tick."""
        if self.connection is not None:
            self._wake.set()

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.connected.is_set()

    def wait_published(self, ids: list[int], timeout: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds (not at all while the broker is unreachable)
        for these commands to be published; returns them as `command_dict`s."""
        deadline = time.monotonic() + timeout
        while True:
            rows = commands(ids)
            if all(r["status"] != QUEUED for r in rows) or not self.connected:
                return rows
            if time.monotonic() >= deadline:
                return rows
            time.sleep(0.01)

    def wait_s(self) -> float:
        return self.tick_s

    def run_pass(self) -> bool:
        self.publish_pending()
        return False

    # -- acknowledgements (paho's network thread) ------------------------------------

    def _on_ack(self, mid: int) -> None:
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                # Not registered yet (the ack beat publish() returning), or not ours
                # (the ingest worker's acks share the session).
                self._early_acks.add(mid)
                return
            self._acked.append(entry[0])
        self._wake.set()

    def _on_refused(self, mid: int, reason: str) -> None:
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._early_refusals[mid] = reason
                return
            self._refused.append((entry[0], reason))
        self._wake.set()

    # -- one pass --------------------------------------------------------------------

    def publish_pending(self) -> int:
        """Mark what the broker acknowledged, then send the due rows; returns how many
        were handed to the broker."""
        with self._pass_lock, thread_connection(self.db):
            self._flush_outcomes()
            conn = self.connection
            if conn is None or not conn.connected.is_set():
                return 0
            self._forget_stale()
            t = now()
            rows = list(
                Command.select(
                    Command.id, Command.topic, Command.payload, Command.retain, Command.attempts
                )
                .where(_pending() & (Command.next_attempt_at <= t))
                .order_by(Command.id)
                .limit(self.batch)
            )
            sent = 0
            for row in rows:
                if not self._claim(row, t):
                    continue  # another publisher has it
                # Not under our lock: paho calls on_ack holding its own message lock,
                # which publish() takes too; an early ack is parked in _early_acks.
                mid = conn.publish(row.topic, bytes(row.payload), qos=1, retain=row.retain)
                if mid is None:
                    Command.update(
                        next_attempt_at=t, last_error="not connected to the broker"
                    ).where(Command.id == row.id).execute()
                    break
                sent += 1
                self._register(mid, row.id)
            self.sent += sent
            if len(rows) == self.batch:
                self._wake.set()  # more may be due
            return sent

    def _claim(self, row: Command, t: float) -> bool:
        """Take ``row`` for one attempt: due again after the ack timeout (doubling per
        attempt), unless a PUBACK marks it published first."""
        wait = min(self.backoff_max_s, self.ack_timeout_s * 2 ** min(row.attempts, 16))
        claimed = (
            Command.update(attempts=Command.attempts + 1, next_attempt_at=t + wait)
            .where(
                (Command.id == row.id)
                & (Command.attempts == row.attempts)
                & _pending()
                & (Command.next_attempt_at <= t)
            )
            .execute()
        )
        if claimed:
            with self._lock:  # an earlier attempt's mid no longer stands for the row
                for mid in [m for m, (rid, _) in self._inflight.items() if rid == row.id]:
                    del self._inflight[mid]
        return bool(claimed)

    def _register(self, mid: int, row_id: int) -> None:
        with self._lock:
            refused = self._early_refusals.pop(mid, None)
            if mid in self._early_acks:
                self._acked.append(row_id)
            elif refused is not None:
                self._refused.append((row_id, refused))
            else:
                self._inflight[mid] = (row_id, time.monotonic())
            # Anything else parked is the ack of a publish that is not ours: forget it,
            # or a later row that reuses the mid once paho's counter wraps would count
            # as acknowledged.
            self._early_acks.clear()
            self._early_refusals.clear()

    def _forget_stale(self) -> None:
        """Drop mids whose PUBACK never came (their rows are due again anyway), so a
        reused mid cannot mark a row by mistake."""
        limit = time.monotonic() - 2 * self.backoff_max_s
        with self._lock:
            for mid in [m for m, (_, sent) in self._inflight.items() if sent < limit]:
                del self._inflight[mid]

    def _flush_outcomes(self) -> None:
        with self._lock:
            acked, self._acked = sorted(self._acked), []
            refused, self._refused = self._refused, []
        if not acked and not refused:
            return
        t = now()
        with self.db.atomic():
            for row_id in acked:
                self._mark_published(row_id, t)
            for row_id, reason in refused:
                log.warning("commands: the broker refused command %d: %s", row_id, reason)
                Command.update(last_error=f"refused by the broker: {reason}"[:1000]).where(
                    (Command.id == row_id) & Command.published_at.is_null()
                ).execute()
        self.acked += len(acked)

    def _mark_published(self, row_id: int, t: float) -> None:
        marked = (
            Command.update(published_at=t, last_error=None)
            .where((Command.id == row_id) & Command.published_at.is_null())
            .execute()
        )
        if marked:
            metrics.COMMANDS_PUBLISHED.inc()
        row = Command.get_or_none(Command.id == row_id)
        if row is None or not row.retain or row.superseded_by is None:
            return
        # An older retained state reached the broker: if a newer one was already
        # acknowledged, the broker may now hold the older one. Send the newest again.
        newest = (
            Command.select()
            .where(
                (Command.topic == row.topic)
                & Command.retain
                & Command.superseded_by.is_null()
                & (Command.id > row.id)
            )
            .order_by(Command.id.desc())
            .first()
        )
        if newest is not None and newest.published_at is not None:
            log.info(
                "commands: %s got an older state after %d; sending it again", row.topic, newest.id
            )
            Command.update(
                published_at=None,
                next_attempt_at=t,
                last_error=f"sent again: older command {row.id} reached the broker after it",
            ).where(Command.id == newest.id).execute()
