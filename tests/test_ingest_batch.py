"""Batched ingest stores exactly what one-message-at-a-time ingest stores.

The same generated stream (bins in random order, redeliveries, conflicting copies,
seq jumps, declared gaps, malformed payloads, health beats, status changes) goes
through `Ingestor.handle` one message at a time into one database and through
`Ingestor.handle_batch` in random batch sizes into another; every outcome and every
table that ingest writes must come out the same, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import random

import pytest

from flowfleet.contract import Topics
from flowfleet.registry.fleet import counters
from flowfleet.registry.fleet.ingest import DEFERRED, ERROR, Ingestor
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import KINDS, temporary_database
from tests.factories import valid_payload

TOPICS = Topics()


def _bin(device: str, seq: int, now: float, rng: random.Random) -> dict:
    body = valid_payload("counts", device, seq, now=now)
    body["start"] = now - 86400 - 3600 + 60 * seq  # across hour (and some day) buckets
    body["end"] = body["start"] + 60
    body["lines"][0]["in"] = rng.randint(0, 9)
    body["zones"][0]["peak_occupancy"] = rng.randint(0, 5)
    body["speeds"][0]["max_kmh"] = float(rng.randint(30, 90))
    return body


def _stream(seed: int, now: float) -> list[tuple[str, bytes, float]]:
    """A shuffled stream of ~300 messages from four devices, with every kind of trouble."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for d in range(4):
        device = f"cam-{d}"
        seqs = list(range(1, 41))
        dropped = set(range(10, 13)) if d == 1 else set()  # declared dropped, never sent
        for seq in seqs:
            if seq in dropped:
                continue
            body = _bin(device, seq, now, rng)
            out.append((TOPICS.device(device, "counts"), json.dumps(body).encode()))
            if rng.random() < 0.15:  # a redelivery
                out.append((TOPICS.device(device, "counts"), json.dumps(body).encode()))
            if rng.random() < 0.05:  # same seq, other content: a conflict
                body = dict(body, lines=[dict(body["lines"][0], out=99)])
                out.append((TOPICS.device(device, "counts"), json.dumps(body).encode()))
        if d == 1:
            event = valid_payload("events", device, 1, now=now)
            event.update(
                type="outbox_dropped",
                data={"stream": "counts", "first_seq": 10, "last_seq": 12, "n": 3},
            )
            out.append((TOPICS.device(device, "events"), json.dumps(event).encode()))
        if d == 2:  # a seq far above the device's highest
            out.append(
                (TOPICS.device(device, "counts"), json.dumps(_bin(device, 5_000_000, now, rng)))
            )
        for seq in range(1, 6):
            beat = valid_payload("health", device, seq, now=now)
            out.append((TOPICS.device(device, "health"), json.dumps(beat).encode()))
        out.append((TOPICS.device(device, "counts"), b'{"schema": 1, "kind": "counts"'))
        out.append((TOPICS.device(device, "counts"), b"not json"))
    rng.shuffle(out)
    status = valid_payload("status", "cam-3", now=now)
    out.append((TOPICS.device("cam-3", "status"), json.dumps(status).encode()))
    return [(t, p if isinstance(p, bytes) else p.encode(), now) for t, p in out]


def _snapshot() -> dict[str, list]:
    """Everything ingest writes, as sorted plain rows (ids left out)."""

    def rows(model, *fields):
        cols = [getattr(model, f) for f in fields]
        return sorted(tuple(r) for r in model.select(*cols).tuples())

    line_keys = ("device", "camera", "line", "class_", "step", "bucket")
    zone_keys = ("device", "camera", "zone", "class_", "step", "bucket")
    return {
        "bins": rows(regdb.CountBin, "device", "seq", "payload"),
        "lines": rows(regdb.LineTotal, "device", "seq", "camera", "line", "class_", "count_in"),
        "zones": rows(regdb.ZoneTotal, "device", "seq", "zone", "entries", "peak_occupancy"),
        "line_rollup": rows(regdb.LineRollup, *line_keys, "bins", "count_in", "count_out"),
        "zone_rollup": rows(
            regdb.ZoneRollup, *zone_keys, "bins", "entries", "peak_occupancy", "dwell_n"
        ),
        "speed_rollup": rows(regdb.SpeedRollup, *line_keys, "bins", "n", "kmh_sum", "kmh_max"),
        "devices": rows(regdb.Device, "id", "counts_acked", "counts_max", "state"),
        "dead": rows(regdb.DeadLetter, "topic", "reason", "kind", "seq"),
        "beats": rows(regdb.HealthBeat, "device", "seq"),
        "events": rows(regdb.Event, "device", "seq", "type"),
        "gaps": rows(regdb.CountGap, "device", "first", "last"),
        "counters": sorted(
            (d, *(getattr(c, k) for k in COUNTER_FIELDS)) for d, c in counters.read().items()
        ),
    }


COUNTER_FIELDS = (
    "bins",
    "bin_seq_max",
    "last_bin_at",
    "beats",
    "beat_seq_max",
    "last_beat_at",
    "dead_letters",
)


def _counters_equal_the_raw_tables() -> None:
    """The counters ingest kept equal what /api/devices used to count per request."""
    kept = {d: {k: getattr(c, k) for k in COUNTER_FIELDS} for d, c in counters.read().items()}
    assert kept == counters.computed()


def _run(url: str, stream, batches: list[int] | None) -> tuple[list[str], dict, dict]:
    ingestor = Ingestor(regdb.open_database(url), TOPICS)
    if batches is None:
        outcomes = [ingestor.handle(*item) for item in stream]
    else:
        outcomes, i = [], 0
        for size in batches:
            outcomes += ingestor.handle_batch(stream[i : i + size])
            i += size
    _counters_equal_the_raw_tables()
    return outcomes, _snapshot(), ingestor.take_acks()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_store_what_single_messages_store(kind, seed, tmp_path, caplog):
    import time

    now = float(int(time.time()))
    stream = _stream(seed, now)
    rng = random.Random(seed)
    sizes, left = [], len(stream)
    while left:
        sizes.append(min(left, rng.choice([1, 2, 7, 50, 120, 500])))
        left -= sizes[-1]
    (tmp_path / "one").mkdir()
    (tmp_path / "batch").mkdir()
    with temporary_database(kind, tmp_path / "one") as one_url:
        single, one, _ = _run(one_url, stream, None)
    with temporary_database(kind, tmp_path / "batch") as batch_url:
        batched, many, acks = _run(batch_url, stream, sizes)
    assert DEFERRED not in single and ERROR not in single
    assert "one by one" not in caplog.text  # the batch path itself, not its fallback
    assert batched == single
    for table in one:
        assert many[table] == one[table], table
    # The acks to publish are the devices' committed state.
    assert {d: (a, m) for d, a, m, _ in many["devices"] if d in acks} == acks
    # The stream exercised what it was written for.
    assert {"stored", "duplicate", "dead-letter"} <= set(single)
    acked = {d: a for d, a, _, _ in one["devices"]}
    assert acked["cam-1"] == 40  # passed over the declared gap 10..12
    assert acked["cam-0"] == 40
