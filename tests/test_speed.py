"""Speed from a 4-point homography: calibration checks, smoothing, aggregation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flowfleet import speedhist
from flowfleet.agent.speed import (
    INSUFFICIENT,
    GroundPlane,
    HomographyError,
    SpeedAgg,
    SpeedEstimator,
    SpeedSpec,
    homography_spec,
    parse_homography,
)
from flowfleet.agent.tally import Tally
from flowfleet.contract import CountBin, parse_payload

from .factories import dets, walk

# 10 px per metre, no perspective: a 100 x 100 px square is 10 x 10 m.
FLAT = "0,0:0,0;100,0:10,0;100,100:10,10;0,100:0,10"
# A road seen in perspective: a 3.5 m wide, 30 m long lane section whose far end
# (top of the image) looks narrower.
ROAD_IMAGE = [(400, 200), (560, 200), (800, 600), (160, 600)]
ROAD_GROUND = [(0, 30), (3.5, 30), (3.5, 0), (0, 0)]


def test_parse_homography_maps_points():
    plane = GroundPlane(parse_homography(FLAT))
    got = plane.to_ground(np.array([[50, 50], [100, 0]]))
    assert np.allclose(got, [[5, 5], [10, 0]])
    road = GroundPlane(homography_spec(ROAD_IMAGE, ROAD_GROUND))
    assert np.allclose(road.to_ground(np.array(ROAD_IMAGE, float)), ROAD_GROUND, atol=1e-5)
    # Above the horizon (beyond the vanishing point) is not on the ground.
    assert np.isnan(road.to_ground(np.array([[480.0, 0.0]]))).all()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0,0:0,0;100,0:10,0;200,0:20,0;0,100:0,10", "image points 1, 2, 3 are collinear"),
        ("0,0:0,0;100,0:10,0;100,100:10,0.001;0,100:0,10", "ground points 1, 2, 3 are collinear"),
        ("0,0:0,0;100,0:10,0;100,100:10,10", "exactly 4 points"),
        ("0,0:0,0;0,0:10,0;100,100:10,10;0,100:0,10", "image points 1 and 2 are the same"),
        ("0,0:0,0;100,0:10,0;100,100:0,10;0,100:10,10", "not in the same order"),
        ("0,0:0,0;100,0:10,0;100,100:10,10;0,100", "point 4"),
        ("a,b:0,0;100,0:10,0;100,100:10,10;0,100:0,10", "point 1"),
    ],
)
def test_bad_homography_names_the_problem(text, problem):
    with pytest.raises(HomographyError, match=problem):
        parse_homography(text)


def track_frames(points_px, fps=10.0, track_id=1, cls="car"):
    return [(i / fps, d) for i, d in enumerate(walk(points_px, track_id, cls))]


def run(estimator, frames, end_ts=None):
    events = []
    for ts, d in frames:
        events += estimator.update(d, ts)
    return events + estimator.flush(end_ts or frames[-1][0])


def test_constant_speed_in_perspective():
    """A car driving up the lane at 20 m/s (72 km/h) measures 72 km/h everywhere,
    although it moves fewer pixels per frame far away than near."""
    spec = SpeedSpec(homography=homography_spec(ROAD_IMAGE, ROAD_GROUND), window_s=0.5)
    est = SpeedEstimator(spec)
    plane = est.plane
    inv = np.linalg.inv(plane.matrix)
    path = []
    for i in range(15):  # 1.5 s at 10 fps, from 0 m to 28 m along the lane centre
        g = np.array([1.75, 20.0 * i / 10, 1.0])
        p = inv @ g
        path.append((p[0] / p[2], p[1] / p[2]))
    px_steps = np.diff(np.array(path)[:, 1])
    assert abs(px_steps[0]) > 2 * abs(px_steps[-1])  # perspective: far steps are shorter
    (ev,) = run(est, track_frames(path))
    assert ev.kmh == pytest.approx(72.0, abs=0.5)
    assert ev.samples == 15 - 4  # a full 0.4 s (>= 80 % of the window) from frame 4 on
    assert ev.status == "ok"


def test_too_short_track_is_insufficient_not_zero():
    est = SpeedEstimator(SpeedSpec(homography=parse_homography(FLAT), window_s=1.0))
    (ev,) = run(est, track_frames([(10, 50), (20, 50), (30, 50), (40, 50)]))
    assert ev.kmh is None and ev.samples == 0 and ev.status == INSUFFICIENT
    agg = SpeedAgg()
    agg.add(ev)
    assert agg.to_dict() == {
        "n": 0,
        "mean_kmh": None,
        "p85_kmh": None,
        "max_kmh": None,
        "insufficient": 1,
    }


def test_jitter_is_smoothed_and_glitches_dropped():
    # 1 m per frame at 10 fps (36 km/h) with +-3 px (0.3 m) of box jitter.
    rng = np.random.default_rng(1)
    path = [(10 * i + rng.uniform(-3, 3), 50 + rng.uniform(-3, 3)) for i in range(30)]
    path[15] = (path[15][0] + 400, path[15][1])  # one wild box: a 40 m jump
    spec = SpeedSpec(homography=parse_homography(FLAT), window_s=1.0, max_kmh=100)
    (ev,) = run(SpeedEstimator(spec), track_frames(path))
    assert ev.kmh == pytest.approx(36.0, abs=2.0)


def test_track_ends_when_unseen_and_per_class():
    est = SpeedEstimator(
        SpeedSpec(homography=parse_homography(FLAT), window_s=0.5), forget_after_s=0.5
    )
    events = []
    for i in range(10):  # two objects: a car at 36 km/h and a person at 3.6 km/h
        d = dets([[0, 0, 10, 10 * i], [0, 0, 10, 10 + i]], ids=[1, 2], classes=["car", "person"])
        events += est.update(d, i / 10)
    assert events == []
    for i in range(10, 20):
        events += est.update(dets([]), i / 10)
    assert sorted((e.class_name, e.kmh) for e in events) == [
        ("car", pytest.approx(36.0)),
        ("person", pytest.approx(3.6)),
    ]


def test_line_crossing_speed_and_contract_rows():
    """Through the pipeline's path: tally rows validate against the wire contract."""
    from flowfleet.agent.counting import LineCounter

    est = SpeedEstimator(SpeedSpec(homography=parse_homography(FLAT), window_s=0.5))
    line = LineCounter("gate", (0, 100), (400, 100))
    tally = Tally()
    for ts, d in track_frames([(50, 10 * i) for i in range(20)]):  # 1 m / 0.1 s down
        for ev in est.update(d, ts):
            tally.add_speed("cam", ev)
        for c in line.update(d, ts):
            tally.add_crossing("cam", c)
            tally.add_speed("cam", est.crossing(c.track_id, c.class_name, c.line, ts))
    for ev in est.flush(2.0):
        tally.add_speed("cam", ev)
    rows = tally.speed_counts()
    assert [(r.line, r.class_, r.n, r.mean_kmh) for r in rows] == [
        (None, "car", 1, pytest.approx(36.0)),
        ("gate", "car", 1, pytest.approx(36.0)),
    ]
    # Each row's histogram holds its one track, in the bucket of 36 km/h ([35, 40)).
    assert all(r.hist == speedhist.histogram([r.mean_kmh]) for r in rows)
    assert speedhist.EDGES_KMH[rows[0].hist.index(1)] == 35.0
    payload = CountBin(
        device="d", seq=1, start=0, end=60, lines=tally.line_counts(), speeds=rows
    ).to_json()
    back = parse_payload("counts", payload, device="d")
    assert back.speeds == rows
    assert b'"line"' in payload and payload.count(b'"line":') == 2  # 1 line row + 1 speed row
    # No speed measured: the bin carries no `speeds` key at all (schema 1 as before).
    assert Tally().speed_counts() is None
    assert b"speeds" not in CountBin(device="d", seq=2, start=0, end=1).to_json()


def test_speed_rows_are_unique_per_key():
    from flowfleet.contract import ContractError, SpeedCount

    row = SpeedCount(camera="c", class_="car", n=1, mean_kmh=10, p85_kmh=10)
    bad = CountBin(device="d", seq=1, start=0, end=1, speeds=(row,)).to_json()
    bad = bad.replace(
        b'"speeds":[',
        b'"speeds":['
        + json.dumps(row.model_dump(by_alias=True, exclude_none=True)).encode()
        + b",",
    )
    with pytest.raises(ContractError, match="more than once"):
        parse_payload("counts", bad)


def flowfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowfleet.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_count_cli_reports_speeds(videos):
    # A rough calibration of the highway clip: 800 px along the road ~ 15.1 m (from a
    # car's length), the lane ~ 3.7 m between the dashed lines at y=375 and y=425.
    result = flowfleet(
        "count",
        str(videos / "traffic_frames.mp4"),
        "--line",
        "gantry:480,280,480,540",
        "--homography",
        "100,375:0,3.7;900,375:15.1,3.7;900,425:15.1,0;100,425:0,0",
        "--speed-window",
        "0.3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    speed = json.loads(result.stdout)["speed"]
    assert speed["window_s"] == 0.3
    tracks = speed["tracks"]["total"]
    assert tracks["n"] >= 1 and 30 < tracks["mean_kmh"] < 150
    gantry = speed["lines"]["gantry"]["total"]
    assert gantry["n"] + gantry["insufficient"] >= 2  # every crossing is accounted for


def test_count_cli_rejects_collinear_homography(videos):
    result = flowfleet(
        "count",
        str(videos / "traffic_frames.mp4"),
        "--homography",
        "0,0:0,0;100,100:10,0;200,200:20,0;0,100:0,10",
    )
    assert result.returncode == 2
    assert "--homography" in result.stderr and "collinear" in result.stderr
    assert "Traceback" not in result.stderr
