"""Registry pages stay up whatever a device sends: overflow-safe sums, valid JSON, and
the seq-jump bound (`flowfleet.registry.fleet.bounds`). On SQLite, then PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest

from flowfleet import contract as c
from flowfleet.contract import CountBin, Health, LineCount, Topics, ZoneCount
from flowfleet.registry.fleet import series
from flowfleet.registry.fleet.bounds import MAX_SEQ_JUMP, check_seq_jump
from flowfleet.registry.fleet.ingest import DEAD_LETTER, STORED, Ingestor
from flowfleet.registry.http.web import create_app, format_ts
from flowfleet.registry.service import fill_rollups
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import fresh_database

TOPICS = Topics()
T0 = float(int(time.time()) // 60 * 60) - 3600


def strict_json(text: str):
    """json.loads that refuses the NaN / Infinity tokens no other parser reads."""

    def refuse(token: str):
        raise AssertionError(f"response has a bare {token}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def get(client, url: str):
    resp = client.get(url)
    assert resp.status_code == 200, (url, resp.status_code, resp.get_data(as_text=True)[:500])
    return resp.get_data(as_text=True)


@pytest.fixture
def db(db_url):
    return regdb.open_database(fresh_database(db_url))


@pytest.fixture
def client(db):
    return create_app(db).test_client()


def full_bin(seq: int) -> CountBin:
    """A bin with every count at the contract's maximum."""
    start = T0 + 60 * seq
    return CountBin(
        device="cam-1",
        seq=seq,
        start=start,
        end=start + c.MAX_WINDOW_S,
        lines=(LineCount(camera="c", line="l", class_="car", in_=c.MAX_COUNT, out=c.MAX_COUNT),),
        zones=(
            ZoneCount(
                camera="c",
                zone="z",
                class_="car",
                entries=c.MAX_COUNT,
                exits=c.MAX_COUNT,
                peak_occupancy=c.MAX_COUNT,
                dwell_s_sum=c.MAX_DWELL_S_SUM,
                dwell_n=c.MAX_COUNT,
            ),
        ),
    )


def test_bins_at_the_maximum_counts_keep_totals_exact(db, client):
    ingestor = Ingestor(db, TOPICS)
    for seq in (1, 2):
        assert ingestor.handle(TOPICS.counts("cam-1"), full_bin(seq).to_json()) == STORED

    body = strict_json(get(client, "/api/totals"))
    (line,) = body["lines"]
    assert (line["in"], line["out"]) == (2 * c.MAX_COUNT, 2 * c.MAX_COUNT)
    assert isinstance(line["in"], int)
    (zone,) = body["zones"]
    assert (zone["entries"], zone["exits"], zone["dwell_n"]) == (2 * c.MAX_COUNT,) * 3
    assert zone["peak_occupancy"] == c.MAX_COUNT
    assert zone["dwell_s_sum"] == 2 * c.MAX_DWELL_S_SUM
    strict_json(get(client, "/api/devices"))
    get(client, "/")


def _legacy_rows(db, count: int, dwell: float, n: int = 2) -> None:
    """Rows as an older registry stored them, before the contract had bounds."""
    regdb.Device.create(id="old-cam", first_seen=T0, last_seen=T0, state="unknown")
    for seq in range(1, n + 1):
        row = regdb.CountBin.create(
            device="old-cam", seq=seq, start=T0, end=T0 + 60, received_at=T0, payload="{}"
        )
        common = {"bin": row.id, "device": "old-cam", "seq": seq, "start": T0, "camera": "c"}
        regdb.LineTotal.create(**common, line="l", class_="car", count_in=count, count_out=count)
        regdb.ZoneTotal.create(
            **common,
            zone="z",
            class_="car",
            entries=count,
            exits=0,
            peak_occupancy=count,
            dwell_s_sum=dwell,
            dwell_n=1,
        )


def test_totals_past_64_bits_do_not_fail_the_page(db, client, caplog):
    """Two rows of 2**62 each (SQLite's integer SUM would raise "integer overflow"):
    the rollups leave out rows no bin can hold today, and the pages answer."""
    _legacy_rows(db, 2**62, 1.0)
    fill_rollups(db, series.Buckets())

    body = strict_json(get(client, "/api/totals"))
    assert body["lines"] == [] and body["zones"] == []
    assert "rollups leave out a row of old-cam bin 1: values out of bounds" in caplog.text
    get(client, "/")


def test_a_stored_infinity_is_left_out_and_the_rest_kept(db, client):
    """JSON has no Infinity: the zone row with an infinite dwell is left out, its
    line rows count, and the page answers valid JSON."""
    _legacy_rows(db, 1, float("inf"))
    fill_rollups(db, series.Buckets())

    body = strict_json(get(client, "/api/totals"))
    assert body["zones"] == []
    (line,) = body["lines"]
    assert line["in"] == 2
    get(client, "/")


@pytest.mark.parametrize("ts", [1e300, float("nan"), -1e300, None, 0.0])
def test_format_ts_never_raises(ts):
    assert isinstance(format_ts(ts), str)


# -- seq jumps -----------------------------------------------------------------------------


def _store_bins(db, seqs, device="cam-1"):
    ingestor = Ingestor(db, TOPICS)
    for seq in seqs:
        b = CountBin(device=device, seq=seq, start=T0, end=T0 + 60)
        assert ingestor.handle(TOPICS.counts(device), b.to_json()) == STORED


@pytest.mark.parametrize(
    ("stored", "seq", "refused"),
    [
        ((), 1, False),
        ((), MAX_SEQ_JUMP + 1, False),  # a new device (or one moved here) starts anywhere
        ((), c.MAX_SEQ, False),
        ((1, 2, 5), 5 + MAX_SEQ_JUMP, False),
        ((1, 2, 5), 6 + MAX_SEQ_JUMP, True),
        ((1, 2, 5), 3, False),  # a late bin below the top
        ((1,), c.MAX_SEQ, True),
    ],
)
def test_seq_may_not_jump_far_above_the_highest_stored(db, stored, seq, refused):
    _store_bins(db, stored)
    _store_bins(db, (7,), device="cam-2")  # other devices do not count

    reason = check_seq_jump(db, "cam-1", seq)

    if refused:
        assert reason is not None and reason.startswith("field 'seq': ")
        assert str(seq) in reason and "count bin" in reason and "'cam-1'" in reason
        assert "\n" not in reason
    else:
        assert reason is None


def test_seq_jump_of_other_sequences_and_limits(db):
    ingestor = Ingestor(db, TOPICS)
    beat = Health(device="cam-1", seq=10, ts=T0, uptime_s=1.0)
    assert ingestor.handle(TOPICS.health("cam-1"), beat.to_json()) == STORED

    assert check_seq_jump(db, "cam-1", 20, table=regdb.HealthBeat, max_jump=10) is None
    reason = check_seq_jump(db, "cam-1", 21, table=regdb.HealthBeat, max_jump=10)
    assert reason is not None and "health beat seq 10" in reason
    assert check_seq_jump(db, "cam-1", 11, max_jump=10) is None  # no bins stored yet


def test_a_bin_far_above_the_highest_is_dead_lettered_through_ingest(db):
    ingestor = Ingestor(db, TOPICS)
    _store_bins(db, (1, 2))
    jump = CountBin(device="cam-1", seq=3 + MAX_SEQ_JUMP, start=T0, end=T0 + 60)
    assert ingestor.handle(TOPICS.counts("cam-1"), jump.to_json()) == DEAD_LETTER
    (letter,) = regdb.DeadLetter.select()
    assert f"{3 + MAX_SEQ_JUMP} is more than {MAX_SEQ_JUMP} above" in letter.reason


def test_absurd_bins_are_dead_lettered_and_leave_pages_valid(db, client):
    """The issue's examples, through the real ingest path."""
    ingestor = Ingestor(db, TOPICS)
    good = json.loads(full_bin(1).to_json())
    absurd = [
        {**good, "seq": 2, "lines": [{**good["lines"][0], "in": 2**62}]},
        {**good, "seq": 2**63 - 1},
        {**good, "seq": 3, "end": float("inf")},
        {**good, "seq": 4, "zones": [{**good["zones"][0], "dwell_s_sum": float("inf")}]},
        {**good, "seq": 5, "start": float("nan")},
        {**good, "seq": True},
        {**good, "schema": True},
        {**good, "seq": 6, "lines": [{**good["lines"][0], "in": "5"}]},
    ]
    assert ingestor.handle(TOPICS.counts("cam-1"), json.dumps(good).encode()) == STORED
    for body in absurd:
        raw = json.dumps(body).encode()
        assert ingestor.handle(TOPICS.counts("cam-1"), raw) == DEAD_LETTER, body
    assert regdb.CountBin.select().count() == 1

    letters = strict_json(get(client, "/api/dead-letters"))["dead_letters"]
    assert len(letters) == len(absurd)
    assert all(dl["reason"].startswith("field '") for dl in letters), letters
    (line,) = strict_json(get(client, "/api/totals"))["lines"]
    assert line["in"] == c.MAX_COUNT
    (dev,) = strict_json(get(client, "/api/devices"))["devices"]
    assert (dev["bins"], dev["gaps"], dev["dead_letters"]) == (1, 0, len(absurd))
