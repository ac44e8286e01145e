"""CameraPipeline wiring: detect -> filter classes -> track -> count, frame by frame.

The detector here replays scripted detections (the pipeline, tracker and counters
are the real ones); the detectors themselves are tested on real models elsewhere.
"""

from __future__ import annotations

import numpy as np

from flowfleet.agent.counting import LineCounter
from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors.base import Detector, ModelInfo
from flowfleet.agent.labels import ClassFilter
from flowfleet.agent.pipeline import CameraPipeline
from flowfleet.agent.tracker import TrackerConfig

from .factories import NAMES, box_at, dets


class ScriptedDetector(Detector):
    """Returns the next of a list of Detections on every call, whatever the frame."""

    def __init__(self, frames: list[Detections]) -> None:
        self.info = ModelInfo(
            path="scripted",
            runtime="scripted",
            input_shape=(1, 3, 64, 64),
            input_dtype="uint8",
            output_shapes=(),
            labels=NAMES,
        )
        self._frames = iter(frames)

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        return next(self._frames)


def test_a_car_that_crossed_while_being_confirmed_counts():
    """At 5 frames/s a car is seen three times before its id is issued; the line lies
    between its first and third positions."""
    frames = [dets([box_at(200, y)], classes=["car"]) for y in (60, 90, 120, 150)]
    pipeline = CameraPipeline(
        "road",
        ScriptedDetector(frames),
        ClassFilter(None, NAMES),
        [LineCounter("kerb", (0, 100), (400, 100))],
        [],
        TrackerConfig.for_fps(5),
    )
    image = np.zeros((240, 400, 3), np.uint8)
    crossings = [c for i in range(4) for c in pipeline.process(image, i / 5).crossings]
    assert [(c.line, c.direction, c.class_name, c.track_id) for c in crossings] == [
        ("kerb", "in", "car", 1)
    ]
