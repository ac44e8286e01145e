"""ByteTracker on scripted detections."""

from __future__ import annotations

import numpy as np

from flowfleet.agent.detections import UNTRACKED, Detections
from flowfleet.agent.tracker import ByteTracker, TrackerConfig, iou_matrix

from .factories import box_at, dets


def run(frames: list[Detections], **cfg) -> list[Detections]:
    tracker = ByteTracker(TrackerConfig(**cfg))
    return [tracker.update(f) for f in frames]


def ids_by_x(out: Detections) -> dict[int, int]:
    """Map of rounded box centre x -> track id."""
    centres = (out.xyxy[:, 0] + out.xyxy[:, 2]) / 2
    return {round(float(x)): int(t) for x, t in zip(centres, out.tracker_id, strict=True)}


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], float)
    m = iou_matrix(a, b)
    assert m[0, 0] == 1.0 and abs(m[0, 1] - 1 / 3) < 1e-9 and m[1].max() == 0


def test_two_objects_keep_their_ids():
    frames = [dets([box_at(100 + 5 * t, 200), box_at(400 - 5 * t, 200)]) for t in range(20)]
    out = run(frames)
    assert len(out[0]) == 0, "tracks are tentative on their first frame"
    seen = {tuple(sorted(o.tracker_id.tolist())) for o in out[1:]}
    assert seen == {(1, 2)}
    first, last = ids_by_x(out[1]), ids_by_x(out[-1])
    assert first[105] == last[195] and first[395] == last[305]


def test_single_frame_false_positive_never_gets_an_id():
    frames = [dets([box_at(100 + 3 * t, 200)]) for t in range(10)]
    frames[4] = dets([box_at(112, 200), box_at(500, 100)])
    out = run(frames)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1}


def test_occlusion_keeps_the_id():
    frames = [dets([box_at(100 + 6 * t, 200)]) for t in range(30)]
    for t in range(10, 16):
        frames[t] = Detections.empty(frames[0].names)
    out = run(frames, lost_buffer=10)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1}
    assert len(out[20]) == 1


def test_lost_too_long_gets_a_new_id():
    frames = [dets([box_at(100 + 2 * t, 200)]) for t in range(40)]
    for t in range(10, 30):
        frames[t] = Detections.empty(frames[0].names)
    out = run(frames, lost_buffer=5)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1, 2}


def test_low_score_detections_keep_a_track_alive():
    scores = [0.9] * 5 + [0.3] * 10 + [0.9] * 5
    frames = [dets([box_at(100 + 4 * t, 200)], scores=[s]) for t, s in enumerate(scores)]
    out = run(frames, lost_buffer=3)
    assert all(len(o) == 1 for o in out[1:])
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1}


def test_low_score_detections_never_start_tracks():
    frames = [dets([box_at(100 + 4 * t, 200)], scores=[0.3]) for t in range(10)]
    assert all(len(o) == 0 for o in run(frames))


def test_label_flicker_is_one_object_with_the_majority_class():
    classes = ["car", "truck", "car", "car", "truck", "car", "car", "truck", "car", "car"]
    frames = [
        dets([box_at(100 + 8 * t, 300, w=120, h=60)], classes=[c]) for t, c in enumerate(classes)
    ]
    out = run(frames)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1}
    assert out[-1].class_names() == ["car"]


def test_output_is_only_confirmed_tracks():
    frames = [dets([box_at(100, 200)]) for _ in range(3)]
    out = run(frames, min_hits=3)
    assert [len(o) for o in out] == [0, 0, 1]
    assert UNTRACKED not in out[2].tracker_id
