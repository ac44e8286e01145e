"""The torso-colour appearance cue (agent/appearance.py) and how the tracker uses it."""

from __future__ import annotations

import numpy as np

from flowfleet.agent.appearance import DIM, torso_histograms
from flowfleet.agent.counting import LineCounter
from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors.base import Detector, ModelInfo
from flowfleet.agent.labels import ClassFilter
from flowfleet.agent.pipeline import CameraPipeline
from flowfleet.agent.tracker import ByteTracker, TrackerConfig

RED, BLUE, GREY = (40, 40, 200), (200, 60, 40), (128, 128, 128)  # BGR


def scene(people) -> tuple[np.ndarray, np.ndarray]:
    """A grey 640x480 frame with a person-sized box per (x, colour): a coloured torso
    over dark legs. Returns (image, xyxy boxes)."""
    image = np.full((480, 640, 3), GREY, np.uint8)
    boxes = []
    for x, colour in people:
        image[100:170, x : x + 40] = colour  # shirt
        image[170:220, x : x + 40] = (30, 30, 30)  # trousers
        boxes.append((x, 100, x + 40, 220))
    return image, np.array(boxes, np.float32).reshape(-1, 4)


def test_histograms_are_unit_vectors_that_tell_colours_apart():
    image, boxes = scene([(100, RED), (300, RED), (500, BLUE)])
    off = np.array([[700, 500, 760, 600]], np.float32)  # wholly outside the image
    f = torso_histograms(image, np.vstack([boxes, off]))
    assert f.shape == (4, DIM) and f.dtype == np.float32
    assert np.allclose(np.linalg.norm(f[:3], axis=1), 1.0, atol=1e-5)
    assert f[0] @ f[1] > 0.99  # same shirt
    assert f[0] @ f[2] < 0.2  # red against blue
    assert not f[3].any()  # no pixels: no colours


def dets(boxes, score=0.9) -> Detections:
    n = len(boxes)
    return Detections(boxes, np.full(n, score), np.zeros(n), names=("person",))


def run(appearance: bool) -> list[int]:
    """A person in red walks right and vanishes at x = 300 (frame 10); a person in blue
    appears where they vanished five frames later and stands there. Returns the ids
    of the tracks seen, in order of appearance."""
    tracker = ByteTracker(TrackerConfig.for_fps(10, appearance=appearance))
    seen: list[int] = []
    for i in range(30):
        if i < 10:
            people = [(200 + 10 * i, RED)]
        elif i < 15:
            people = []
        else:
            people = [(290, BLUE)]
        image, boxes = scene(people)
        out = tracker.update(dets(boxes), torso_histograms(image, boxes))
        seen += [int(t) for t in out.tracker_id if t not in seen]
    return seen


def test_a_lost_id_does_not_pass_to_someone_who_looks_different():
    assert run(appearance=False) == [1]  # motion alone: blue takes red's id
    assert run(appearance=True) == [1, 2]  # colours: blue is somebody else


def test_a_lost_person_is_taken_back_when_they_look_the_same():
    """Hidden for 8 frames, a person in red comes out 60 px further on than walking
    on would have taken them: too far from the predicted and the last box to
    overlap either, so motion alone starts a new id; stage 5 re-links them by
    colour (within reach: 0.5 + 0.15 x 8 box heights)."""
    for appearance, expected in ((True, [1]), (False, [1, 2])):
        tracker = ByteTracker(TrackerConfig.for_fps(10, appearance=appearance))
        seen: list[int] = []
        for i in range(30):
            if i < 10:
                people = [(100 + 10 * i, RED)]
            elif i < 18:
                people = []
            else:
                people = [(100 + 10 * i + 60, RED)]
            image, boxes = scene(people)
            out = tracker.update(dets(boxes), torso_histograms(image, boxes))
            seen += [int(t) for t in out.tracker_id if t not in seen]
        assert seen == expected, (appearance, seen)


def test_whoever_walked_out_of_the_picture_does_not_come_back_as_someone_else():
    """A person in red walks out at the right edge; two frames later another person in
    red comes in where they left, walking back. With the frame size known (the
    pipeline sets it), the first track is dropped once its predicted centre is off
    the image, so the newcomer gets a new id; without it, the lost track (kept for
    three seconds) is taken back by the look-alike, with or without colours."""
    for frame_size, appearance, expected in (
        ((640, 480), True, [1, 2]),
        ((640, 480), False, [1, 2]),
        (None, True, [1]),
        (None, False, [1]),
    ):
        tracker = ByteTracker(TrackerConfig.for_fps(10, appearance=appearance))
        tracker.frame_size = frame_size
        seen: list[int] = []
        for i in range(30):
            if i < 12:
                people = [(420 + 18 * i, RED)]  # the box reaches the edge (x 640) at i 10
            elif i < 14:
                people = []
            else:
                people = [(600 - 12 * (i - 14), RED)]
            image, boxes = scene(people)
            boxes[:, 2] = np.minimum(boxes[:, 2], 640)  # what a detector sees of it
            out = tracker.update(dets(boxes), torso_histograms(image, boxes))
            seen += [int(t) for t in out.tracker_id if t not in seen]
        assert seen == expected, (frame_size, appearance, seen)


class _Replay(Detector):
    """Hands out prepared detections frame by frame (the pipeline under test is real)."""

    def __init__(self, frames):
        self.frames = iter(frames)
        self.info = ModelInfo("replay", "replay", (), "", (), ("person",))

    def detect(self, frame_bgr):
        return next(self.frames)


def test_a_newcomer_where_someone_left_counts_in_the_pipeline():
    """End to end through `CameraPipeline` (which gives the tracker the frame size):
    A walks right across a line at x 500 and out of the 640 px frame; 0.5 s later B,
    dressed alike, comes in there, walks left across the line and back right. B's
    rightward crossing is B's own, not a repeat of A's: three crossings. Without
    frames (``process(None, ...)``: no frame size) B inherits A's id and that
    crossing is swallowed ("once per track, line and direction")."""
    a = [400 + 12 * i for i in range(20)]  # box x; the box reaches the edge at i 17
    b = [600 - 20 * i for i in range(8)] + [460 + 20 * i for i in range(7)]
    frames = (
        [[(x, 200, min(x + 40, 640), 320)] for x in a]
        + [[]] * 5
        + [[(x, 210, x + 40, 330)] for x in b]
    )
    image = np.zeros((480, 640, 3), np.uint8)
    image[:] = RED  # every torso alike: only the rule tells A and B apart
    results = {}
    for with_frames in (True, False):
        p = CameraPipeline(
            "cam",
            _Replay(dets(np.array(f, np.float32).reshape(-1, 4)) for f in frames),
            ClassFilter(("person",), ("person",)),
            [LineCounter("door", (500, 100), (500, 400))],
            [],
            TrackerConfig.for_fps(10),
        )
        crossings = [
            (c.direction, c.track_id)
            for i in range(len(frames))
            for c in p.process(image if with_frames else None, i / 10).crossings
        ]
        results[with_frames] = crossings
    assert results[True] == [("out", 1), ("in", 2), ("out", 2)]
    assert results[False] == [("out", 1), ("in", 1)]
