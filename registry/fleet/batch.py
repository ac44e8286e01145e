"""Count bins stored in bulk: a batch of messages in a handful of statements.

`Ingestor.handle_batch` (`flowfleet.registry.fleet.ingest`) stores a batch of device
messages in one transaction; this module does the count bins' share of it, which is
most of the traffic. Per batch, whatever its size:

- one SELECT each for the devices' acknowledgement state, their highest stored seq,
  and the (device, seq) pairs already stored (redeliveries);
- one INSERT .. RETURNING of the new bins, one INSERT each of their line and zone
  rows, one upsert per rollup table (`RollupBatch`), one upsert of the devices'
  counters (`flowfleet.registry.fleet.counters`: bins stored, highest seq);
- one UPDATE per device whose bins arrived in order (its end-to-end ack), and the
  full walk of `flowfleet.registry.fleet.ack` only for a device with holes.

The outcomes are those of the one-message path: a (device, seq) stored again with
the same content is a duplicate, with other content a conflict (dead-lettered, the
first copy kept); a seq far above the device's highest is refused
(`flowfleet.registry.fleet.bounds`); a seq the device's ack already passed whose raw
row retention removed is a duplicate.

Concurrency: the caller upserts the batch's device rows first (`touch_devices`), which
on PostgreSQL locks them until commit, so two workers storing bins of one device run
one after the other and each reads the state the other committed. SQLite has one
writer at a time anyway.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import peewee as pw

from flowfleet.contract import CountBin as CountBinPayload

from ..store import bulk
from ..store.db import CountBin, CountGap, Device, LineTotal, ZoneTotal
from . import counters
from .ack import advance_counts_ack
from .bounds import seq_jump_reason
from .series import RollupBatch

STORED = "stored"
DUPLICATE = "duplicate"

_KEYS_PER_QUERY = 2000
_BIN_COLUMNS = ("device", "seq", "start", "end", "received_at", "payload")
_LINE_COLUMNS = ("bin", "device", "seq", "start", "camera", "line", "class_")
_LINE_COLUMNS += ("count_in", "count_out")
_ZONE_COLUMNS = ("bin", "device", "seq", "start", "camera", "zone", "class_", "entries")
_ZONE_COLUMNS += ("exits", "peak_occupancy", "dwell_s_sum", "dwell_n")


@dataclass
class BinItem:
    """One valid count bin of the batch; ``index`` is its place in the batch."""

    index: int
    device: str
    message: CountBinPayload
    received_at: float


@dataclass
class BinsResult:
    """What `store_bins` decided, by batch index, and what the ack step needs."""

    outcomes: dict[int, str] = field(default_factory=dict)  # STORED | DUPLICATE
    refused: dict[int, str] = field(default_factory=dict)  # -> dead letter with reason
    # Per device: (counts_acked, counts_max) as read at the start of the batch.
    state: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per device: seqs newly in custody (stored here; the caller adds dead letters).
    custody: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # Devices with a redelivered bin above their ack: their ack may be stale.
    behind: set[str] = field(default_factory=set)
    # Devices with a redelivered bin: their ack is published again.
    repeated: set[str] = field(default_factory=set)


def conflict_reason(what: str, seq: int) -> str:
    """Why a second copy of a stored (device, seq) with other content is refused."""
    return (
        f"{what} seq {seq} was already stored with different content; "
        "kept the first, this one is refused"
    )


def touch_devices(seen: dict[str, float]) -> None:
    """Create unknown devices and set ``last_seen``: one upsert for the batch.

    Sorted by id, so that two workers locking overlapping sets of device rows on
    PostgreSQL take the locks in the same order (no deadlock)."""
    if not seen:
        return
    rows = [(d, t, t, "unknown", t) for d, t in sorted(seen.items())]
    names = ("id", "first_seen", "last_seen", "state", "state_since")
    suffix = 'ON CONFLICT ("id") DO UPDATE SET "last_seen" = excluded."last_seen"'
    bulk.insert(Device._meta.database, Device, names, rows, suffix)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def store_bins(items: list[BinItem], rollups: RollupBatch) -> BinsResult:
    """Store the batch's count bins (call inside its transaction, after
    `touch_devices`); adds the stored ones to ``rollups`` (the caller flushes)."""
    result = BinsResult()
    if not items:
        return result
    db = CountBin._meta.database
    devices = sorted({it.device for it in items})
    result.state.update(_ack_states(devices))
    highest = _max_per_device(db, CountBin, "seq", devices)
    keys = sorted({(it.device, it.message.seq) for it in items})
    found = bulk.select_in(db, CountBin, ("device", "seq", "payload"), ("device", "seq"), keys)
    stored: dict[tuple[str, int], str] = {(d, s): p for d, s, p in found}

    new: list[tuple[BinItem, str]] = []
    for it in items:
        d, seq = it.device, it.message.seq
        body = it.message.to_json().decode()
        first = stored.get((d, seq))
        if first is not None:
            # Compared as JSON values: object members may arrive in another order.
            if json.loads(first) == json.loads(body):
                result.outcomes[it.index] = DUPLICATE
                result.repeated.add(d)
                if seq > result.state.get(d, (0, 0))[0]:
                    result.behind.add(d)
            else:
                result.refused[it.index] = conflict_reason("count bin", seq)
            continue
        top = highest.get(d)
        if (why := seq_jump_reason(d, seq, top)) is not None:
            result.refused[it.index] = why
            continue
        if seq <= result.state.get(d, (0, 0))[0]:
            # Settled before and its raw row since removed by retention: a resend,
            # counted once already.
            result.outcomes[it.index] = DUPLICATE
            result.repeated.add(d)
            continue
        stored[(d, seq)] = body  # a second copy later in this batch is a duplicate
        highest[d] = seq if top is None else max(top, seq)
        new.append((it, body))

    rows = [
        (it.device, it.message.seq, it.message.start, it.message.end, it.received_at, body)
        for it, body in new
    ]
    returned = bulk.insert(db, CountBin, _BIN_COLUMNS, rows, 'RETURNING "id", "device", "seq"')
    ids = {(d, s): i for i, d, s in returned}
    lines, zones = [], []
    for it, _ in new:
        m, d = it.message, it.device
        row_id = ids[(d, m.seq)]
        lines.extend(
            (row_id, d, m.seq, m.start, r.camera, r.line, r.class_, r.in_, r.out) for r in m.lines
        )
        zones.extend(
            (
                row_id,
                d,
                m.seq,
                m.start,
                r.camera,
                r.zone,
                r.class_,
                r.entries,
                r.exits,
                r.peak_occupancy,
                r.dwell_s_sum,
                r.dwell_n,
            )
            for r in m.zones
        )
        rollups.add(d, m)
        result.outcomes[it.index] = STORED
        result.custody[d].append(m.seq)
    bulk.insert(db, LineTotal, _LINE_COLUMNS, lines)
    bulk.insert(db, ZoneTotal, _ZONE_COLUMNS, zones)
    counters.add_bins(db, ((it.device, it.message.seq, it.received_at) for it, _ in new))
    return result


def _max_per_device(
    db: pw.Database, model: type[pw.Model], column: str, devices: list[str]
) -> dict[str, int]:
    """MAX(``column``) per device of ``devices`` that has rows in ``model``'s table
    (one index probe per device on (device, column))."""
    out: dict[str, int] = {}
    for part in _chunks(devices, _KEYS_PER_QUERY):
        sql = (
            f'SELECT "device", MAX("{column}") FROM {bulk.table(model)} WHERE "device" IN '
            f'({", ".join([db.param] * len(part))}) GROUP BY "device"'
        )
        out.update(db.execute_sql(sql, part).fetchall())
    return out


def _ack_states(devices: list[str]) -> dict[str, tuple[int, int]]:
    """(counts_acked, counts_max) of each known device of ``devices``."""
    found = bulk.select_in(
        Device._meta.database, Device, ("id", "counts_acked", "counts_max"), ("id",), devices
    )
    return {d: (acked or 0, top or 0) for d, acked, top in found}


def settle_acks(db: pw.Database, result: BinsResult) -> dict[str, tuple[int, int]]:
    """Advance each device's end-to-end ack over the seqs newly in custody (call in
    the batch's transaction, after its dead letters are written). Returns the acks
    to publish after commit: (counts_acked, counts_max) per device.

    A device whose bins arrived in order with nothing outstanding costs one UPDATE,
    sent together with the others; one with holes, declared gaps or a stale ack takes
    the walk of `advance_counts_ack`.
    """
    acks: dict[str, tuple[int, int]] = {}
    db = Device._meta.database
    devices = sorted(set(result.custody) | result.behind)
    # A device whose only bins here were dead-lettered was not read by store_bins.
    result.state.update(_ack_states([d for d in devices if d not in result.state]))
    gapped = {
        d
        for d, last in _max_per_device(db, CountGap, "last", devices).items()
        if last > result.state.get(d, (0, 0))[0]
    }
    in_order: list[tuple[int, int, str]] = []
    for d in devices:
        if d not in result.state:
            continue  # a dead letter of a device the registry does not know
        acked, top = result.state[d]
        seqs = sorted({s for s in result.custody.get(d, ()) if s > acked})
        if (
            seqs
            and top == acked
            and d not in gapped
            and d not in result.behind
            and seqs[-1] - acked == len(seqs)
        ):
            in_order.append((seqs[-1], seqs[-1], d))
            acks[d] = (seqs[-1], seqs[-1])
            continue
        if seqs and seqs[-1] > top:
            Device.update(counts_max=seqs[-1]).where(Device.id == d).execute()
        state = advance_counts_ack(d)
        if state is not None:
            acks[d] = state
    if in_order:
        sql = (
            f"UPDATE device SET counts_acked = {db.param}, counts_max = {db.param} "
            f"WHERE id = {db.param}"
        )
        cursor = db.cursor()
        cursor.executemany(sql, in_order)
    for d in result.repeated - acks.keys():
        if d in result.state:
            acks[d] = result.state[d]
    return acks
