"""Counts over time: rollups equal the raw bins, the series API and CLI, the backfill.

The property test stores generated bins (three devices, two lines and a zone, windows
across minute, hour and day boundaries, a site timezone with daylight saving time)
in random order, with some delivered twice, through the real ingest path on SQLite
and PostgreSQL, and compares every minute, hour and day bucket with sums computed
from the bins themselves.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import time
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowfleet import speedhist
from flowfleet.cli import main
from flowfleet.contract import CountBin, LineCount, SpeedCount, Topics, ZoneCount
from flowfleet.registry.fleet import series
from flowfleet.registry.fleet.ingest import DUPLICATE, STORED, Ingestor
from flowfleet.registry.http.web import create_app
from flowfleet.registry.service import fill_rollups
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import fresh_database, release

TOPICS = Topics()
TZ = "Europe/Paris"
# 2026-10-25 is the last Sunday of October: Paris falls back an hour (a 25-hour day).
DST_END = 1792886400.0  # 2026-10-25T00:00:00Z


def bin_speeds(counts: list[int]) -> list[float] | None:
    """The ``c`` car speeds of a bin (30 + a .. 40 + a km/h); None (an agent without
    histograms) when ``d`` is even."""
    a, _, c, d = counts
    return [30.0 + a + (i % 11) for i in range(c)] if d % 2 else None


def make_bin(device: str, seq: int, start: float, counts: list[int]) -> CountBin:
    a, b, c, d = counts
    speeds = bin_speeds(counts)
    return CountBin(
        device=device,
        seq=seq,
        start=start,
        end=start + 30,
        lines=(
            LineCount(camera="front", line="door", class_="person", in_=a, out=b),
            LineCount(camera="front", line="gate", class_="car", in_=c, out=0),
        ),
        zones=(
            ZoneCount(
                camera="front",
                zone="queue",
                class_="person",
                entries=d,
                exits=d,
                peak_occupancy=a,
                dwell_s_sum=2.5 * d,
                dwell_n=d,
            ),
        ),
        speeds=(
            SpeedCount(
                camera="front",
                class_="car",
                n=c,
                mean_kmh=30.0 + a if c else None,
                max_kmh=40.0 + a if c else None,
                hist=None if speeds is None else speedhist.histogram(speeds),
            ),
        ),
    )


def expected(bins: list[CountBin], buckets: series.Buckets, step: str) -> dict:
    """(device, line, bucket) -> [in, out], from the bins themselves."""
    out: dict = defaultdict(lambda: [0, 0])
    for b in bins:
        t = buckets.start(step, b.start)
        for r in b.lines:
            row = out[(b.device, r.line, t)]
            row[0] += r.in_
            row[1] += r.out
    return dict(out)


def expected_hists(bins: list[CountBin], buckets: series.Buckets, step: str) -> dict:
    """(device, bucket) -> the sum of the car rows' histograms (absent ones add 0)."""
    out: dict = defaultdict(lambda: (0,) * speedhist.BUCKETS)
    for b in bins:
        key = (b.device, buckets.start(step, b.start))
        out[key] = speedhist.merge([out[key], *(r.hist for r in b.speeds)])
    return dict(out)


def stored_hists(db, step: str) -> dict:
    r = regdb.SpeedRollup
    cols = [getattr(r, c) for c in regdb.SPEED_HIST_COLUMNS]
    rows = r.select(r.device, r.bucket, *cols).where(r.step == regdb.STEPS[step])
    return {(d, t): tuple(h) for d, t, *h in rows.tuples()}


def stored(db, step: str) -> dict:
    r = regdb.LineRollup
    rows = r.select(r.device, r.line, r.bucket, r.count_in, r.count_out).where(
        r.step == regdb.STEPS[step]
    )
    return {(d, ln, t): [i, o] for d, ln, t, i, o in rows.tuples()}


@pytest.fixture
def fresh(db_url):
    def make():
        release()
        return regdb.open_database(fresh_database(db_url))

    return make


bin_strategy = st.tuples(
    st.sampled_from(["cam-1", "cam-2", "cam-3"]),
    # Around a DST change and plain day/hour/minute boundaries.
    st.floats(min_value=DST_END - 3 * 3600, max_value=DST_END + 30 * 3600, allow_nan=False),
    st.lists(st.integers(0, 50), min_size=4, max_size=4),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=st.lists(bin_strategy, min_size=1, max_size=25), seed=st.integers(0, 2**16))
def test_rollups_equal_the_raw_sums_in_any_arrival_order(fresh, specs, seed):
    db = fresh()
    ingestor = Ingestor(db, TOPICS, site_timezone=TZ)
    seqs: dict[str, int] = defaultdict(int)
    bins = []
    for device, start, counts in specs:
        seqs[device] += 1
        bins.append(make_bin(device, seqs[device], round(start, 3), counts))
    arrivals = bins + random.Random(seed).sample(bins, k=len(bins) // 3)  # some twice
    random.Random(seed).shuffle(arrivals)
    now = DST_END + 31 * 3600  # the receive time the bounds check uses
    for b in arrivals:
        outcome, _ = ingestor.replay(TOPICS.counts(b.device), b.to_json(), now)
        assert outcome in (STORED, DUPLICATE)
    buckets = series.Buckets(TZ)
    for step in ("minute", "hour", "day"):
        assert stored(db, step) == expected(bins, buckets, step), step
        assert stored_hists(db, step) == expected_hists(bins, buckets, step), step
    # Rebuilding from the raw bins gives the same rollups.
    series.rebuild(db, buckets)
    for step in ("minute", "hour", "day"):
        assert stored(db, step) == expected(bins, buckets, step), step
        assert stored_hists(db, step) == expected_hists(bins, buckets, step), step


def test_day_buckets_follow_the_site_timezone_across_dst():
    paris = series.Buckets(TZ)
    days = paris.starts("day", DST_END - 86400, DST_END + 2 * 86400)
    lengths = [b - a for a, b in itertools.pairwise(days)]
    assert 25 * 3600 in lengths  # the day the clocks go back
    assert all(paris.start("day", t) == t for t in days)
    utc = series.Buckets("UTC")
    assert utc.start("day", DST_END + 5) == DST_END
    assert utc.start("minute", 125.0) == 120.0 and utc.start("hour", 7199.0) == 3600.0
    with pytest.raises(series.SeriesError, match="unknown timezone"):
        series.Buckets("Mars/Olympus")


# -- the API and the command line --------------------------------------------------------


@pytest.fixture
def loaded(fresh):
    db = fresh()
    ingestor = Ingestor(db, TOPICS)
    base = (int(time.time()) // 3600 - 5) * 3600.0  # five hours ago, on the hour
    for seq in range(1, 7):  # two bins per hour over three hours, for two devices
        for device in ("cam-1", "cam-2"):
            b = make_bin(device, seq, base + (seq - 1) * 1800 + 10, [seq, 1, 2, 1])
            assert ingestor.handle(TOPICS.counts(device), b.to_json()) == STORED
    return db, base


def test_series_api_answers_json_and_csv(loaded):
    db, base = loaded
    client = create_app(db).test_client()
    frm, to = int(base), int(base + 4 * 3600)
    resp = client.get(f"/api/series?step=hour&from={frm}&to={to}&line=door&group=device")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["kind"] == "lines" and body["group"] == ["device"]
    by_device = {s["key"]["device"]: s for s in body["series"]}
    assert set(by_device) == {"cam-1", "cam-2"}
    assert [p["in"] for p in by_device["cam-1"]["points"]] == [1 + 2, 3 + 4, 5 + 6]
    assert by_device["cam-1"]["total"] == {"in": 21, "out": 6}
    assert body["total"] == {"in": 42, "out": 12}

    resp = client.get(f"/api/series?kind=speeds&step=day&from={frm}&to={to}")
    total = resp.get_json()["total"]
    assert total["n"] == 24 and total["max_kmh"] == 46.0
    assert total["mean_kmh"] == pytest.approx(sum(30.0 + s for s in range(1, 7)) * 4 / 24)
    # Percentiles from the bins' histograms added up (every loaded bin carries one).
    every = [v for s in range(1, 7) for v in bin_speeds([s, 1, 2, 1])] * 2
    assert total["hist_n"] == 24
    for q in (50, 85, 95):
        want = speedhist.percentile(speedhist.histogram(every), q, max_kmh=46.0)
        assert total[f"p{q}_kmh"] == round(want, 2), q

    resp = client.get(f"/api/series?kind=zones&step=hour&from={frm}&to={to}&format=csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert len(rows) == 3 and rows[0]["entries"] == "4" and rows[0]["peak_occupancy"] == "2"
    assert rows[0]["bucket_utc"].endswith(":00:00Z")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("step=week", "step"),
        ("kind=cars", "kind"),
        ("from=yesterday", "from"),
        ("from=2000&to=1000", "to"),
        ("group=colour", "group"),
        ("kind=zones&line=door", "line"),
        ("step=minute&from=0&to=4000000000", "from"),
        ("format=xml", "format"),
        ("colour=red", "colour"),
    ],
)
def test_series_api_refuses_bad_parameters_naming_them(loaded, query, field):
    db, _ = loaded
    resp = create_app(db).test_client().get(f"/api/series?{query}")
    assert resp.status_code == 400
    assert resp.get_json()["error"]["field"] == field, resp.get_json()


def test_series_on_the_command_line(loaded, db_url, capsys):
    _, base = loaded
    release()
    url = db_url
    argv = ["registry", "series", "--db", url, "--step", "hour", "--from", str(int(base))]
    assert main([*argv, "--to", str(int(base + 4 * 3600)), "--format", "json"]) == 0
    # Both lines: door (in 1..6, out 1 per bin) and gate (in 2 per bin), two devices.
    assert json.loads(capsys.readouterr().out)["total"] == {"in": 42 + 24, "out": 12}
    assert main([*argv, "--group", "device", "--line", "gate"]) == 0
    out = capsys.readouterr().out
    assert "device cam-1: in 12  out 0" in out and "device cam-2" in out
    assert main(["registry", "rollups", "rebuild", "--db", url, "--timezone", TZ]) == 0
    assert "rollups rebuilt from 12 stored bins (day buckets in Europe/Paris)" in (
        capsys.readouterr().out
    )
    assert main(["registry", "series", "--db", url, "--from", "yesterday"]) == 2
    assert "--from: 'yesterday' is neither epoch seconds nor an ISO 8601 time" in (
        capsys.readouterr().err
    )


def test_the_registry_fills_rollups_for_bins_stored_before_them(loaded):
    db, base = loaded
    buckets = series.Buckets()
    speeds = series.Query(kind="speeds", step="day", start=base - 86400, end=base + 5 * 3600)
    speeds_before = series.query(db, speeds, buckets)["total"]
    for model in regdb.ROLLUP_MODELS:
        model.delete().execute()
    fill_rollups(db, series.Buckets())
    assert series.query(db, speeds, buckets)["total"] == speeds_before
    result = series.query(
        db, series.Query(step="hour", start=base, end=base + 4 * 3600, name="door"), buckets
    )
    assert result["total"] == {"in": 42, "out": 12}


# -- retention ---------------------------------------------------------------------------


def test_retention_removes_old_raw_bins_and_changes_no_total(fresh):
    from flowfleet.registry.fleet.retention import prune
    from flowfleet.registry.http.web import devices, totals

    db = fresh()
    ingestor = Ingestor(db, TOPICS)
    now = time.time()
    bins = [
        make_bin("cam-1", seq, now - (200 - 15 * seq) * 86400.0, [seq, 1, 2, 1])
        for seq in range(1, 11)
    ]
    late = make_bin("cam-1", 12, now - 100 * 86400.0, [5, 5, 5, 5])  # 11 never arrives
    for b in [*bins, late]:
        assert ingestor.handle(TOPICS.counts("cam-1"), b.to_json()) == STORED
    before_totals = totals()
    buckets = series.Buckets()
    span = series.Query(kind="zones", step="day", start=now - 300 * 86400.0, end=now)
    before_series = series.query(db, span, buckets)
    before_dev = devices()[0]
    assert (before_dev["bins"], before_dev["gaps"]) == (11, 1)

    removed = prune(db, keep_days=30)

    # Covered by the ack (1..10), older than 30 days, not the newest stored (12).
    assert removed["bins"] == 10
    assert sorted(b.seq for b in regdb.CountBin.select()) == [12]
    assert totals() == before_totals
    assert series.query(db, span, buckets) == before_series
    dev = devices()[0]
    assert (dev["bins"], dev["gaps"], dev["highest_seq"]) == (11, 1, 12)
    # A bin sent again after its raw record went is a duplicate, not a second count.
    assert ingestor.handle(TOPICS.counts("cam-1"), bins[0].to_json()) == DUPLICATE
    assert totals() == before_totals
    assert prune(db, keep_days=30) == {"bins": 0, "health_beats": 0}
