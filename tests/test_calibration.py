"""Tracker score thresholds that set themselves (agent/calibration.py, issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from flowfleet.agent.calibration import ScoreCalibrator, thresholds_for
from flowfleet.agent.counting import LineCounter
from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors.base import Detector, ModelInfo
from flowfleet.agent.labels import ClassFilter
from flowfleet.agent.pipeline import CameraPipeline, calibrator_for
from flowfleet.agent.tracker import TrackerSpec

DEFAULTS = {"high_thresh": 0.6, "new_track_thresh": 0.7, "strong_birth_thresh": 0.85}
NAMES = ("person",)


def test_thresholds_scale_with_the_median_score_and_stop_at_the_floor():
    assert thresholds_for(0.93, DEFAULTS) == DEFAULTS  # scores like YOLOv8n on people
    assert thresholds_for(0.8, DEFAULTS) == DEFAULTS
    assert thresholds_for(0.6, DEFAULTS) == {
        "high_thresh": 0.45,
        "new_track_thresh": 0.52,
        "strong_birth_thresh": 0.64,
    }
    floor = {"high_thresh": 0.3, "new_track_thresh": 0.35, "strong_birth_thresh": 0.42}
    assert thresholds_for(0.2, DEFAULTS) == thresholds_for(0.01, DEFAULTS) == floor


def frame(x: float, score: float) -> Detections:
    """One person box whose feet are at (x + 10, 100)."""
    return Detections(np.array([[x, 40, x + 20, 100]]), np.array([score]), np.zeros(1), names=NAMES)


def test_only_persistent_detections_count_and_rechecks_follow_the_scene():
    cal = ScoreCalibrator(dict(DEFAULTS), min_samples=20, recheck_s=10)
    # Clutter: a box somewhere new every frame never persists.
    for i in range(40):
        cal.observe(frame(100 * (i % 7), 0.15), i * 0.1)
    assert not cal.warmup_done(4.0) and cal.report()["mode"] == "warming_up"
    for i in range(40, 61):  # an object that stays, scored 0.4
        cal.observe(frame(300 + i, 0.4), i * 0.1)
    assert cal.warmup_done(6.0)
    report = cal.report()
    assert report["mode"] == "auto" and report["samples"] == 20
    assert report["median_score"] == pytest.approx(0.405)
    assert cal.chosen == thresholds_for(0.405, DEFAULTS)
    assert not cal.recheck(9.0)  # not yet time
    for i in range(61, 200):  # the scene now scores high
        cal.observe(frame(300 + i, 0.9), i * 0.1)
    assert cal.recheck(20.0) and cal.chosen == DEFAULTS


class Replay(Detector):
    """Hands out prepared detections frame by frame (the pipeline under test is real)."""

    def __init__(self, frames):
        self.frames = iter(frames)
        self.info = ModelInfo("replay", "replay", (), "", (), NAMES)

    def detect(self, frame_bgr):
        return next(self.frames)


def pipeline(frames, spec: TrackerSpec) -> CameraPipeline:
    config = spec.config(10.0)
    return CameraPipeline(
        "cam",
        Replay(frames),
        ClassFilter(("person",), NAMES),
        [LineCounter("door", (200, 0), (200, 200))],
        [],
        config,
        calibrator=calibrator_for(spec, config),
    )


def walk(score: float, n: int = 60) -> list[Detections]:
    """A person walking right across x = 200, detected at ``score`` in every frame."""
    return [frame(100 + 4 * i, score) for i in range(n)]


@pytest.mark.parametrize("frames", [60, 30], ids=["warm-up-ends", "source-ends-first"])
def test_a_low_scoring_object_counts_once_the_thresholds_set_themselves(frames):
    """Scored 0.45 throughout, the person never starts a track with the default
    thresholds; calibrated, it counts, including the crossing made (frame 25: feet
    past the 8 px dead band) while the warm-up held the frames back, and when the
    video ends before the warm-up does."""
    p = pipeline(walk(0.45, frames), TrackerSpec())
    crossings = []
    for i in range(frames):
        result = p.process(None, i / 10)
        crossings += result.crossings
    rest = p.finish((frames - 1) / 10)
    if rest is not None:
        crossings += rest.crossings
    assert [(c.line, c.direction) for c in crossings] == [("door", "out")]
    assert crossings[0].ts == pytest.approx(2.5)  # feet 8 px past the line: its own time
    report = p.thresholds()
    assert report["mode"] == "auto" and report["high_thresh"] == 0.34


def test_an_explicit_threshold_wins():
    spec = TrackerSpec(high_thresh=0.6, new_track_thresh=0.7)
    p = pipeline(walk(0.45), spec)
    crossings = [c for i in range(60) for c in p.process(None, i / 10).crossings]
    assert crossings == [] and p.finish(6.0) is None
    assert p.thresholds() == {"mode": "config", **DEFAULTS}
    assert calibrator_for(TrackerSpec(auto_thresholds=False), spec.config(10)) is None


def test_parking_clip_counts_every_car_with_no_hand_set_thresholds(videos, int8_model):
    """Cars seen from above score around 0.3 with YOLOv8n: with every class and a line
    across the lane, the two cars going down and the two going up all count."""
    from flowfleet.agent.config import parse_line
    from flowfleet.agent.offline import count_video

    report = count_video(
        videos / "car-detection.mp4",
        int8_model,
        lines=[parse_line("midline:0,216,768,216")],
        classes="all",
        progress=False,
    ).to_dict()
    assert report["lines"]["midline"]["total"] == {"in": 2, "out": 2}
    assert report["thresholds"]["mode"] == "auto"
    assert report["thresholds"]["high_thresh"] < 0.6
