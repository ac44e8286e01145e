"""Speed histograms: the contract's buckets and checks, the agent filling them,
percentiles read from them, and their rollup columns (migration 11) on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib

import numpy as np
import peewee as pw
import pytest

from flowfleet import speedhist
from flowfleet.agent.speed import SpeedAgg, SpeedEvent
from flowfleet.agent.tally import Tally
from flowfleet.contract import MAX_SPEED_KMH, ContractError, CountBin, SpeedCount, parse_payload
from flowfleet.registry.fleet import series
from flowfleet.registry.fleet.ingest import STORED, Ingestor
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store import migrations
from flowfleet.registry.testing import KINDS, release, temporary_database

B = speedhist.BUCKETS


@pytest.fixture(autouse=True)
def _unbind():
    yield
    release()


def one_hot(i: int, count: int = 1) -> list[int]:
    h = [0] * B
    h[i] = count
    return h


def width(i: int) -> float:
    """Bucket i's width (the open last bucket: up to 200 km/h, the fastest generated)."""
    return (speedhist.EDGES_KMH[i + 1] if i + 1 < B else 200.0) - speedhist.EDGES_KMH[i]


# -- the buckets ---------------------------------------------------------------------


def test_edges_rise_from_zero_and_stay_within_the_contract():
    edges = speedhist.EDGES_KMH
    assert edges[0] == 0.0 and edges[-1] < MAX_SPEED_KMH
    assert all(b > a for a, b in itertools.pairwise(edges))
    assert B == 49
    # Pedestrians get half a km/h, and common speed limits are edges.
    assert {3.0, 3.5, 5.0, 5.5, 7.5, 8.0} <= set(edges)
    assert {20.0, 30.0, 50.0, 70.0, 80.0, 100.0, 120.0, 130.0} <= set(edges)


@pytest.mark.parametrize(
    ("kmh", "bucket"),
    [
        (0.0, 0),
        (0.49, 0),
        (0.5, 1),
        (5.2, 10),
        (9.99, 19),
        (10.0, 20),
        (29.99, 29),
        (30.0, 30),
        (49.99, 33),
        (50.0, 34),
        (159.9, 47),
        (160.0, 48),
        (MAX_SPEED_KMH, 48),
    ],
)
def test_bucket_of(kmh, bucket):
    assert speedhist.bucket_of(kmh) == bucket
    assert speedhist.histogram([kmh]) == tuple(one_hot(bucket))


# -- the contract --------------------------------------------------------------------


def counts_payload(row: dict) -> bytes:
    base = {"camera": "front", "class": "car", "n": 3}
    body = {"schema": 1, "kind": "counts", "device": "cam-1", "seq": 1, "start": 0, "end": 60}
    return json.dumps({**body, "speeds": [{**base, **row}]}).encode()


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"hist": [0] * (B - 1)}, ["'speeds.0.hist'", f"has {B - 1} buckets", f"has {B}"]),
        ({"hist": [0] * (B + 1)}, ["'speeds.0.hist'", f"at most {B}"]),
        ({"hist": []}, ["'speeds.0.hist'", "has 0 buckets"]),
        ({"hist": [-1, *one_hot(4, 4)[1:]]}, ["'speeds.0.hist.0'", "greater than or equal"]),
        ({"hist": one_hot(4, 2)}, ["'speeds.0.hist'", "counts 2 tracks but n is 3"]),
        ({"hist": one_hot(4, 4)}, ["'speeds.0.hist'", "counts 4 tracks but n is 3"]),
        ({"n": 0, "hist": one_hot(0)}, ["'speeds.0.hist'", "n is 0"]),
        ({"hist": one_hot(4, 2_000_000)}, ["'speeds.0.hist.4'", "1000000"]),
        ({"hist": [True, *one_hot(4, 2)[1:]]}, ["'speeds.0.hist.0'", "integer"]),
        ({"hist": [1.0, *one_hot(4, 2)[1:]]}, ["'speeds.0.hist.0'", "integer"]),
        ({"hist": ["1", *one_hot(4, 2)[1:]]}, ["'speeds.0.hist.0'", "integer"]),
        ({"hist": {"4": 3}}, ["'speeds.0.hist'", "array"]),
    ],
    ids=[
        "short",
        "long",
        "empty",
        "negative",
        "sum-below-n",
        "sum-above-n",
        "n-zero",
        "count-over-max",
        "bool",
        "float",
        "string",
        "object",
    ],
)
def test_the_contract_refuses_a_bad_histogram_naming_the_field(row, words):
    with pytest.raises(ContractError) as info:
        parse_payload("counts", counts_payload(row), device="cam-1")
    reason = str(info.value)
    for w in words:
        assert w in reason, reason


@pytest.mark.parametrize(
    "row",
    [
        {},  # agents before histograms: still valid
        {"hist": None},
        {"hist": one_hot(10, 3)},
        {"hist": [1, 1, *one_hot(48)[2:]]},
        {"n": 0, "hist": [0] * B},
    ],
    ids=["absent", "null", "one-bucket", "spread", "empty"],
)
def test_the_contract_accepts_a_histogram_of_n_tracks_or_none(row):
    bin_ = parse_payload("counts", counts_payload(row), device="cam-1")
    assert bin_.speeds[0].hist == (None if row.get("hist") is None else tuple(row["hist"]))
    # Built in Python, the same checks apply; and it goes back on the wire as it came.
    again = CountBin.model_validate_json(bin_.to_json())
    assert again == bin_
    assert (b'"hist"' in bin_.to_json()) == (row.get("hist") is not None)
    with pytest.raises(ValueError, match="hist"):
        SpeedCount(camera="c", class_="car", n=5, hist=one_hot(3, 4))


# -- the agent -----------------------------------------------------------------------


def test_the_agent_fills_the_histogram_from_its_per_track_speeds():
    rng = np.random.default_rng(7)
    tally = Tally()
    walkers = np.round(rng.normal(5.0, 1.2, 300).clip(0.3, 12), 2)
    cars = np.round(rng.normal(48.0, 12.0, 200).clip(5, 180), 2)
    for i, kmh in enumerate(walkers):
        tally.add_speed("front", SpeedEvent("person", i, float(i), float(kmh), 12))
    for i, kmh in enumerate(cars):
        tally.add_speed("front", SpeedEvent("car", 1000 + i, float(i), float(kmh), 12, line="g"))
    tally.add_speed("front", SpeedEvent("car", 5000, 1.0, None, 2, line="g"))  # too short
    tally.add_speed("front", SpeedEvent("bicycle", 5001, 1.0, None, 2))  # only too short
    rows = {(r.line, r.class_): r for r in tally.speed_counts()}

    for key, speeds in (((None, "person"), walkers), (("g", "car"), cars)):
        row = rows[key]
        assert sum(row.hist) == row.n == len(speeds)
        edges = [*speedhist.EDGES_KMH, MAX_SPEED_KMH + 1]
        assert list(row.hist) == np.histogram(speeds, bins=edges)[0].tolist()
        # The row's max lies in the highest non-empty bucket.
        top = max(i for i, c in enumerate(row.hist) if c)
        assert speedhist.bucket_of(row.max_kmh) == top
    assert rows[("g", "car")].insufficient == 1
    assert rows[(None, "bicycle")].n == 0 and rows[(None, "bicycle")].hist is None
    # On the wire and back.
    payload = CountBin(device="d", seq=1, start=0, end=60, speeds=tally.speed_counts()).to_json()
    assert parse_payload("counts", payload, device="d").speeds == tally.speed_counts()
    # Merging aggregates (the agent's totals over classes) merges the histograms.
    total = SpeedAgg()
    for (_, _, cls), agg in tally.speeds.items():
        if cls in ("person", "car"):
            total.merge(agg)
    assert total.hist == speedhist.merge([rows[(None, "person")].hist, rows[("g", "car")].hist])


# -- percentiles from a histogram ----------------------------------------------------

DISTRIBUTIONS = {
    "pedestrians": lambda r, n: r.normal(5.0, 1.0, n),
    "runners-and-walkers": lambda r, n: np.concatenate(
        [r.normal(4.5, 0.8, n), r.normal(11, 1.5, n // 4)]
    ),
    "cyclists": lambda r, n: r.normal(18.0, 4.0, n),
    "urban": lambda r, n: r.normal(45.0, 9.0, n),
    "motorway": lambda r, n: r.normal(118.0, 16.0, n),
    "everything": lambda r, n: r.uniform(0.0, 200.0, n),
    "one-speed": lambda r, n: np.full(n, 52.3),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("n", [200, 5000])
def test_percentiles_from_the_histogram_are_within_one_bucket_of_numpy(name, n):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{n}".encode()))
    speeds = np.round(DISTRIBUTIONS[name](rng, n).clip(0.1, 200.0), 2)
    hist = speedhist.histogram(speeds.tolist())
    assert sum(hist) == len(speeds)
    for q in (5, 50, 85, 95, 100):
        exact = float(np.percentile(speeds, q))
        got = speedhist.percentile(hist, q, max_kmh=float(speeds.max()))
        # The histogram knows each track only to its bucket: allow the wider of the
        # buckets holding the estimate and the exact value.
        tol = max(width(speedhist.bucket_of(exact)), width(speedhist.bucket_of(got)))
        assert abs(got - exact) <= tol + 1e-9, (q, got, exact, tol)


def test_percentile_edge_cases():
    assert speedhist.percentile([0] * B, 85) is None
    h = one_hot(10, 4)  # four walkers in [5, 5.5)
    assert speedhist.percentile(h, 50) == pytest.approx(5.25)
    assert speedhist.percentile(h, 100, max_kmh=5.3) == pytest.approx(5.3)  # the max closes it
    top = one_hot(48, 2)  # the open bucket: its lower edge without a max, else up to it
    assert speedhist.percentile(top, 95) == 160.0
    assert speedhist.percentile(top, 100, max_kmh=190.0) == pytest.approx(190.0)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        speedhist.percentile(h, 101)
    with pytest.raises(ValueError, match="49 buckets"):
        speedhist.merge([[1, 2]])


def test_merged_histograms_are_the_histogram_of_all_the_speeds():
    rng = np.random.default_rng(3)
    parts = [np.round(rng.uniform(0, 190, k), 2).tolist() for k in (0, 1, 17, 300)]
    merged = speedhist.merge([speedhist.histogram(p) for p in parts] + [None])
    assert merged == speedhist.histogram([v for p in parts for v in p])


# -- the registry: migration 11, rollups, series ------------------------------------

T0 = (int(time.time()) // 86400 - 2) * 86400.0  # two days ago, midnight UTC


def speed_bin(seq: int, start: float, speeds: list[float] | None, n_old: int = 0) -> CountBin:
    """A bin with one speed row; ``speeds`` None: an old agent's row of ``n_old``
    tracks without a histogram."""
    if speeds is None:
        row = SpeedCount(camera="front", class_="car", n=n_old, mean_kmh=50.0, max_kmh=60.0)
    else:
        row = SpeedCount(
            camera="front",
            class_="car",
            n=len(speeds),
            mean_kmh=round(float(np.mean(speeds)), 2),
            max_kmh=max(speeds),
            hist=speedhist.histogram(speeds),
        )
    return CountBin(device="cam-1", seq=seq, start=start, end=start + 60, speeds=(row,))


def speed_hists(step: str) -> dict[float, tuple[int, ...]]:
    r = regdb.SpeedRollup
    cols = [getattr(r, c) for c in regdb.SPEED_HIST_COLUMNS]
    rows = r.select(r.bucket, *cols).where(r.step == regdb.STEPS[step]).tuples()
    return {t: tuple(h) for t, *h in rows}


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_9_database_gets_histogram_columns_and_keeps_its_buckets(tmp_path, kind):
    with temporary_database(kind, tmp_path) as url:
        db = regdb.open_database(url)
        ingestor = Ingestor(db, series_topics())
        now = T0 + 86400
        with db.connection_context():
            old = speed_bin(1, T0 + 60, None, n_old=4)
            assert ingestor.replay(series_topics().counts("cam-1"), old.to_json(), now)[0] == STORED
            # Back to the schema before migration 11: no histogram columns.
            if kind == "sqlite":  # its drop_column rebuilds the table: no cascade
                db.execute_sql("PRAGMA foreign_keys=0")
            from playhouse.migrate import SchemaMigrator
            from playhouse.migrate import migrate as apply_ops

            m = SchemaMigrator.from_database(db)
            apply_ops(*(m.drop_column("speed_rollup", c) for c in regdb.SPEED_HIST_COLUMNS))
            migrations.SchemaVersion.delete().where(
                migrations.SchemaVersion.version >= 11
            ).execute()
            assert "hist_00" not in {c.name for c in db.get_columns("speed_rollup")}
        release()

        db = regdb.open_database(url)
        with db.connection_context():
            assert migrations.current_version(db) == migrations.LATEST
            cols = {c.name: c for c in db.get_columns("speed_rollup")}
            assert all(cols[c].null for c in regdb.SPEED_HIST_COLUMNS), "nullable"
            assert speed_hists("minute") == {T0 + 60: (0,) * B}, "existing bucket reads 0"
            assert regdb.SpeedRollup.get().n == 4, "data kept"
            ingestor = Ingestor(db, series_topics())
            new = speed_bin(2, T0 + 70, [5.2, 5.4, 48.0])
            assert ingestor.replay(series_topics().counts("cam-1"), new.to_json(), now)[0] == STORED
            assert speed_hists("minute") == {T0 + 60: new.speeds[0].hist}
            total = series.query(
                db,
                series.Query(kind="speeds", step="minute", start=T0, end=T0 + 120),
                series.Buckets(),
            )["total"]
            # n counts the old agent's tracks too; the percentiles only the three measured.
            assert (total["n"], total["hist_n"]) == (7, 3)
            # Rank 1.5 of 3 falls 1.5/2 into [5, 5.5), which holds two: 5 + 0.75 * 0.5.
            assert total["p50_kmh"] == 5.38
        release()


def series_topics():
    from flowfleet.contract import Topics

    return Topics()


@pytest.mark.parametrize("kind", KINDS)
def test_speed_series_report_percentiles_that_combine_across_bins(tmp_path, kind, capsys):
    rng = np.random.default_rng(11)
    with temporary_database(kind, tmp_path) as url:
        db = regdb.open_database(url)
        ingestor = Ingestor(db, series_topics())
        per_hour: dict[int, list[float]] = {0: [], 1: []}
        bins = []
        for seq in range(1, 9):  # four bins an hour over two hours
            hour = (seq - 1) // 4
            speeds = np.round(rng.normal(40 + 30 * hour, 8, 50).clip(1, 190), 2).tolist()
            per_hour[hour] += speeds
            bins.append(speed_bin(seq, T0 + hour * 3600 + (seq % 4) * 600, speeds))
        bins.append(speed_bin(9, T0 + 7200 + 5, None, n_old=6))  # third hour: no histogram
        for b in bins:
            assert (
                ingestor.replay(series_topics().counts("cam-1"), b.to_json(), T0 + 86400)[0]
                == STORED
            )
        from flowfleet.registry.http.web import create_app

        client = create_app(db).test_client()
        resp = client.get(f"/api/series?kind=speeds&step=hour&from={T0:.0f}&to={T0 + 3 * 3600:.0f}")
        assert resp.status_code == 200, resp.get_json()
        body = resp.get_json()
        points = body["series"][0]["points"]
        assert [p["hist_n"] for p in points] == [200, 200, 0]
        every = per_hour[0] + per_hour[1]
        for p, speeds in (
            (points[0], per_hour[0]),
            (points[1], per_hour[1]),
            (body["total"], every),
        ):
            for q in (50, 85, 95):
                exact = float(np.percentile(speeds, q))
                tol = max(
                    width(speedhist.bucket_of(exact)), width(speedhist.bucket_of(p[f"p{q}_kmh"]))
                )
                assert abs(p[f"p{q}_kmh"] - exact) <= tol, (q, p, exact)
        # The total's percentiles are the merged histogram's, not a mix of the points'.
        merged = speedhist.histogram(every)
        assert body["total"]["p85_kmh"] == round(speedhist.percentile(merged, 85, max(every)), 2)
        assert points[2]["n"] == 6 and points[2]["p85_kmh"] is None  # no histogram data
        assert "_hist" not in points[0]

        resp = client.get(
            f"/api/series?kind=speeds&step=hour&from={T0:.0f}&to={T0 + 3 * 3600:.0f}&format=csv"
        )
        lines = resp.get_data(as_text=True).splitlines()
        header = lines[0].split(",")
        assert {"p50_kmh", "p85_kmh", "p95_kmh", "hist_n"} <= set(header)
        assert "_hist" not in header
        row = dict(zip(header, lines[1].split(","), strict=True))
        assert float(row["p85_kmh"]) == points[0]["p85_kmh"]
        assert dict(zip(header, lines[3].split(","), strict=True))["p85_kmh"] == ""

        # Rebuilding from the raw payloads gives the same histograms.
        before = speed_hists("hour")
        series.rebuild(db, series.Buckets())
        assert speed_hists("hour") == before
        assert before[T0] == speedhist.histogram(per_hour[0])

        # The command line answers the same.
        release()
        from flowfleet.cli import main

        argv = ["registry", "series", "--db", url, "--kind", "speeds", "--step", "hour"]
        argv += ["--from", f"{T0:.0f}", "--to", f"{T0 + 3 * 3600:.0f}", "--format", "json"]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["total"] == body["total"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_insert_without_the_histogram_columns_stores_zeros(tmp_path, kind):
    """A writer that knows only the older columns stores 0s (the database default),
    not NULLs, so later bins' histograms still add up."""
    with temporary_database(kind, tmp_path) as url:
        db = regdb.open_database(url)
        with db.connection_context():
            regdb.Device.create(id="cam-1", first_seen=1.0)
            r = regdb.SpeedRollup
            fields = [r.device, r.camera, r.class_, r.step, r.bucket, r.line]
            fields += [r.bins, r.n, r.kmh_sum, r.insufficient]
            values = ["cam-1", "front", "car", "m", T0, "", 1, 2, 80.0, 0]
            r.insert_from(pw.Select(columns=[pw.Value(v) for v in values]), fields).execute()
            assert speed_hists("minute") == {T0: (0,) * B}
