"""The agent's durable outbox: every message is stored before it is sent.

One SQLite file (WAL) holds:
- ``outbox``: messages not yet acknowledged (count bins: by the registry; the
  rest: by the broker), oldest first;
- ``sequences``: the last sequence number used per stream (counts, health), so a
  restarted agent continues the sequence and never reuses a number;
- ``totals``: the device's cumulative counts per camera / line / class, updated in
  the same transaction that enqueues the bin, so the persisted totals always equal
  the sum of every bin ever enqueued (the registry's totals converge to them);
- ``positions``: how far each file camera had read when the bin was closed, also
  written in the bin's transaction, so after a crash (even ``kill -9``) the camera
  resumes exactly where the last persisted bin ended: frames after it were never
  counted in a stored bin and are counted again, frames before it never are;
- ``counters``: lifetime figures such as messages dropped by the size/age cap.

A health beat, event or drift summary leaves the outbox when the broker acknowledged
it (PUBACK). A count bin stays after the PUBACK, in a "sent, unconfirmed" state
(``due`` set: when to send it again), until the registry confirms it stored it
(`confirm_counts`, from the registry's retained acknowledgement), so a broker that
crashes or loses its disk cannot lose a count. A bin the registry has not confirmed
by ``due`` is sent again (`pending`), each time after twice as long. Any message may
also leave when the cap drops it (see `Outbox.enforce_limits`; the caller reports
every drop).
Commits use ``synchronous=FULL``: a bin is on disk (fsync) when ``enqueue_bin``
returns.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flowfleet.contract import CountBin, LineCount, ZoneCount

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sequences (
    stream TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS line_totals (
    camera TEXT NOT NULL, line TEXT NOT NULL, class TEXT NOT NULL,
    n_in INTEGER NOT NULL DEFAULT 0, n_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (camera, line, class)
);
CREATE TABLE IF NOT EXISTS zone_totals (
    camera TEXT NOT NULL, zone TEXT NOT NULL, class TEXT NOT NULL,
    entries INTEGER NOT NULL DEFAULT 0, exits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (camera, zone, class)
);
CREATE TABLE IF NOT EXISTS positions (
    camera TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    source_size INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_stream ON outbox(stream, id);
"""

# Added after the first release: outboxes created before get them by ALTER TABLE.
# ``due`` NULL: to be sent; else a count bin the broker took, awaiting the registry's
# confirmation, to be sent again at ``due``. ``sends``: broker acknowledgements so far.
_COLUMNS = {
    "due": "ALTER TABLE outbox ADD COLUMN due REAL",
    "sent_at": "ALTER TABLE outbox ADD COLUMN sent_at REAL",
    "sends": "ALTER TABLE outbox ADD COLUMN sends INTEGER NOT NULL DEFAULT 0",
}
_INDEXES = "CREATE INDEX IF NOT EXISTS outbox_due ON outbox(due, id);"

# What the ``keep_counts`` policy may drop: by age, these streams; to get under
# ``max_messages``, the size-droppable ones, oldest stream first in this order.
# Events are kept by size (they are what reports the drops) and dropped by age only.
DROPPABLE = ("health", "drift", "shadow", "events")
SIZE_DROPPABLE = ("health", "drift", "shadow")


@dataclass(frozen=True)
class Position:
    """Where a file camera had read to: ``pos`` frames of ``source`` are counted."""

    source: str
    source_size: int
    pos: int


@dataclass(frozen=True)
class Dropped:
    """Messages of one stream removed by the cap, for the caller to report."""

    stream: str
    n: int
    first_seq: int
    last_seq: int
    reason: str  # "max_messages" or "max_age_s"


class Outbox:
    """Thread-safe: camera threads enqueue, the publisher thread sends and deletes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a bin the agent considers enqueued survives power loss.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        for column, ddl in _COLUMNS.items():
            if column not in have:
                self._db.execute(ddl)
        self._db.execute(_INDEXES)
        self._depth = dict(
            self._db.execute("SELECT stream, COUNT(*) FROM outbox GROUP BY stream").fetchall()
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _next_seq(self, stream: str) -> int:
        row = self._db.execute("SELECT last FROM sequences WHERE stream=?", (stream,)).fetchone()
        seq = (row[0] if row else 0) + 1
        self._db.execute(
            "INSERT INTO sequences(stream, last) VALUES(?, ?) "
            "ON CONFLICT(stream) DO UPDATE SET last=excluded.last",
            (stream, seq),
        )
        return seq

    def enqueue(self, stream: str, topic: str, build: Callable[[int], bytes]) -> int:
        """Assign the stream's next seq, build the payload with it and store it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq(stream)
                self._insert(stream, seq, topic, build(seq))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._depth[stream] = self._count(stream)
                raise
            return seq

    def enqueue_bin(
        self,
        topic: str,
        build: Callable[[int], CountBin],
        positions: dict[str, Position] | None = None,
    ) -> CountBin:
        """Store a count bin, add it to the totals and record camera positions, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq("counts")
                count_bin = build(seq)
                self._insert("counts", seq, topic, count_bin.to_json())
                self._add_totals(count_bin.lines, count_bin.zones)
                now = time.time()
                self._db.executemany(
                    "INSERT INTO positions(camera, source, source_size, pos, updated) "
                    "VALUES(?,?,?,?,?) ON CONFLICT(camera) DO UPDATE SET "
                    "source=excluded.source, source_size=excluded.source_size, "
                    "pos=excluded.pos, updated=excluded.updated",
                    [
                        (cam, p.source, p.source_size, p.pos, now)
                        for cam, p in (positions or {}).items()
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._depth["counts"] = self._count("counts")
                raise
            return count_bin

    def _count(self, stream: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox WHERE stream=?", (stream,)).fetchone()[
            0
        ]

    def _insert(self, stream: str, seq: int, topic: str, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO outbox(stream, seq, topic, payload, created) VALUES(?,?,?,?,?)",
            (stream, seq, topic, payload, time.time()),
        )
        self._depth[stream] = self._depth.get(stream, 0) + 1

    def _add_totals(self, lines: tuple[LineCount, ...], zones: tuple[ZoneCount, ...]) -> None:
        self._db.executemany(
            "INSERT INTO line_totals(camera, line, class, n_in, n_out) VALUES(?,?,?,?,?) "
            "ON CONFLICT(camera, line, class) DO UPDATE SET "
            "n_in = n_in + excluded.n_in, n_out = n_out + excluded.n_out",
            [(c.camera, c.line, c.class_, c.in_, c.out) for c in lines],
        )
        self._db.executemany(
            "INSERT INTO zone_totals(camera, zone, class, entries, exits) VALUES(?,?,?,?,?) "
            "ON CONFLICT(camera, zone, class) DO UPDATE SET "
            "entries = entries + excluded.entries, exits = exits + excluded.exits",
            [(z.camera, z.zone, z.class_, z.entries, z.exits) for z in zones],
        )

    def pending(
        self,
        limit: int,
        exclude: set[int] | frozenset = frozenset(),
        after: int = 0,
        now: float | None = None,
    ) -> list[tuple]:
        """Oldest messages to send as (id, topic, payload) with id > ``after``: those
        never acknowledged by the broker, and count bins whose confirmation is overdue."""
        now = time.time() if now is None else now
        n = limit + len(exclude)
        # Two index range scans (outbox_due) rather than one OR that would walk every
        # unconfirmed bin on each call while a registry is away.
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE due IS NULL AND id > ? "
                "ORDER BY id LIMIT ?",
                (after, n),
            ).fetchall()
            rows += self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE due <= ? AND id > ? "
                "ORDER BY due LIMIT ?",
                (now, after, n),
            ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [r for r in rows if r[0] not in exclude][:limit]

    def broker_acked(
        self,
        row_ids: Iterable[int],
        *,
        keep_counts: bool,
        timeout_s: float = 120.0,
        timeout_max_s: float = 3600.0,
        now: float | None = None,
    ) -> int:
        """The broker acknowledged these rows: delete them, except count bins when
        ``keep_counts`` (they await the registry, and are sent again if it has not
        confirmed them after ``timeout_s``, doubling per send up to ``timeout_max_s``).
        Returns how many rows were deleted."""
        ids = list(row_ids)
        if not keep_counts:
            return self.delete_many(ids)
        now = time.time() if now is None else now
        with self._lock:
            streams = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                streams.update(
                    self._db.execute(
                        f"SELECT id, stream FROM outbox WHERE id IN ({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                )
            counts = [i for i, stream in streams.items() if stream == "counts"]
            # One statement per row in one transaction: the backoff doubles per send.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE outbox SET sent_at = ?, sends = sends + 1, "
                    "due = ? + MIN(? * (1 << MIN(sends, 20)), ?) WHERE id = ?",
                    [(now, now, timeout_s, timeout_max_s, i) for i in counts],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.delete_many([i for i, stream in streams.items() if stream != "counts"])

    def confirm_counts(self, upto_seq: int) -> int:
        """The registry stored every count bin up to ``upto_seq``: delete them.

        Returns how many rows were deleted (bins still unsent included: the registry
        may have them from an earlier run)."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM outbox WHERE stream = 'counts' AND seq <= ?", (upto_seq,)
            )
            n = cur.rowcount
            if n:
                self._depth["counts"] = self._depth.get("counts", 0) - n
        return n

    def resend_counts(self, after_seq: int, upto_seq: int, sent_before: float) -> int:
        """Send count bins in (``after_seq``, ``upto_seq``] again now, if the broker took
        them before ``sent_before``: the registry has a later bin but not these, so
        they were lost on the way. Returns how many were scheduled."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE outbox SET due = NULL WHERE stream = 'counts' AND seq > ? "
                "AND seq <= ? AND due IS NOT NULL AND sent_at < ?",
                (after_seq, upto_seq, sent_before),
            )
            return cur.rowcount

    def unsent(self) -> int:
        """Messages the broker has not acknowledged yet (awaiting the registry excluded)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE due IS NULL").fetchone()[0]

    def unconfirmed(self) -> int:
        """Count bins the broker took that the registry has not confirmed yet."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE due IS NOT NULL").fetchone()[
                0
            ]

    def delete(self, row_id: int) -> None:
        self.delete_many([row_id])

    def delete_many(self, row_ids: Iterable[int]) -> int:
        """Remove acknowledged messages (one transaction); returns how many were there."""
        ids = list(row_ids)
        if not ids:
            return 0
        removed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    for stream, n in self._db.execute(
                        f"SELECT stream, COUNT(*) FROM outbox WHERE id IN ({marks}) "
                        "GROUP BY stream",
                        chunk,
                    ).fetchall():
                        self._depth[stream] = self._depth.get(stream, 0) - n
                        removed += n
                    self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._depth = dict(
                    self._db.execute(
                        "SELECT stream, COUNT(*) FROM outbox GROUP BY stream"
                    ).fetchall()
                )
                raise
        return removed

    def depth(self, stream: str | None = None) -> int:
        """Messages not yet acknowledged (of one stream, or all); from memory, cheap."""
        with self._lock:
            if stream is not None:
                return self._depth.get(stream, 0)
            return sum(self._depth.values())

    def enforce_limits(
        self,
        max_messages: int,
        max_age_s: float,
        policy: str = "keep_counts",
        exclude: set[int] | frozenset = frozenset(),
        now: float | None = None,
    ) -> list[Dropped]:
        """Apply the size/age cap; returns what was dropped (the caller reports it).

        ``keep_counts``: health beats, drift summaries and events older than
        ``max_age_s`` go; then, while the outbox holds more than ``max_messages``,
        the oldest health beats, then the oldest drift summaries. Count bins (and
        events, which report the drops) are never dropped to make room.
        ``drop_oldest``: the oldest messages of any stream go, counts included.
        Rows in ``exclude`` (in flight right now) are left alone.
        """
        now = time.time() if now is None else now
        streams = DROPPABLE if policy == "keep_counts" else (*DROPPABLE, "counts")
        dropped: list[Dropped] = []
        cutoff = now - max_age_s
        with self._lock:
            if sum(self._depth.values()) <= max_messages:
                oldest = [
                    self._db.execute(
                        "SELECT created FROM outbox WHERE stream=? ORDER BY id LIMIT 1", (s,)
                    ).fetchone()
                    for s in streams
                    if self._depth.get(s)
                ]
                if not any(row and row[0] < cutoff for row in oldest):
                    return []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                marks = ",".join("?" * len(streams))
                skip = ",".join(str(int(i)) for i in exclude) or "-1"
                old = self._db.execute(
                    f"SELECT id, stream, seq FROM outbox WHERE stream IN ({marks}) "
                    f"AND created < ? AND id NOT IN ({skip}) ORDER BY id",
                    (*streams, cutoff),
                ).fetchall()
                dropped += self._drop(old, "max_age_s")
                over = sum(self._depth.values()) - max_messages
                order = SIZE_DROPPABLE if policy == "keep_counts" else (None,)
                for stream in order:
                    if over <= 0:
                        break
                    where = f"stream IN ({marks})" if stream is None else "stream = ?"
                    args = streams if stream is None else (stream,)
                    rows = self._db.execute(
                        f"SELECT id, stream, seq FROM outbox WHERE {where} "
                        f"AND id NOT IN ({skip}) ORDER BY id LIMIT ?",
                        (*args, over),
                    ).fetchall()
                    dropped += self._drop(rows, "max_messages")
                    over -= len(rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._depth = dict(
                    self._db.execute(
                        "SELECT stream, COUNT(*) FROM outbox GROUP BY stream"
                    ).fetchall()
                )
                raise
        return dropped

    def _drop(self, rows: list[tuple], reason: str) -> list[Dropped]:
        by_stream: dict[str, list[tuple]] = {}
        for row in rows:
            by_stream.setdefault(row[1], []).append(row)
        out = []
        for stream, group in by_stream.items():
            ids = [r[0] for r in group]
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                self._db.execute(
                    f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk
                )
            self._depth[stream] = self._depth.get(stream, 0) - len(ids)
            self._db.execute(
                "INSERT INTO counters(name, value) VALUES(?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (f"dropped.{stream}", len(ids)),
            )
            seqs = [r[2] for r in group]
            out.append(Dropped(stream, len(ids), min(seqs), max(seqs), reason))
        return out

    def counters(self) -> dict[str, int]:
        """Lifetime figures, e.g. ``dropped.health`` (messages dropped by the cap)."""
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def positions(self) -> dict[str, Position]:
        """The last persisted read position of each file camera."""
        with self._lock:
            rows = self._db.execute(
                "SELECT camera, source, source_size, pos FROM positions"
            ).fetchall()
        return {r[0]: Position(r[1], r[2], r[3]) for r in rows}

    def last_seq(self, stream: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT last FROM sequences WHERE stream=?", (stream,)
            ).fetchone()
        return row[0] if row else 0

    def line_totals(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Cumulative (in, out) per (camera, line, class) since the device started."""
        with self._lock:
            rows = self._db.execute(
                "SELECT camera, line, class, n_in, n_out FROM line_totals"
            ).fetchall()
        return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}

    def zone_totals(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Cumulative (entries, exits) per (camera, zone, class)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT camera, zone, class, entries, exits FROM zone_totals"
            ).fetchall()
        return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}
