"""Per-device ingest counters (`DeviceCounters`), kept in the ingest transaction.

``GET /api/devices`` used to count every raw bin and health beat of every device
for each request, which grows with the fleet's history (160-214 ms per 1.44 M raw
bins, docs/benchmarks.md). Ingest now adds what it inserts to one row per device in
the transaction that inserts it, so the count is exactly what was stored: a
redelivery (no row inserted) or a rolled-back batch adds nothing.

`add` is one multi-row upsert for a whole batch (the bins' share of a batch costs
one statement whatever its size). `backfill` (migration 20) computes the rows from
the raw tables, the way `/api/devices` did; `computed` is that computation, kept
for the migration and for tests that check the counters against it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import peewee as pw

from ..store import bulk
from ..store.counters_tables import DeviceCounters
from ..store.db import CountBin, DeadLetter, Device, HealthBeat

_COLUMNS = (
    "device",
    "bins",
    "bin_seq_max",
    "last_bin_at",
    "beats",
    "beat_seq_max",
    "last_beat_at",
    "dead_letters",
)


@dataclass
class Delta:
    """What one transaction adds to a device's counters."""

    bins: int = 0
    bin_seq_max: int | None = None
    last_bin_at: float | None = None
    beats: int = 0
    beat_seq_max: int | None = None
    last_beat_at: float | None = None
    dead_letters: int = 0

    def bin(self, seq: int, received_at: float) -> None:
        self.bins += 1
        self.bin_seq_max = seq if self.bin_seq_max is None else max(self.bin_seq_max, seq)
        self.last_bin_at = _later(self.last_bin_at, received_at)

    def beat(self, seq: int, received_at: float) -> None:
        self.beats += 1
        self.beat_seq_max = seq if self.beat_seq_max is None else max(self.beat_seq_max, seq)
        self.last_beat_at = _later(self.last_beat_at, received_at)


def _later(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _upsert_suffix(db: pw.Database) -> str:
    # GREATEST ignores NULLs on PostgreSQL; SQLite's two-argument MAX returns NULL if
    # either is NULL, hence the COALESCE (seq and times are never negative).
    real = db.obj if isinstance(db, pw.DatabaseProxy) else db  # a model's database
    big = "GREATEST" if isinstance(real, pw.PostgresqlDatabase) else "MAX"
    t = bulk.table(DeviceCounters)

    def keep_max(col: str) -> str:
        return (
            f'"{col}" = NULLIF({big}(COALESCE({t}."{col}", -1), '
            f'COALESCE(excluded."{col}", -1)), -1)'
        )

    adds = [f'"{c}" = {t}."{c}" + excluded."{c}"' for c in ("bins", "beats", "dead_letters")]
    maxes = [keep_max(c) for c in ("bin_seq_max", "last_bin_at", "beat_seq_max", "last_beat_at")]
    return 'ON CONFLICT ("device") DO UPDATE SET ' + ", ".join(adds + maxes)


def add(db: pw.Database, deltas: dict[str, Delta]) -> None:
    """Add ``deltas`` to their devices' counters (inside the ingest transaction): one
    upsert, devices in sorted order (PostgreSQL row locks taken in one order)."""
    rows = [
        (
            d,
            x.bins,
            x.bin_seq_max,
            x.last_bin_at,
            x.beats,
            x.beat_seq_max,
            x.last_beat_at,
            x.dead_letters,
        )
        for d, x in sorted(deltas.items())
        if x.bins or x.beats or x.dead_letters
    ]
    bulk.insert(db, DeviceCounters, _COLUMNS, rows, _upsert_suffix(db))


def add_bins(db: pw.Database, stored: Iterable[tuple[str, int, float]]) -> None:
    """Count the bins (device, seq, received_at) a transaction inserted."""
    deltas: dict[str, Delta] = {}
    for device, seq, received_at in stored:
        deltas.setdefault(device, Delta()).bin(seq, received_at)
    add(db, deltas)


def add_beat(db: pw.Database, device: str, seq: int, received_at: float) -> None:
    """Count one health beat the transaction inserted."""
    delta = Delta()
    delta.beat(seq, received_at)
    add(db, {device: delta})


def add_dead_letter(db: pw.Database, device: str | None) -> None:
    """Count one dead letter naming ``device`` (none for a topic without a device)."""
    if device is not None:
        add(db, {device: Delta(dead_letters=1)})


def remove_beats(device: str, n: int) -> None:
    """Retention removed ``n`` of the device's health beats (never its newest)."""
    if n:
        DeviceCounters.update(beats=DeviceCounters.beats - n).where(
            DeviceCounters.device == device
        ).execute()


def read() -> dict[str, DeviceCounters]:
    """Every device's counters, by device id."""
    return {row.device: row for row in DeviceCounters.select()}


def computed() -> dict[str, dict[str, object]]:
    """The counters computed from the raw tables (what `/api/devices` did per
    request): per device, every column of `DeviceCounters` but ``device``."""
    out: dict[str, dict[str, object]] = {}

    def row(d: str) -> dict[str, object]:
        return out.setdefault(
            d,
            {
                "bins": 0,
                "bin_seq_max": None,
                "last_bin_at": None,
                "beats": 0,
                "beat_seq_max": None,
                "last_beat_at": None,
                "dead_letters": 0,
            },
        )

    for d, n, top, last in (
        CountBin.select(
            CountBin.device,
            pw.fn.COUNT(CountBin.id),
            pw.fn.MAX(CountBin.seq),
            pw.fn.MAX(CountBin.received_at),
        )
        .group_by(CountBin.device)
        .tuples()
    ):
        row(d).update(bins=n, bin_seq_max=top, last_bin_at=last)
    for d, pruned in Device.select(Device.id, Device.bins_pruned).tuples():
        if pruned:
            row(d)["bins"] += pruned
    for d, n, top, last in (
        HealthBeat.select(
            HealthBeat.device,
            pw.fn.COUNT(HealthBeat.id),
            pw.fn.MAX(HealthBeat.seq),
            pw.fn.MAX(HealthBeat.received_at),
        )
        .group_by(HealthBeat.device)
        .tuples()
    ):
        row(d).update(beats=n, beat_seq_max=top, last_beat_at=last)
    for d, n in (
        DeadLetter.select(DeadLetter.device, pw.fn.COUNT(DeadLetter.id))
        .where(DeadLetter.device.is_null(False))
        .group_by(DeadLetter.device)
        .tuples()
    ):
        row(d)["dead_letters"] = n
    return out


def backfill(db: pw.Database) -> int:
    """Fill the counters from the raw tables (migration 20); returns the rows."""
    DeviceCounters.delete().execute()
    rows = [(d, *(c[k] for k in _COLUMNS[1:])) for d, c in sorted(computed().items())]
    bulk.insert(db, DeviceCounters, _COLUMNS, rows)
    return len(rows)
