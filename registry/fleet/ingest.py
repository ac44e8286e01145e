"""Ingest: validate what devices publish and store it exactly once.

`Ingestor.handle` is the whole pipeline for one MQTT message and never raises: the
message ends up stored, recognised as a duplicate, or in the dead-letter table with
a reason, each committed in one transaction before `handle` returns; or, when the
database itself fails (locked, unreachable), "deferred": nothing is written and the
message must not be acknowledged, so the broker delivers it again. Dead letters are
for messages that are wrong, never for a registry that had a bad moment. That
matters because the MQTT client acknowledges a QoS 1 message as soon as the handler
returns; whatever is not committed by then is gone.

Every count bin taken into custody (stored, dead-lettered whole) advances the
device's end-to-end acknowledgement in the same transaction (`flowfleet.registry.fleet.ack`);
`IngestWorker` publishes it, retained, after the commit.

`IngestWorker` (`flowfleet.registry.fleet.worker`) feeds an `Ingestor` from a
persistent MQTT session, in batches (`handle_batch`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

import peewee as pw

from flowfleet.contract import (
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
from flowfleet.contract_shadow import ShadowWindow as ShadowPayload

from .. import metrics
from ..relays.outbox import Route, queue_stored
from ..relays.outbox import Stored as RelayStored
from ..store.db import (
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
    require_bound,
)
from . import counters
from .ack import ack_state, note_count_seq, note_gap
from .batch import BinItem, conflict_reason, settle_acks, store_bins, touch_devices
from .bounds import check_seq_jump
from .devices import status_columns
from .series import Buckets, RollupBatch, add_bin
from .shadow import ShadowWindow, shadow_columns

log = logging.getLogger(__name__)

# Outcomes of Ingestor.handle (plain strings so they serve directly as metric labels).
STORED = "stored"
DUPLICATE = "duplicate"
DEAD_LETTER = "dead-letter"
# The database failed (locked, unreachable) for longer than the retry budget: nothing
# was written; the message is left unacknowledged for the broker to deliver again.
DEFERRED = "deferred"
# Nothing could be committed, not even a dead letter (the database is unusable).
ERROR = "error"
OUTCOMES = (STORED, DUPLICATE, DEAD_LETTER, DEFERRED, ERROR)

# A message's own fault: it is dead-lettered. Any other database error is the
# registry's (a lock held too long, a lost connection, a full disk) and is retried.
_MESSAGE_FAULTS = (pw.IntegrityError, pw.DataError)
_DATABASE_ERRORS = (pw.DatabaseError, pw.InterfaceError)


class _Conflict(Exception):
    """A valid message the registry refuses for what is stored already: a (device, seq)
    stored with different content, or a seq far above the device's highest."""


class _Deferred(Exception):
    """The database kept failing for the whole retry budget."""


class Ingestor:
    """Validates and stores device messages in the registry database.

    Args:
        db: the database returned by `open_database` (the models must be bound to it).
        topics: the topic layout the devices publish under.
    """

    def __init__(
        self,
        db: pw.Database,
        topics: Topics,
        *,
        retry_s: float = 15.0,
        site_timezone: str = "UTC",
        relay_routes: Sequence[Route] = (),
    ) -> None:
        require_bound(db)
        self.db = db
        self.topics = topics
        self.retry_s = retry_s
        self.buckets = Buckets(site_timezone)  # day rollups start at its midnight
        # Devices whose count-bin custody was committed by handle(), with their
        # (counts_acked, counts_max), for the worker to publish as acks.
        self.acks: dict[str, tuple[int, int]] = {}
        self._acks_lock = threading.Lock()
        # The acks a transaction in progress computed; kept only once it committed.
        self._staged_acks: dict[str, tuple[int, int]] = {}
        # What the cloud relays forward: stored messages are queued for them in the
        # same transaction (`flowfleet.registry.relays.outbox`).
        self.relay_routes = tuple(relay_routes)
        self._relay_kinds = {k for r in self.relay_routes for k in r.kinds}
        self.relays_queued = 0  # rows queued for the relays (committed or not)

    def take_acks(self) -> dict[str, tuple[int, int]]:
        """The acks to publish since the last call (newest state per device)."""
        with self._acks_lock:
            acks, self.acks = self.acks, {}
        return acks

    def add_acks(self, acks: dict[str, tuple[int, int]]) -> None:
        """Queue acks committed elsewhere (a `StoreProcess`) for `take_acks`."""
        if acks:
            with self._acks_lock:
                self.acks.update(acks)

    def handle(self, topic: str, payload: bytes, received_at: float | None = None) -> str:
        """Process one message; returns "stored", "duplicate", "dead-letter",
        "deferred" or "error".

        Never raises. "error" means not even a dead letter could be written.
        """
        outcome = self._handle(topic, payload, now() if received_at is None else received_at)
        self._count(topic, outcome)
        return outcome

    def _count(self, topic: str, outcome: str) -> None:
        try:
            kind = self.topics.parse_device_topic(topic)[1]
        except ContractError:
            kind = "invalid"  # bounded label values, whatever the topic was
        metrics.INGEST.labels(kind=kind, outcome=outcome).inc()

    def handle_batch(self, items: Sequence[tuple[str, bytes, float]]) -> list[str]:
        """Process (topic, payload, received_at) messages in one transaction; returns
        their outcomes in order (those of `handle`). Never raises.

        Count bins are stored in bulk (`flowfleet.registry.fleet.batch`), other kinds
        one after the other in arrival order. The database failing (locked,
        unreachable) is retried as for one message, then every message of the batch is
        "deferred". An error that is neither that nor a refusal the batch path knows
        (a database constraint, a bug) rolls the batch back and stores its messages
        one by one, so it costs only the message that caused it.
        """
        if len(items) == 1:
            return [self.handle(*items[0])]
        parsed: list[tuple[int, str, object]] = []
        refused: dict[int, str] = {}
        kinds = ["invalid"] * len(items)  # metric labels, as `_count` gives them
        for i, (topic, payload, received_at) in enumerate(items):
            try:
                device, kind = self.topics.parse_device_topic(topic)
                kinds[i] = kind
                parsed.append(
                    (i, device, parse_payload(kind, payload, device=device, now=received_at))
                )
            except ContractError as exc:
                refused[i] = str(exc)
            except Exception as exc:  # a validator bug must not take the worker down
                log.exception("unexpected error validating a message on %s", topic)
                refused[i] = f"could not validate: {exc!r}"
        try:
            outcomes = self._retrying(
                lambda: self._store_batch(items, parsed, refused), f"a batch of {len(items)}"
            )
        except _Deferred:
            outcomes = [DEFERRED] * len(items)
        except Exception as exc:
            log.warning(
                "a batch of %d messages failed (%r); storing them one by one", len(items), exc
            )
            outcomes = [self._handle(*item) for item in items]
        else:
            with self._acks_lock:
                self.acks.update(self._staged_acks)
            self._staged_acks = {}
            metrics.DEAD_LETTERS.inc(outcomes.count(DEAD_LETTER))
        # One increment per (kind, outcome) of the batch, not one per message.
        for (kind, outcome), n in Counter(zip(kinds, outcomes, strict=True)).items():
            metrics.INGEST.labels(kind=kind, outcome=outcome).inc(n)
        return outcomes

    def _store_batch(
        self,
        items: Sequence[tuple[str, bytes, float]],
        parsed: list[tuple[int, str, object]],
        refused: dict[int, str],
    ) -> list[str]:
        """`handle_batch`'s transaction (run by `_retrying`, so it may run again)."""
        outcomes = [DEAD_LETTER] * len(items)
        refused = dict(refused)
        seen: dict[str, float] = {}
        for i, device, _ in parsed:
            seen[device] = max(seen.get(device, 0.0), items[i][2])
        touch_devices(seen)
        bins: list[BinItem] = []
        for i, device, message in parsed:
            if isinstance(message, CountBinPayload):
                bins.append(BinItem(i, device, message, items[i][2]))
                continue
            try:
                outcomes[i] = self._store(device, message, items[i][2], touch=False)
            except _Conflict as exc:  # it wrote nothing: refused on its own
                refused[i] = str(exc)
        rollups = RollupBatch(self.buckets)
        result = store_bins(bins, rollups)
        rollups.flush()
        for i, outcome in result.outcomes.items():
            outcomes[i] = outcome
        refused.update(result.refused)
        if self._relay_kinds:
            self._queue_for_relays(
                [
                    (device, items[i][0], items[i][1], message, items[i][2])
                    for i, device, message in parsed
                    if outcomes[i] == STORED
                ]
            )
        for i, reason in sorted(refused.items()):
            topic, payload, received_at = items[i]
            custody = self._write_dead_letter(topic, payload, reason, received_at)
            if custody is not None:
                result.custody[custody[0]].append(custody[1])
        self._staged_acks.update(settle_acks(self.db, result))
        return outcomes

    def _handle(self, topic: str, payload: bytes, received_at: float) -> str:
        outcome, reason = self._ingest(topic, payload, received_at)
        if outcome == DEAD_LETTER:
            return self._dead_letter(topic, payload, reason, received_at)
        return outcome

    def replay(self, topic: str, payload: bytes, received_at: float) -> tuple[str, str]:
        """Ingest a dead letter's message again, as if received at ``received_at``.

        Never writes a new dead letter: returns (outcome, reason), where a message
        that is still refused comes back as ("dead-letter", why).
        """
        return self._ingest(topic, payload, received_at)

    def _ingest(self, topic: str, payload: bytes, received_at: float) -> tuple[str, str]:
        """Validate and store one message: (STORED | DUPLICATE | DEFERRED, "") or
        (DEAD_LETTER, the reason it is refused)."""
        try:
            device, kind = self.topics.parse_device_topic(topic)
            message = parse_payload(kind, payload, device=device, now=received_at)
        except ContractError as exc:
            return DEAD_LETTER, str(exc)
        except Exception as exc:  # a validator bug must not take the worker down
            log.exception("unexpected error validating a message on %s", topic)
            return DEAD_LETTER, f"could not validate: {exc!r}"

        def store() -> str:
            outcome = self._store(device, message, received_at)
            if outcome == STORED and kind in self._relay_kinds:
                self._queue_for_relays([(device, topic, payload, message, received_at)])
            return outcome

        try:
            outcome = self._retrying(store, topic)
        except _Conflict as exc:
            # The transaction above was rolled back; record the conflict on its own.
            return DEAD_LETTER, str(exc)
        except _Deferred:
            return DEFERRED, ""
        except _MESSAGE_FAULTS as exc:
            log.warning("database refused a message on %s: %s", topic, exc)
            return DEAD_LETTER, f"database refused it: {exc}"
        except Exception as exc:  # a bug in storing: kept for replay once fixed
            log.exception("error storing a message on %s", topic)
            return DEAD_LETTER, f"could not store: {exc!r}"
        if kind == "counts" or self._staged_acks:
            self._note_ack(device)  # committed: the device may let go of its bins
        return outcome, ""

    def _queue_for_relays(self, stored: list[tuple[str, str, bytes, object, float]]) -> None:
        """Queue (device, topic, payload, message, received_at) just stored for the
        relays whose routes select them (in the open transaction). Only a reference
        is queued: the relay reads the message from its table when it sends it."""
        rows = []
        for device, topic, _payload, message, received_at in stored:
            kind = topic.rsplit("/", 1)[-1]
            seq = getattr(message, "seq", None)
            if kind in self._relay_kinds and seq is not None:
                rows.append(RelayStored(device, kind, seq, None, received_at))
        self.relays_queued += queue_stored(self.db, self.relay_routes, rows)

    def _stage_ack(self, device: str, state: tuple[int, int] | None) -> None:
        if state is not None:
            self._staged_acks[device] = state

    def _retrying(self, work, topic: str):
        """Run ``work`` in a transaction; retry database failures that are not the
        message's fault, with backoff, for up to ``retry_s``; then raise _Deferred."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            self._staged_acks = {}
            try:
                with self.db.atomic():
                    return work()
            except _MESSAGE_FAULTS:
                raise
            except _DATABASE_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "database error storing a message on %s, %d attempts in %.0fs; "
                        "leaving it unacknowledged for redelivery: %s",
                        topic,
                        attempt,
                        self.retry_s,
                        exc,
                    )
                    raise _Deferred(str(exc)) from exc
                log.warning(
                    "database error storing a message on %s (attempt %d), retrying in %.2fs: %s",
                    topic,
                    attempt,
                    delay,
                    exc,
                )
                self._reset_connection()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _reset_connection(self) -> None:
        """After a failure a PostgreSQL connection may be dead: the next try opens a new
        one. (SQLite's connection stays usable: its errors are locks and I/O.)"""
        if isinstance(self.db, pw.SqliteDatabase):
            return
        with contextlib.suppress(Exception):
            self.db.close()

    def _note_ack(self, device: str) -> None:
        """Queue the device's committed ack for publishing (after the commit): the one
        the transaction computed, else (a duplicate) the stored one."""
        staged, self._staged_acks = self._staged_acks, {}
        if device in staged:
            state = staged[device]
        else:
            try:
                state = ack_state(device)
            except Exception:  # the ack is an optimisation over the device's resend timer
                log.debug("could not read the ack state of %s", device, exc_info=True)
                return
        if state is not None:
            with self._acks_lock:
                self.acks[device] = state

    # -- storing valid messages ----------------------------------------------------

    def _store(self, device: str, message: object, received_at: float, touch: bool = True) -> str:
        if touch:
            self._touch_device(device, received_at)
        if isinstance(message, CountBinPayload):
            return self._store_bin(device, message, received_at)
        if isinstance(message, HealthPayload):
            return self._store_health(device, message, received_at)
        if isinstance(message, EventPayload):
            return self._store_event(device, message, received_at)
        if isinstance(message, DriftPayload):
            return self._store_drift(device, message, received_at)
        if isinstance(message, ShadowPayload):
            return self._store_shadow(device, message, received_at)
        if isinstance(message, StatusPayload):
            return self._store_status(device, message, received_at)
        if isinstance(message, ReportedPayload):
            return self._store_reported(device, message, received_at)
        raise TypeError(f"no storage for {type(message).__name__}")

    def _touch_device(self, device: str, received_at: float) -> None:
        touch_devices({device: received_at})

    def _store_once(
        self,
        table: type[pw.Model],
        what: str,
        device: str,
        message: CountBinPayload | HealthPayload | EventPayload | DriftPayload | ShadowPayload,
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
        raise _Conflict(conflict_reason(what, message.seq))

    def _store_bin(self, device: str, message: CountBinPayload, received_at: float) -> str:
        if (why := check_seq_jump(self.db, device, message.seq)) is not None:
            raise _Conflict(why)
        state = ack_state(device)
        if (
            state is not None
            and message.seq <= state[0]
            and not CountBin.select()
            .where((CountBin.device == device) & (CountBin.seq == message.seq))
            .exists()
        ):
            # Settled before (stored, dead-lettered or declared dropped) and its raw
            # record since removed by retention: a resend, counted once already.
            return DUPLICATE
        outcome = self._store_once(
            CountBin,
            "count bin",
            device,
            message,
            {"start": message.start, "end": message.end, "received_at": received_at},
        )
        if outcome != STORED:
            return outcome
        self._stage_ack(device, note_count_seq(device, message.seq))
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
        add_bin(device, message, self.buckets)
        counters.add_bins(self.db, [(device, message.seq, received_at)])
        return STORED

    def _store_health(self, device: str, message: HealthPayload, received_at: float) -> str:
        outcome = self._store_once(
            HealthBeat,
            "health beat",
            device,
            message,
            {"ts": message.ts, "received_at": received_at},
        )
        if outcome == STORED:  # a duplicate inserted nothing: nothing to count
            counters.add_beat(self.db, device, message.seq, received_at)
        return outcome

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
        if outcome == STORED and message.type == "outbox_dropped":
            self._note_dropped_counts(device, message, received_at)
        return outcome

    def _note_dropped_counts(self, device: str, message: EventPayload, received_at: float) -> None:
        """A device that dropped count bins (policy drop_oldest) says which: they will
        never arrive, and its ack may pass over them."""
        data = message.data
        first, last = data.get("first_seq"), data.get("last_seq")
        if data.get("stream") != "counts" or not all(_is_seq(v) for v in (first, last)):
            return
        self._stage_ack(device, note_gap(device, first, last, received_at))

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

    def _store_shadow(self, device: str, message: ShadowPayload, received_at: float) -> str:
        columns = shadow_columns(message, received_at)
        return self._store_once(ShadowWindow, "shadow window", device, message, columns)

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
        changes.update(status_columns(message, received_at))  # hardware, cameras
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
        custody = None

        def write() -> None:
            nonlocal custody
            custody = self._write_dead_letter(topic, payload, reason, received_at)
            if custody is not None:
                self._stage_ack(device, note_count_seq(*custody))

        try:
            self._retrying(write, topic)
        except _Deferred:
            return DEFERRED
        except Exception:
            log.exception(
                "could not write a dead letter for %s (%d bytes); message dropped: %s",
                topic,
                len(payload),
                reason,
            )
            return ERROR
        metrics.DEAD_LETTERS.inc()
        if custody is not None:
            self._note_ack(device)
        return DEAD_LETTER

    def _write_dead_letter(
        self, topic: str, payload: bytes, reason: str, received_at: float
    ) -> tuple[str, int] | None:
        """Insert the dead letter (inside a transaction). Returns (device, seq) when it
        holds a whole count bin, which is then in the registry's custody: the device
        may let it go (an operator replays it after a fix)."""
        device = device_from_topic(self.topics, topic)
        kind, seq = kind_and_seq(self.topics, topic, payload)
        log.warning("dead letter from %s on %s: %s", device or "?", topic, reason)
        DeadLetter.create(
            received_at=received_at,
            topic=topic,
            device=device,
            reason=reason[:4096],
            payload=bytes(payload[:DEAD_LETTER_MAX_BYTES]),
            payload_size=len(payload),
            kind=kind,
            seq=seq,
        )
        counters.add_dead_letter(self.db, device)
        whole = len(payload) <= DEAD_LETTER_MAX_BYTES
        if kind == "counts" and device is not None and seq is not None and whole:
            return device, seq
        return None


MAX_SEQ = 2**53 - 1  # JSON-safe; the contract's bound


def _is_seq(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_SEQ


def kind_and_seq(topics: Topics, topic: str, payload: bytes) -> tuple[str | None, int | None]:
    """The topic's kind and the payload's ``seq``, where they can be read at all."""
    try:
        kind = topics.parse_device_topic(topic)[1]
    except ContractError:
        return None, None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return kind, None
    seq = data.get("seq") if isinstance(data, dict) else None
    return kind, seq if _is_seq(seq) else None


def device_from_topic(topics: Topics, topic: str) -> str | None:
    """The device a topic names, even when the topic is otherwise invalid, else None."""
    prefix = f"{topics.root}/devices/"
    if not topic.startswith(prefix):
        return None
    candidate = topic[len(prefix) :].split("/", 1)[0]
    return candidate if is_valid_name(candidate) else None
