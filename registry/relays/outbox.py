"""The relays' durable outbox: filled by ingest, emptied by the relay job.

`queue_stored` runs inside ingest's transaction (`flowfleet.registry.fleet.ingest`):
every message ingest stores that a relay's `Route` selects becomes one
`RelayMessage` row for that relay, in one multi-row INSERT per batch, so a message is
queued exactly when it is committed; a redelivery (stored once) is queued once. The
row holds the message's id and no copy of it: the relay reads the payload from the
table ingest stored it in (`load_payloads`) when it sends it.

The relay job reads the oldest rows that are not parked (`due`), deletes them once
the cloud acknowledged them (`acknowledge`), counts a failed send on them (`failed`)
or parks one with its reason (`park`). Nothing else removes a row, so whatever the
registry was doing when it died, what was not acknowledged is sent again after the
restart: at least once, deduplicated downstream on ``msg_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import peewee as pw

from ..store import bulk
from ..store.db import DeviceGroup, DeviceGroupMember, now
from ..store.relay_tables import RelayMessage

_COLUMNS = ("relay", "msg_id", "payload", "received_at")
_INGEST_COLUMNS = ("relay", "msg_id", "received_at")


def message_id(device: str, kind: str, seq: int) -> str:
    """The stable id of a device message, the same on every resend: ``device/kind/seq``."""
    return f"{device}/{kind}/{seq}"


def split_id(msg_id: str) -> tuple[str, str, int]:
    """(device, kind, seq) of a `message_id` (device ids never contain a slash)."""
    device, kind, seq = msg_id.split("/")
    return device, kind, int(seq)


@dataclass(frozen=True)
class Route:
    """What ingest queues for relay ``relay``: messages of ``kinds`` from devices that
    match a pattern of ``devices`` or belong to one of ``groups``. Picklable: ingest
    worker processes get it from the registry."""

    relay: str
    kinds: tuple[str, ...]
    devices: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ()

    def selects(self, device: str, kind: str, members: set[tuple[str, str]]) -> bool:
        if kind not in self.kinds:
            return False
        if any(fnmatchcase(device, p) for p in self.devices):
            return True
        return any((g, device) in members for g in self.groups)


@dataclass(frozen=True)
class Stored:
    """A message to queue. ``payload`` None: ingest has just stored it (in the
    transaction still open) and the relay reads it from there when it sends it."""

    device: str
    kind: str
    seq: int
    payload: str | None
    received_at: float


def _memberships(routes: Sequence[Route], devices: set[str]) -> set[tuple[str, str]]:
    groups = {g for r in routes for g in r.groups}
    if not groups or not devices:
        return set()
    rows = (
        DeviceGroupMember.select(DeviceGroup.name, DeviceGroupMember.device)
        .join(DeviceGroup)
        .where(DeviceGroup.name.in_(sorted(groups)) & DeviceGroupMember.device.in_(sorted(devices)))
        .tuples()
    )
    return set(rows)


def queue_stored(db: pw.Database, routes: Sequence[Route], stored: Sequence[Stored]) -> int:
    """Queue ``stored`` for every route that selects them (call inside the ingest
    transaction); returns the rows queued. This runs on ingest's hot path: per
    message the id is made once, a route for every device of a kind skips the
    pattern matching, and a row is four values."""
    if not routes or not stored:
        return 0
    members = _memberships(routes, {s.device for s in stored})
    everyone = [r.devices == ("*",) for r in routes]
    rows = []
    for s in stored:
        msg_id = None
        for route, all_devices in zip(routes, everyone, strict=True):
            if s.kind not in route.kinds:
                continue
            if not all_devices and not route.selects(s.device, s.kind, members):
                continue
            if msg_id is None:
                msg_id = message_id(s.device, s.kind, s.seq)
            rows.append((route.relay, msg_id, s.payload, s.received_at))
    by_reference = [(r, m, t) for r, m, p, t in rows if p is None]
    if by_reference:
        bulk.insert(db, RelayMessage, _INGEST_COLUMNS, by_reference)
    with_payload = [row for row in rows if row[2] is not None]
    if with_payload:
        bulk.insert(db, RelayMessage, _COLUMNS, with_payload)
    return len(rows)


def _stored_tables() -> dict[str, type[pw.Model]]:
    from ..store.db import CountBin, DriftSummary, Event, HealthBeat
    from ..store.shadow_tables import ShadowWindow

    return {
        "counts": CountBin,
        "health": HealthBeat,
        "events": Event,
        "drift": DriftSummary,
        "shadow": ShadowWindow,
    }


def load_payloads(db: pw.Database, wanted: Sequence[tuple[str, str, int]]) -> dict:
    """The stored payloads of (device, kind, seq) messages: one query per kind.
    A message retention has removed since is missing from the answer."""
    by_kind: dict[str, list[tuple[str, int]]] = {}
    for device, kind, seq in wanted:
        by_kind.setdefault(kind, []).append((device, seq))
    tables = _stored_tables()
    out: dict[tuple[str, str, int], str] = {}
    for kind, keys in by_kind.items():
        model = tables[kind]
        names = ("device", "seq", "payload")
        for device, seq, payload in bulk.select_in(db, model, names, ("device", "seq"), keys):
            out[(device, kind, seq)] = payload
    return out


def due(relay: str, limit: int) -> list[RelayMessage]:
    """The oldest ``limit`` rows of ``relay`` that are not parked, in queue order."""
    m = RelayMessage
    return list(
        m.select().where((m.relay == relay) & m.parked_at.is_null()).order_by(m.id).limit(limit)
    )


def queued(relay: str) -> int:
    """Rows of ``relay`` waiting to be sent (not parked)."""
    m = RelayMessage
    return m.select().where((m.relay == relay) & m.parked_at.is_null()).count()


def acknowledge(ids: Sequence[int]) -> int:
    """The cloud acknowledged these rows: they leave the outbox."""
    done = 0
    for i in range(0, len(ids), 500):
        done += RelayMessage.delete().where(RelayMessage.id.in_(list(ids[i : i + 500]))).execute()
    return done


def failed(ids: Sequence[int], error: str, *, count: bool = True) -> None:
    """A send of these rows failed (they stay queued): note the error and, with
    ``count``, the attempt (attempts lead to parking at ``max_attempts``)."""
    m = RelayMessage
    changes: dict = {"last_error": error[:2000]}
    if count:
        changes["attempts"] = m.attempts + 1
    for i in range(0, len(ids), 500):
        m.update(changes).where(m.id.in_(list(ids[i : i + 500]))).execute()


def park(row_id: int, reason: str) -> None:
    """Set a row aside for good (the cloud refuses it, or it failed too often)."""
    RelayMessage.update(parked_at=now(), reason=reason[:2000]).where(
        RelayMessage.id == row_id
    ).execute()


def requeue_parked(relay: str, ids: Sequence[int] | None = None) -> int:
    """Send parked rows of ``relay`` again (after the cause is fixed); returns how many."""
    m = RelayMessage
    cond = (m.relay == relay) & m.parked_at.is_null(False)
    if ids is not None:
        cond &= m.id.in_(list(ids))
    return m.update(parked_at=None, reason=None, attempts=0).where(cond).execute()


def depth() -> dict[str, dict[str, float]]:
    """Per relay: rows queued, rows parked, and the age of the oldest queued row."""
    m = RelayMessage
    out: dict[str, dict[str, float]] = {}
    rows = (
        m.select(
            m.relay,
            m.parked_at.is_null(False).alias("parked"),
            pw.fn.COUNT(m.id),
            pw.fn.MIN(m.received_at),
        )
        .group_by(m.relay, m.parked_at.is_null(False))
        .tuples()
    )
    t = now()
    for relay, parked, count, oldest in rows:
        entry = out.setdefault(relay, {"queued": 0, "parked": 0, "oldest_queued_s": 0.0})
        if parked:
            entry["parked"] = count
        else:
            entry["queued"] = count
            entry["oldest_queued_s"] = max(0.0, t - oldest) if oldest else 0.0
    return out


def parked(relay: str | None = None, limit: int = 100) -> list[dict]:
    """Parked rows (newest first) with their reasons."""
    m = RelayMessage
    q = m.select().where(m.parked_at.is_null(False))
    if relay is not None:
        q = q.where(m.relay == relay)
    return [
        {
            "id": r.id,
            "relay": r.relay,
            "msg_id": r.msg_id,
            "size": len(r.payload.encode()) if r.payload is not None else None,
            "attempts": r.attempts,
            "parked_at": r.parked_at,
            "reason": r.reason,
        }
        for r in q.order_by(m.parked_at.desc()).limit(limit)
    ]
