"""Ingest: validate what devices publish and store it exactly once.

`Ingestor.handle` is the whole pipeline for one MQTT message and never raises: the
message ends up stored, recognised as a duplicate, or in the dead-letter table with
a reason, each committed in one transaction before `handle` returns. That matters
because the MQTT client acknowledges a QoS 1 message as soon as the handler returns;
whatever is not committed by then is gone.

`IngestWorker` wires an `Ingestor` to a persistent MQTT session, so the broker keeps
queueing device messages while the registry is down and delivers them on restart.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from pathlib import Path

import peewee as pw

from flowfleet.contract import (
    QOS,
    ContractError,
    Topics,
    is_valid_name,
    parse_payload,
)
from flowfleet.contract import CountBin as CountBinPayload
from flowfleet.contract import DriftSummary as DriftPayload
from flowfleet.contract import Event as EventPayload
from flowfleet.contract import Health as HealthPayload
from flowfleet.contract import Reported as ReportedPayload
from flowfleet.contract import Status as StatusPayload
from flowfleet.mqtt import BrokerAddress, MqttConnection, NotAcknowledged

from . import metrics
from .db import (
    DEAD_LETTER_MAX_BYTES,
    CountBin,
    DeadLetter,
    Device,
    DriftSummary,
    Event,
    HealthBeat,
    LineTotal,
    ReportedState,
    ZoneTotal,
    now,
    open_database,
    require_bound,
)

log = logging.getLogger(__name__)

# Outcomes of Ingestor.handle (plain strings so they serve directly as metric labels).
STORED = "stored"
DUPLICATE = "duplicate"
DEAD_LETTER = "dead-letter"
# Nothing could be committed, not even a dead letter (the database is unusable).
ERROR = "error"
OUTCOMES = (STORED, DUPLICATE, DEAD_LETTER, ERROR)


class _Conflict(Exception):
    """A (device, seq) that is already stored with different content."""


class Ingestor:
    """Validates and stores device messages in the registry database.

    Args:
        db: the database returned by `open_database` (the models must be bound to it).
        topics: the topic layout the devices publish under.
    """

    def __init__(self, db: pw.Database, topics: Topics) -> None:
        require_bound(db)
        self.db = db
        self.topics = topics

    def handle(self, topic: str, payload: bytes) -> str:
        """Process one message; returns "stored", "duplicate", "dead-letter" or "error".

        Never raises. "error" means not even a dead letter could be written.
        """
        outcome = self._handle(topic, payload)
        try:
            kind = self.topics.parse_device_topic(topic)[1]
        except ContractError:
            kind = "invalid"  # bounded label values, whatever the topic was
        metrics.INGEST.labels(kind=kind, outcome=outcome).inc()
        return outcome

    def _handle(self, topic: str, payload: bytes) -> str:
        received_at = now()
        try:
            device, kind = self.topics.parse_device_topic(topic)
            message = parse_payload(kind, payload, device=device, now=received_at)
        except ContractError as exc:
            return self._dead_letter(topic, payload, str(exc), received_at)
        except Exception as exc:  # a validator bug must not take the worker down
            log.exception("unexpected error validating a message on %s", topic)
            return self._dead_letter(topic, payload, f"could not validate: {exc!r}", received_at)
        try:
            with self.db.atomic():
                return self._store(device, message, received_at)
        except _Conflict as exc:
            # The transaction above was rolled back; record the conflict on its own.
            return self._dead_letter(topic, payload, str(exc), received_at)
        except Exception as exc:
            log.exception("database error storing a message on %s", topic)
            return self._dead_letter(
                topic, payload, f"database error while storing: {exc!r}", received_at
            )

    # -- storing valid messages ----------------------------------------------------

    def _store(self, device: str, message: object, received_at: float) -> str:
        self._touch_device(device, received_at)
        if isinstance(message, CountBinPayload):
            return self._store_bin(device, message, received_at)
        if isinstance(message, HealthPayload):
            return self._store_health(device, message, received_at)
        if isinstance(message, EventPayload):
            return self._store_event(device, message, received_at)
        if isinstance(message, DriftPayload):
            return self._store_drift(device, message, received_at)
        if isinstance(message, StatusPayload):
            return self._store_status(device, message, received_at)
        if isinstance(message, ReportedPayload):
            return self._store_reported(device, message, received_at)
        raise TypeError(f"no storage for {type(message).__name__}")

    def _touch_device(self, device: str, received_at: float) -> None:
        # Upsert rather than get-or-create: two workers seeing a new device at once
        # must not fail on the primary key.
        (
            Device.insert(
                id=device,
                first_seen=received_at,
                last_seen=received_at,
                state="unknown",
                state_since=received_at,
            )
            .on_conflict(conflict_target=[Device.id], update={Device.last_seen: received_at})
            .execute()
        )

    def _store_once(
        self,
        table: type[pw.Model],
        what: str,
        device: str,
        message: CountBinPayload | HealthPayload | EventPayload | DriftPayload,
        columns: dict[str, object],
    ) -> str:
        """Insert the row of a (device, seq)-keyed message once.

        ``columns`` are the table's columns besides device, seq and payload. Returns
        STORED if this call inserted the row, DUPLICATE if the same (device, seq) is
        already stored with the same content; raises _Conflict if it is stored with
        different content (the first copy is kept). INSERT .. ON CONFLICT DO NOTHING
        rather than check-then-insert, so concurrent workers cannot both insert.
        """
        body = message.to_json().decode()
        query = table.insert(device=device, seq=message.seq, payload=body, **columns)
        cursor = self.db.execute(query.on_conflict_ignore())
        if self.db.rows_affected(cursor) == 1:
            return STORED
        first = table.get(table.device == device, table.seq == message.seq)
        if json.loads(first.payload) == json.loads(body):
            # Compared as JSON values: object members (event data, class mix) may
            # arrive in another order and are still the same message.
            return DUPLICATE
        raise _Conflict(
            f"{what} seq {message.seq} was already stored with different content; "
            "kept the first, this one is refused"
        )

    def _store_bin(self, device: str, message: CountBinPayload, received_at: float) -> str:
        outcome = self._store_once(
            CountBin,
            "count bin",
            device,
            message,
            {"start": message.start, "end": message.end, "received_at": received_at},
        )
        if outcome != STORED:
            return outcome
        row = CountBin.get(CountBin.device == device, CountBin.seq == message.seq)
        if message.lines:
            LineTotal.insert_many(
                [
                    {
                        "bin": row.id,
                        "device": device,
                        "seq": message.seq,
                        "start": message.start,
                        "camera": lc.camera,
                        "line": lc.line,
                        "class_": lc.class_,
                        "count_in": lc.in_,
                        "count_out": lc.out,
                    }
                    for lc in message.lines
                ]
            ).execute()
        if message.zones:
            ZoneTotal.insert_many(
                [
                    {
                        "bin": row.id,
                        "device": device,
                        "seq": message.seq,
                        "start": message.start,
                        "camera": zc.camera,
                        "zone": zc.zone,
                        "class_": zc.class_,
                        "entries": zc.entries,
                        "exits": zc.exits,
                        "peak_occupancy": zc.peak_occupancy,
                        "dwell_s_sum": zc.dwell_s_sum,
                        "dwell_n": zc.dwell_n,
                    }
                    for zc in message.zones
                ]
            ).execute()
        return STORED

    def _store_health(self, device: str, message: HealthPayload, received_at: float) -> str:
        return self._store_once(
            HealthBeat,
            "health beat",
            device,
            message,
            {"ts": message.ts, "received_at": received_at},
        )

    def _store_event(self, device: str, message: EventPayload, received_at: float) -> str:
        outcome = self._store_once(
            Event,
            "event",
            device,
            message,
            {
                "ts": message.ts,
                "type": message.type,
                "severity": message.severity,
                "camera": message.camera,
                "message": message.message,
                "received_at": received_at,
            },
        )
        if outcome == STORED and message.type == "model_rolled_back":
            metrics.ROLLBACKS.inc()
        return outcome

    def _store_drift(self, device: str, message: DriftPayload, received_at: float) -> str:
        return self._store_once(
            DriftSummary,
            "drift summary",
            device,
            message,
            {
                "camera": message.camera,
                "model": message.model,
                "start": message.start,
                "end": message.end,
                "received_at": received_at,
            },
        )

    def _store_status(self, device: str, message: StatusPayload, received_at: float) -> str:
        # Applied in arrival order, not by the payload's ts: a Last Will carries the ts
        # of the connect that registered it, older than the "online" sent after it.
        changes: dict[pw.Field, object] = {
            Device.state: message.state,
            Device.state_since: pw.Case(
                None, ((Device.state != message.state, received_at),), Device.state_since
            ),
        }
        if message.agent_version is not None:
            changes[Device.agent_version] = message.agent_version
        Device.update(changes).where(Device.id == device).execute()
        return STORED

    def _store_reported(self, device: str, message: ReportedPayload, received_at: float) -> str:
        """Keep the newest reported state per device, by the payload's ``ts``.

        One upsert: insert the device's first one, replace the stored one only when
        this is newer (``ON CONFLICT .. DO UPDATE .. WHERE stored.ts < new.ts``), so an
        older retained copy redelivered after a newer one changes nothing, even with
        concurrent workers. Returns STORED when it was written, DUPLICATE when the
        stored state is as new or newer (a redelivery or a stale copy).
        """
        values = {
            "device": device,
            "ts": message.ts,
            "desired_version": message.desired_version,
            "received_at": received_at,
            "payload": message.to_json().decode(),
        }
        query = ReportedState.insert(**values).on_conflict(
            conflict_target=[ReportedState.device],
            update={
                ReportedState.ts: pw.EXCLUDED.ts,
                ReportedState.desired_version: pw.EXCLUDED.desired_version,
                ReportedState.received_at: pw.EXCLUDED.received_at,
                ReportedState.payload: pw.EXCLUDED.payload,
            },
            where=(ReportedState.ts < pw.EXCLUDED.ts),
        )
        cursor = self.db.execute(query)
        if self.db.rows_affected(cursor) == 1:
            return STORED
        log.debug(
            "reported state of %s at ts %s is not newer than the stored one", device, message.ts
        )
        return DUPLICATE

    # -- dead letters -------------------------------------------------------------

    def _dead_letter(self, topic: str, payload: bytes, reason: str, received_at: float) -> str:
        device = device_from_topic(self.topics, topic)
        log.warning("dead letter from %s on %s: %s", device or "?", topic, reason)
        try:
            with self.db.atomic():
                DeadLetter.create(
                    received_at=received_at,
                    topic=topic,
                    device=device,
                    reason=reason,
                    payload=bytes(payload[:DEAD_LETTER_MAX_BYTES]),
                    payload_size=len(payload),
                )
        except Exception:
            log.exception(
                "could not write a dead letter for %s (%d bytes); message dropped: %s",
                topic,
                len(payload),
                reason,
            )
            return ERROR
        metrics.DEAD_LETTERS.inc()
        return DEAD_LETTER


def device_from_topic(topics: Topics, topic: str) -> str | None:
    """The device a topic names, even when the topic is otherwise invalid, else None."""
    prefix = f"{topics.root}/devices/"
    if not topic.startswith(prefix):
        return None
    candidate = topic[len(prefix) :].split("/", 1)[0]
    return candidate if is_valid_name(candidate) else None


class IngestWorker:
    """Subscribes to everything devices publish and feeds it to an `Ingestor`.

    The MQTT session is persistent under a fixed ``client_id``: while the worker is
    stopped the broker queues QoS 1 messages for it and delivers them on restart.

    Args:
        db_path: SQLite path or ``sqlite:///`` URL (see `open_database`).
        broker: where the MQTT broker listens.
        topics: the topic layout.
        client_id: the MQTT client id; keep it stable across restarts.
    """

    def __init__(
        self,
        db_path: str | Path,
        broker: BrokerAddress,
        topics: Topics,
        client_id: str = "flowfleet-registry",
    ) -> None:
        self.db = open_database(db_path)
        self.topics = topics
        self.ingestor = Ingestor(self.db, topics)
        self.connection = MqttConnection(client_id, broker, persistent=True)
        self.connection.subscribe(topics.all_devices(), self._on_message, qos=QOS)
        self._outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self._lock = threading.Lock()
        self._started = False

    def start(self, wait: float | None = None) -> bool:
        """Connect in the background; with ``wait``, block up to that many seconds
        for the broker to accept the session. Returns whether it is connected."""
        if not self._started:
            self.connection.start()
            self._started = True
        if wait is not None:
            return self.connection.wait_connected(wait)
        return self.connection.connected.is_set()

    def stop(self) -> None:
        """Disconnect cleanly; the broker keeps the session and queues for it."""
        if self._started:
            self.connection.stop()
            self._started = False

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set()

    @property
    def outcomes(self) -> dict[str, int]:
        """A snapshot of how many messages ended in each outcome."""
        with self._lock:
            return dict(self._outcomes)

    def processed(self) -> int:
        """Messages handled so far, whatever the outcome."""
        with self._lock:
            return sum(self._outcomes.values())

    def stats(self) -> dict[str, object]:
        """Counters and connection state, for /healthz and metrics."""
        return {"connected": self.connected, "outcomes": self.outcomes}

    def _on_message(self, topic: str, payload: bytes) -> None:
        outcome = self.ingestor.handle(topic, payload)
        with self._lock:
            self._outcomes[outcome] += 1
        if outcome == ERROR:
            # Neither stored nor dead-lettered (database unusable): withhold the ack so
            # the broker keeps the message for redelivery after reconnect.
            raise NotAcknowledged("the database could not store or dead-letter it")

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
