"""The agent's durable outbox: every message is stored before it is sent.

One SQLite file (WAL) holds:
- ``outbox``: messages not yet acknowledged by the broker, oldest first;
- ``sequences``: the last sequence number used per stream (counts, health), so a
  restarted agent continues the sequence and never reuses a number;
- ``totals``: the device's cumulative counts per camera / line / class, updated in
  the same transaction that enqueues the bin, so the persisted totals always equal
  the sum of every bin ever enqueued (the registry's totals converge to them).

A message leaves the outbox only when the broker acknowledged it (PUBACK).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
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
"""


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
                raise
            return seq

    def enqueue_bin(self, topic: str, build: Callable[[int], CountBin]) -> CountBin:
        """Store a count bin and add it to the cumulative totals in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq("counts")
                count_bin = build(seq)
                self._insert("counts", seq, topic, count_bin.to_json())
                self._add_totals(count_bin.lines, count_bin.zones)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return count_bin

    def _insert(self, stream: str, seq: int, topic: str, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO outbox(stream, seq, topic, payload, created) VALUES(?,?,?,?,?)",
            (stream, seq, topic, payload, time.time()),
        )

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

    def pending(self, limit: int, exclude: set[int] | frozenset = frozenset()) -> list[tuple]:
        """Oldest unacknowledged messages as (id, topic, payload), skipping ``exclude``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        return [r for r in rows if r[0] not in exclude][:limit]

    def delete(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

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
