"""ByteTracker on scripted detections."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from flowfleet.agent.detections import UNTRACKED, Detections
from flowfleet.agent.tracker import ByteTracker, TrackerConfig, TrackerSpec, iou_matrix

from .factories import NAMES, box_at, dets


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
    out = run(frames, filtered_boxes=False)
    assert len(out[0]) == len(out[1]) == 0, "tracks are tentative until their third frame"
    seen = {tuple(sorted(o.tracker_id.tolist())) for o in out[2:]}
    assert seen == {(1, 2)}
    first, last = ids_by_x(out[2]), ids_by_x(out[-1])
    assert first[110] == last[195] and first[390] == last[305]


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
    assert all(len(o) == 1 for o in out[2:])
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


def test_for_fps_keeps_lost_tracks_three_seconds():
    assert TrackerConfig.for_fps(25).lost_buffer == 75
    assert TrackerConfig.for_fps(1).lost_buffer == 5
    assert TrackerConfig.for_fps(10, lost_buffer=7).lost_buffer == 7


def test_for_fps_gives_a_weakly_started_track_a_tenth_of_a_second_more():
    assert [TrackerConfig.for_fps(f).weak_birth_hits for f in (5, 7, 10, 25, 30)] == [
        0,
        1,
        1,
        2,
        3,
    ]
    assert TrackerConfig.for_fps(30, weak_birth_hits=0).weak_birth_hits == 0


@pytest.mark.parametrize(
    ("settings", "fps", "expected"),
    [
        ({}, 25, {"lost_buffer": 75, "weak_birth_hits": 2, "min_hits": 3}),
        ({"lost_s": 10}, 10, {"lost_buffer": 100}),
        ({"lost_s": 0.1}, 10, {"lost_buffer": 5}),  # never under 5 frames
        ({"weak_birth_s": 0.5}, 30, {"weak_birth_hits": 15}),
        ({"weak_birth_s": 0}, 30, {"weak_birth_hits": 0}),
        (
            {"high_thresh": 0.4, "new_track_thresh": 0.5, "low_thresh": 0.05},
            10,
            {"high_thresh": 0.4, "new_track_thresh": 0.5, "low_thresh": 0.05},
        ),
        ({"min_hits": 1, "recover_iou": 0}, 10, {"min_hits": 1, "recover_iou": 0}),
        ({"filtered_boxes": False}, 10, {"filtered_boxes": False}),
    ],
)
def test_tracker_spec_turns_seconds_into_frames(settings, fps, expected):
    config = TrackerSpec(**settings).config(fps)
    assert {k: getattr(config, k) for k in expected} == expected


def test_tracker_spec_lists_the_settings_given():
    assert TrackerSpec().given() == ""
    assert TrackerSpec(lost_s=5, high_thresh=0.6).given() == "high_thresh=0.6, lost_s=5.0"


@pytest.mark.parametrize("fps", [1, 5, 7.5, 10, 25, 30, 60])
def test_tracker_spec_defaults_are_the_trackers(fps):
    assert TrackerSpec().config(fps) == TrackerConfig.for_fps(fps)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lost_s": 0}, "lost_s"),
        ({"high_thresh": 1.5}, "high_thresh"),
        ({"tentative_misses": -1}, "tentative_misses"),
        ({"colour": "red"}, "colour"),
        ({"low_thresh": 0.7}, "low_thresh 0.7 is above high_thresh 0.6"),
        ({"new_track_thresh": 0.55}, "new_track_thresh 0.55 is below high_thresh 0.6"),
    ],
)
def test_tracker_spec_rejects_bad_settings(settings, message):
    with pytest.raises(ValidationError, match=message):
        TrackerSpec(**settings)


@pytest.mark.parametrize(
    ("first_score", "later_score", "weak_birth_hits", "first_output"),
    [
        # The first detection's score decides: 0.85 and over is a strong start.
        pytest.param(0.9, 0.9, 2, 2, id="strong-start"),
        pytest.param(0.85, 0.75, 2, 2, id="threshold-is-strong"),
        pytest.param(0.75, 0.9, 2, 4, id="weak-start-two-more-hits"),
        pytest.param(0.75, 0.9, 1, 3, id="weak-start-one-more-hit"),
        pytest.param(0.75, 0.9, 0, 2, id="rule-off"),
    ],
)
def test_a_weakly_started_track_is_confirmed_later(
    first_score, later_score, weak_birth_hits, first_output
):
    frames = [
        dets([box_at(100 + 4 * t, 200)], scores=[first_score if t == 0 else later_score])
        for t in range(8)
    ]
    out = run(frames, weak_birth_hits=weak_birth_hits, filtered_boxes=False)
    outputs = [t for t, o in enumerate(out) if len(o)]
    assert outputs[0] == first_output
    assert outputs == list(range(first_output, 8))
    assert {int(i) for o in out for i in o.tracker_id} == {1}


def test_min_hits_one_gives_an_id_on_the_first_frame():
    frames = [dets([box_at(100 + 4 * t, 200)]) for t in range(4)]
    tracker = ByteTracker(TrackerConfig(min_hits=1))
    out = [tracker.update(f) for f in frames]
    assert tracker.active_ids == {1}
    # Born in frame 1 (not matched yet, so not output), matched from frame 2 on.
    assert [o.tracker_id.tolist() for o in out] == [[], [1], [1], [1]]


@pytest.mark.parametrize(
    ("allowed", "gap", "filler", "first_output"),
    [
        # Seen at frame 0, missed for `gap` frames, then seen on every frame: with the
        # gap allowed, the third hit (frame gap + 2) confirms the first track; else
        # that track dies and a second one, started at frame gap + 1, confirms later.
        pytest.param(1, 1, "empty", 3, id="one-miss-allowed"),
        pytest.param(1, 1, "elsewhere", 3, id="one-miss-allowed-other-object-seen"),
        pytest.param(1, 2, "empty", 5, id="two-misses-end-it"),
        pytest.param(1, 2, "elsewhere", 5, id="two-misses-end-it-other-object-seen"),
        pytest.param(0, 1, "empty", 4, id="bytetrack-rule-no-miss"),
        pytest.param(2, 2, "empty", 4, id="two-misses-allowed"),
    ],
)
def test_a_tentative_track_may_miss_a_frame(allowed, gap, filler, first_output):
    frames = [dets([box_at(100 + 4 * t, 200)]) for t in range(8)]
    for t in range(1, 1 + gap):
        # "elsewhere": a one-frame object far away, so the frame takes the full
        # association path rather than the no-detections one.
        frames[t] = Detections.empty(NAMES) if filler == "empty" else dets([box_at(600, 50)])
    out = run(frames, tentative_misses=allowed, filtered_boxes=False)
    outputs = [t for t, o in enumerate(out) if len(o)]
    assert outputs[0] == first_output
    assert {int(i) for o in out for i in o.tracker_id} == {1}


def test_confirmed_origins_give_the_box_that_started_each_track():
    frames = [dets([box_at(100 + 10 * t, 200)]) for t in range(5)]
    frames[1] = dets([box_at(110, 200), box_at(400, 300, w=60, h=30)], classes=["person", "car"])
    frames[2] = dets([box_at(120, 200), box_at(402, 300, w=60, h=30)], classes=["person", "car"])
    frames[3] = dets([box_at(130, 200), box_at(404, 300, w=60, h=30)], classes=["person", "car"])
    tracker = ByteTracker(TrackerConfig())
    origins = []
    for f in frames:
        tracker.update(f)
        origins.append(tracker.confirmed_origins())
    assert origins[:2] == [None, None]
    assert origins[2].tracker_id.tolist() == [1]  # the person, confirmed on its third hit
    np.testing.assert_array_equal(origins[2].xyxy, [box_at(100, 200)])
    assert origins[3].tracker_id.tolist() == [2]
    np.testing.assert_array_equal(origins[3].xyxy, [box_at(400, 300, w=60, h=30)])
    assert origins[3].class_names() == ["car"]
    assert origins[4] is None


def test_new_class_ids_widen_the_vote():
    # Class ids beyond the ones seen so far (COCO-style sparse ids) join the vote.
    classes = ["person", "truck", "truck", "bus", "truck", "person"]
    frames = [dets([box_at(100 + 5 * t, 300)], classes=[c]) for t, c in enumerate(classes)]
    out = run(frames, min_hits=2)
    assert [o.class_names() for o in out[1:]] == [
        ["person"],  # tie 0.9 / 0.9: the lower class id
        ["truck"],
        ["truck"],
        ["truck"],
        ["truck"],
    ]


def test_ids_are_never_reused_and_dead_tracks_are_dropped():
    rng = np.random.default_rng(7)
    tracker = ByteTracker(TrackerConfig(lost_buffer=3))
    seen: dict[int, int] = {}  # id -> last frame it was output
    for t in range(60):
        # Objects come and go in waves of 1..6, each moving right; then 5 empty frames.
        n = 0 if t >= 55 else 1 + (t // 10) % 6
        boxes = [box_at(80 * k + 60 + 3 * (t % 10), 300 + 40 * (k % 2)) for k in range(n)]
        scores = rng.uniform(0.75, 1.0, n).tolist()
        out = tracker.update(dets(boxes, scores=scores))
        assert len(set(out.tracker_id.tolist())) == len(out)
        assert (out.tracker_id > 0).all()
        for tid in out.tracker_id.tolist():
            seen[tid] = t
    assert sorted(seen) == list(range(1, len(seen) + 1))
    assert len(tracker) == 0 and tracker.active_ids == set()


def test_filtered_boxes_smooth_the_detections():
    noisy = [box_at(100 + 6 * t, 200 + (3 if t % 2 else -3)) for t in range(30)]
    raw = run([dets([b]) for b in noisy], filtered_boxes=False)
    smooth = run([dets([b]) for b in noisy], filtered_boxes=True)
    assert [o.tracker_id.tolist() for o in raw] == [o.tracker_id.tolist() for o in smooth]
    jitter_raw = np.abs(np.diff([o.xyxy[0, 3] for o in raw[10:]])).mean()
    jitter_smooth = np.abs(np.diff([o.xyxy[0, 3] for o in smooth[10:]])).mean()
    assert jitter_smooth < 0.8 * jitter_raw


def _stops_behind_an_occluder() -> list[Detections]:
    """Walks right at 15 px a frame, vanishes for 8 frames, reappears where it vanished.

    The Kalman prediction keeps walking (120 px on), so only the last seen box
    still overlaps the detection when it comes back.
    """
    frames = [dets([box_at(100 + 15 * t, 200)]) for t in range(12)]
    frames += [Detections.empty(frames[0].names) for _ in range(8)]
    frames += [dets([box_at(100 + 15 * 11 + t, 200)]) for t in range(6)]
    return frames


def test_recovery_by_last_seen_box_keeps_the_id_of_an_object_that_stopped():
    out = run(_stops_behind_an_occluder(), lost_buffer=30)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1}
    assert len(out[-1]) == 1


def test_without_recovery_the_stopped_object_gets_a_new_id():
    out = run(_stops_behind_an_occluder(), lost_buffer=30, recover_iou=0)
    assert set(np.concatenate([o.tracker_id for o in out]).tolist()) == {1, 2}


def test_match_agrees_with_the_assignment_solver():
    from scipy.optimize import linear_sum_assignment

    from flowfleet.agent.tracker import _match

    rng = np.random.default_rng(3)
    for _ in range(300):
        rows, cols = rng.integers(0, 7, 2)
        iou = rng.uniform(0, 1, (rows, cols)) * (rng.uniform(0, 1, (rows, cols)) < 0.4)
        r, c = _match(iou, 0.3)
        assert (iou[r, c] >= 0.3).all()
        assert len(set(r.tolist())) == len(r) and len(set(c.tolist())) == len(c)
        # Same total as the optimum over the pairs that pass the gate.
        gated = np.where(iou >= 0.3, iou, 0.0)
        br, bc = linear_sum_assignment(gated, maximize=True)
        assert abs(iou[r, c].sum() - gated[br, bc].sum()) < 1e-9


def _full_kalman_reference(z_seq, std_pos=1 / 20, std_vel=1 / 160):
    """Textbook 8x8 filter (SORT / ByteTrack formulation) on one track."""
    f = np.eye(8)
    f[:4, 4:] = np.eye(4)
    hm = np.eye(4, 8)
    z0 = z_seq[0]
    h = z0[3]
    mean = np.r_[z0, np.zeros(4)]
    cov = np.diag(
        np.square(
            [
                *(2 * std_pos * h, 2 * std_pos * h, 1e-2, 2 * std_pos * h),
                *(10 * std_vel * h, 10 * std_vel * h, 1e-5, 10 * std_vel * h),
            ]
        )
    )
    for z in z_seq[1:]:
        h = mean[3]
        q = np.diag(
            np.square(
                [
                    *(std_pos * h, std_pos * h, 1e-2, std_pos * h),
                    *(std_vel * h, std_vel * h, 1e-5, std_vel * h),
                ]
            )
        )
        mean, cov = f @ mean, f @ cov @ f.T + q
        h = mean[3]
        r = np.diag(np.square([std_pos * h, std_pos * h, 1e-1, std_pos * h]))
        s = hm @ cov @ hm.T + r
        k = cov @ hm.T @ np.linalg.inv(s)
        mean = mean + k @ (z - hm @ mean)
        cov = cov - k @ s @ k.T
    return mean, cov


def test_block_kalman_equals_the_full_filter():
    from flowfleet.agent import kalman

    rng = np.random.default_rng(5)
    z_seq = np.cumsum(rng.normal(0, 3, (12, 4)), axis=0) + np.array([300, 200, 0.5, 120])
    z_seq[:, 2] = np.abs(z_seq[:, 2]) * 0.01 + 0.4
    state = kalman.initiate(z_seq[:1])
    for z in z_seq[1:]:
        kalman.predict(state)
        kalman.update(state, z[None, :])
    mean, cov = _full_kalman_reference(z_seq)
    assert np.allclose(state[0, :8], mean)
    idx = np.arange(4)
    assert np.allclose(state[0, kalman.PP], cov[idx, idx])
    assert np.allclose(state[0, kalman.PV], cov[idx, idx + 4])
    assert np.allclose(state[0, kalman.VV], cov[idx + 4, idx + 4])
    off_block = cov.copy()
    for r, c in ((idx, idx), (idx, idx + 4), (idx + 4, idx), (idx + 4, idx + 4)):
        off_block[r, c] = 0
    assert np.abs(off_block).max() < 1e-9  # really four independent 2x2 blocks


def test_box_conversions_round_trip():
    from flowfleet.agent import kalman

    boxes = np.array([[10, 20, 50, 100], [0, 0, 1, 2], [5, 5, 25, 5]], float)
    xyah = kalman.xyxy_to_xyah(boxes)
    assert np.allclose(xyah[0], [30, 60, 0.5, 80])
    assert xyah[2, 3] == 1e-3  # a degenerate box keeps a positive height
    assert np.allclose(kalman.xyah_to_xyxy(xyah[:2]), boxes[:2])
