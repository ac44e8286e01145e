"""Line and zone counters on scripted tracks (no detector involved)."""

from __future__ import annotations

import numpy as np
import pytest

from flowfleet.agent.counting import LineCounter, ZoneCounter, points_in_polygon
from flowfleet.agent.detections import Detections

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
