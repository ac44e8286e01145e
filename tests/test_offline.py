"""`ScoreSummary`: the score percentiles `flowfleet count` reports for tuning."""

from __future__ import annotations

import pytest

from flowfleet.agent.offline import ScoreSummary

from .factories import box_at, dets


def frame(scores: list[float]):
    return dets([box_at(50 * i, 100) for i in range(len(scores))], scores=scores)


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([], {"n": 0}),
        ([[]], {"n": 0}),
        ([[0.9]], {"n": 1, "p10": 0.9, "p50": 0.9, "p90": 0.9}),
        # Ten scores 0.05, 0.15, ... 0.95 over two frames.
        (
            [[0.05, 0.15, 0.25, 0.35, 0.45], [0.55, 0.65, 0.75, 0.85, 0.95]],
            {"n": 10, "p10": 0.05, "p50": 0.45, "p90": 0.85},
        ),
        # A score of exactly 1.0 lands in the top bin; percentiles are bin lower edges.
        ([[1.0, 1.0, 0.999]], {"n": 3, "p10": 0.99, "p50": 0.99, "p90": 0.99}),
        ([[0.123] * 9 + [0.8]], {"n": 10, "p10": 0.12, "p50": 0.12, "p90": 0.12}),
    ],
)
def test_score_percentiles(frames, expected):
    summary = ScoreSummary()
    for scores in frames:
        summary.add(frame(scores), frame(scores[:1]))
    assert summary.to_dict()["detections"] == expected
    tracked_n = sum(1 for scores in frames if scores)
    assert summary.to_dict()["tracked"]["n"] == tracked_n


def test_the_two_summaries_are_kept_apart():
    summary = ScoreSummary()
    summary.add(frame([]), frame([0.7]))
    assert summary.to_dict() == {
        "detections": {"n": 0},
        "tracked": {"n": 1, "p10": 0.7, "p50": 0.7, "p90": 0.7},
    }


def test_between_frames_sees_every_frame_and_can_stop_the_count(data, int8_model):
    """The benchmarks' hook (bench_count.py interleaves raw invokes there): called
    after each counted frame with the pipeline; returning True stops the count
    there, and the report covers exactly the frames counted."""
    from flowfleet.agent.config import parse_line
    from flowfleet.agent.offline import count_video

    seen = []

    def hook(pipeline, frames):
        seen.append((frames, pipeline.stats.frames))
        pipeline.detector.invoke_raw()  # what the benchmark does there
        return frames == 7

    report = count_video(
        data / "videos" / "traffic_frames.mp4",
        int8_model,
        lines=[parse_line("gantry:480,280,480,540")],
        progress=False,
        between_frames=hook,
    )
    assert seen == [(n, n) for n in range(1, 8)]
    assert report.frames == 7
    assert report.to_dict()["frames"] == 7
