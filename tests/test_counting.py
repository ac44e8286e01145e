"""Line and zone counters on scripted tracks (no detector involved)."""

from __future__ import annotations

import numpy as np
import pytest

from flowfleet.agent.counting import LineCounter, ZoneCounter, points_in_polygon
from flowfleet.agent.detections import Detections
from flowfleet.agent.tracker import ByteTracker, TrackerConfig

from .factories import NAMES, box_at, dets, walk


def run_line(frames: list[Detections], line: LineCounter | None = None):
    # A horizontal line drawn left to right at y=100: moving down the image is "in".
    line = line or LineCounter("door", (0, 100), (400, 100), hysteresis=8)
    events = []
    for i, d in enumerate(frames):
        events += line.update(d, ts=i / 10)
    return [(e.direction, e.track_id, e.class_name) for e in events]


def ys(*values: float, x: float = 200) -> list[tuple[float, float]]:
    return [(x, y) for y in values]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(ys(60, 80, 95, 105, 120, 140), [("in", 1, "person")], id="down-is-in"),
        pytest.param(ys(140, 120, 105, 95, 80, 60), [("out", 1, "person")], id="up-is-out"),
        pytest.param(
            ys(60, 120, 60, 120, 60, 120, 60),
            [("in", 1, "person"), ("out", 1, "person")],
            id="back-and-forth-counts-each-direction-once",
        ),
        pytest.param(ys(60, 97, 103, 96, 104, 98, 102, 60), [], id="jitter-on-the-line"),
        pytest.param(ys(100, 101, 99, 100, 130, 150), [], id="appears-on-the-line"),
        pytest.param(ys(60, 80), [], id="never-crosses"),
        pytest.param(ys(60, 140, x=600), [], id="crosses-the-extension-not-the-segment"),
    ],
)
def test_line_crossing_table(path, expected):
    assert run_line(walk(path)) == expected


@pytest.mark.parametrize(
    ("origin_y", "path", "expected"),
    [
        pytest.param(60, ys(120, 140), [("in", 1, "person")], id="crossed-while-tentative"),
        pytest.param(140, ys(60, 40), [("out", 1, "person")], id="crossed-up-while-tentative"),
        pytest.param(97, ys(120, 140), [], id="started-in-the-dead-band"),
        pytest.param(130, ys(120, 140), [], id="started-on-the-same-side"),
    ],
)
def test_seed_gives_a_new_track_its_starting_side(origin_y, path, expected):
    line = LineCounter("door", (0, 100), (400, 100), hysteresis=8)
    line.seed(walk([(200, origin_y)])[0])
    assert run_line(walk(path), line) == expected


def test_seed_never_changes_a_side_already_seen():
    line = LineCounter("door", (0, 100), (400, 100), hysteresis=8)
    assert run_line(walk(ys(60, 70)), line) == []
    line.seed(walk([(200, 140)])[0])  # would put track 1 below the line
    line.seed(None)
    assert run_line(walk(ys(80, 120)), line) == [("in", 1, "person")]


def test_crossing_made_while_the_tracker_confirmed_the_track_counts():
    """A car seen at three frames only (low frame rate): its line is crossed between
    the first and the third, before the tracker gives it an id."""
    frames = [dets([box_at(200, y)], classes=["car"]) for y in (60, 90, 120, 150)]
    counts = {}
    for seeded in (True, False):
        tracker = ByteTracker(TrackerConfig())
        line = LineCounter("kerb", (0, 100), (400, 100))
        events = []
        for i, frame in enumerate(frames):
            tracked = tracker.update(frame)
            if seeded:
                line.seed(tracker.confirmed_origins())
            events += line.update(tracked, i / 5)
        counts[seeded] = [(e.direction, e.class_name) for e in events]
    assert counts == {True: [("in", "car")], False: []}


def test_two_objects_crossing_together_count_twice():
    frames = [
        dets([box_at(100, y), box_at(160, y)], ids=[1, 2], classes=["person", "bicycle"])
        for y in (60, 80, 120, 140)
    ]
    assert sorted(run_line(frames)) == [("in", 1, "person"), ("in", 2, "bicycle")]


def test_untracked_detections_never_count():
    frames = [dets([box_at(200, y), box_at(250, y)]) for y in (60, 140, 60, 140)]
    assert run_line(frames) == []


def test_anchor_choice_matters():
    # The box's bottom crosses y=100 but its centre stays above the line.
    frames = walk(ys(60, 130))
    bottom = LineCounter("l", (0, 100), (400, 100), anchor="bottom_center")
    center = LineCounter("l", (0, 100), (400, 100), anchor="center")
    assert len(run_line(frames, bottom)) == 1
    assert run_line(frames, center) == []


def test_vertical_line_direction():
    # Drawn top to bottom: moving left is "in".
    line = LineCounter("v", (200, 0), (200, 400))
    frames = walk([(260, 150), (230, 150), (170, 150), (140, 150)])
    assert run_line(frames, line) == [("in", 1, "person")]


def test_degenerate_line_rejected():
    with pytest.raises(ValueError, match="same"):
        LineCounter("bad", (5, 5), (5, 5))


SQUARE = [(100, 100), (300, 100), (300, 300), (100, 300)]


def test_points_in_polygon():
    pts = np.array([[200, 200], [50, 50], [299, 299], [301, 200]], float)
    assert points_in_polygon(pts, np.array(SQUARE, float)).tolist() == [True, False, True, False]


def test_zone_entries_dwell_and_peak():
    zone = ZoneCounter("z", SQUARE, exit_after_s=1.0)
    events = []
    # Track 1 walks in at t=1, track 2 at t=2; both inside until t=4; track 1 walks out.
    for t in range(0, 8):
        boxes, ids = [], []
        if 1 <= t <= 4:
            boxes.append(box_at(200, 200))
            ids.append(1)
        elif t > 4:
            boxes.append(box_at(400, 200))
            ids.append(1)
        else:
            boxes.append(box_at(50, 50))
            ids.append(1)
        if 2 <= t <= 6:
            boxes.append(box_at(150, 250))
            ids.append(2)
        events += zone.update(dets(boxes, ids=ids), float(t))
    events += zone.flush(8.0)
    entries = [(e.track_id, e.ts) for e in events if e.kind == "entry"]
    exits = [(e.track_id, e.dwell_s) for e in events if e.kind == "exit"]
    assert entries == [(1, 1.0), (2, 2.0)]
    # Dwell runs from entry to the last time seen inside: track 1 1..4, track 2 2..6.
    assert sorted(exits) == [(1, 3.0), (2, 4.0)]
    assert zone.peak_occupancy == 2
    assert zone.occupancy == 0


def test_zone_edge_jitter_is_one_visit():
    zone = ZoneCounter("z", SQUARE, exit_after_s=1.0)
    events = []
    for t in range(20):
        y = 102 if t % 2 else 98  # feet hop across the zone's top edge every frame
        events += zone.update(dets([box_at(200, y)], ids=[7]), t / 10)
    events += zone.flush(2.0)
    assert [e.kind for e in events] == ["entry", "exit"]


def test_zone_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        ZoneCounter("z", [(0, 0), (1, 1)])


def test_names_are_shared():
    d = dets([box_at(1, 1)], ids=[3], classes=["truck"])
    assert d.class_names() == ["truck"] and d.names is NAMES


# -- stationary objects -------------------------------------------------------------------


def test_stationary_track_is_hidden_until_it_moves():
    from flowfleet.agent.counting import StationaryFilter

    still = StationaryFilter(min_move_px=10, window_s=3.0)
    seen = []
    for t in range(120):  # 12 s at 10 fps
        ts = t / 10
        # Track 1 is parked (2 px of jitter) for 8 s, then drives off downwards.
        y1 = 200 + (t % 2) * 2 if ts < 8 else 200 + (ts - 8) * 50
        # Track 2 walks steadily across.
        d = dets([box_at(100, y1), box_at(10 + 3 * t, 150)], ids=[1, 2])
        kept = still.apply(d, ts)
        seen.append((ts, sorted(kept.tracker_id.tolist())))
    visible_1 = [ts for ts, ids in seen if 1 in ids]
    # Counted as moving until judged (3 s), hidden while parked, back once it moves.
    assert visible_1[0] == 0.0 and 2.9 <= max(t for t in visible_1 if t < 8) <= 3.0
    assert min(t for t in visible_1 if t >= 3.1) >= 8.1
    assert all(2 in ids for _, ids in seen)


def test_parked_car_stops_counting_once_judged():
    """Parked cars: one on a line (its box edge flickering across it, with a small
    hysteresis) and one in a zone. Once judged stationary they count nothing."""
    from flowfleet.agent.counting import StationaryFilter

    line = LineCounter("kerb", (0, 100), (400, 100), hysteresis=2)
    zone = ZoneCounter("bay", SQUARE, exit_after_s=1.0)
    still = StationaryFilter(min_move_px=10, window_s=2.0)
    crossings, zone_events = [], []
    for t in range(200):
        ts = t / 10
        y = 100 + (4 if t % 7 < 3 else -4)
        d = dets([box_at(50, y), box_at(200, 250)], ids=[1, 2], classes=["car", "car"])
        d = still.apply(d, ts)
        crossings += line.update(d, ts)
        zone_events += zone.update(d, ts)
    zone_events += zone.flush(20.0)
    # Before it is judged (the first 2 s) the flicker crosses, as without the filter;
    # after that nothing, although the flicker goes on for 18 s.
    assert crossings and all(c.ts < 2.0 for c in crossings)
    # Track 2 entered the bay in the first 2 s, then was parked: one visit that ended
    # after the exit delay, and no occupancy for the remaining 17 s.
    assert [(e.kind, e.track_id) for e in zone_events] == [("entry", 2), ("exit", 2)]
    assert zone_events[1].ts < 2.1 and zone.occupancy == 0


# -- dwell distribution and class-agnostic totals ------------------------------------------


def test_zone_dwell_distribution_and_totals_over_classes():
    from flowfleet.agent.counting import ZoneEvent
    from flowfleet.agent.tally import Tally

    tally = Tally()
    tally.declare_zone("cam", "z", ["person", "car"])
    dwells = {"person": [1.0, 2.0, 4.0, 12.0], "car": [65.0]}
    tid = 0
    for cls, values in dwells.items():
        for d in values:
            tid += 1
            tally.add_zone_event("cam", ZoneEvent("z", cls, "entry", tid, 0.0))
            tally.add_zone_event("cam", ZoneEvent("z", cls, "exit", tid, d, dwell_s=d))
    tally.note_occupancy("cam", "z", {"person": 2, "car": 1})  # 3 inside at once
    tally.note_occupancy("cam", "z", {"person": 3})
    person = tally.zones[("cam", "z", "person")]
    assert person.peak_occupancy == 3 and person.mean_dwell_s == pytest.approx(4.75)
    summary = person.dwell_summary()
    assert summary["p50_dwell_s"] == 3.0 and summary["max_dwell_s"] == 12.0
    assert summary["dwell_histogram"]["0-5s"] == 3 and summary["dwell_histogram"]["10-30s"] == 1
    total = tally.zone_totals[("cam", "z")]
    assert (total.entries, total.exits, total.dwell_n) == (5, 5, 5)
    assert total.peak_occupancy == 3  # not 3 + 1: the most objects inside at one time
    assert total.dwell_summary()["dwell_histogram"]["60-120s"] == 1
    assert tally.line_totals() == {}


def test_line_totals_over_classes():
    from flowfleet.agent.tally import Tally

    tally = Tally()
    frames = [
        dets([box_at(100, y), box_at(160, y)], ids=[1, 2], classes=["person", "bicycle"])
        for y in (60, 140)
    ]
    line = LineCounter("door", (0, 100), (400, 100))
    for i, d in enumerate(frames):
        for c in line.update(d, i / 10):
            tally.add_crossing("cam", c)
    assert tally.line_totals() == {("cam", "door"): (2, 0)}


def test_count_cli_stationary_option(videos):
    import json
    import subprocess
    import sys

    def count(*args):
        return subprocess.run(
            [sys.executable, "-m", "flowfleet.cli", "count", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    video = str(videos / "traffic_frames.mp4")
    bad = count(video, "--stationary", "10")
    assert bad.returncode == 2 and "--stationary '10'" in bad.stderr
    # Every car on the highway moves: excluding stationary tracks changes nothing.
    args = [video, "--line", "gantry:480,280,480,540", "--zone", "road:0,300;960,300;960,540;0,540"]
    plain = json.loads(count(*args, "--json").stdout)
    still = json.loads(count(*args, "--json", "--stationary", "10,0.2").stdout)
    assert plain["lines"] == still["lines"] and plain["lines"]["gantry"]["total"]["in"] >= 2
    assert still["zones"]["road"]["total"]["entries"] == plain["zones"]["road"]["total"]["entries"]


@pytest.mark.parametrize(
    ("anchor", "expected"),
    [("bottom_center", [30, 80]), ("center", [30, 50]), ("top_center", [30, 20])],
)
def test_anchor_points_are_computed_once_and_read_only(anchor, expected):
    d = dets([[10, 20, 50, 80]])
    points = d.anchors(anchor)
    assert points.tolist() == [expected]
    assert d.anchors(anchor) is points, "every counter shares one array per frame"
    with pytest.raises(ValueError):
        points[0, 0] = 0


def test_unknown_anchor_is_refused():
    with pytest.raises(ValueError, match="unknown anchor 'feet'"):
        dets([[10, 20, 50, 80]]).anchors("feet")
