"""Offline counting of a whole video file or image folder: `flowfleet count`.

Reads the file as fast as the detector allows (decoding overlaps inference on a
reader thread) and returns final totals per line / class / direction and per zone,
each with a class-agnostic total, and ground speeds when a calibration is given.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .detections import Detections
from .pipeline import CameraPipeline, build_pipeline
from .sources import SourceError, open_source, source_kind
from .tally import Tally, ZoneAgg

CAMERA = "video"
SCORE_BINS = 100  # score histogram resolution: 0.01


class ScoreSummary:
    """Detection scores of the counted classes over a whole video: of every detection,
    and of those the tracker kept on objects with an id.

    What a user looks at to set the tracker's score thresholds for a model whose
    scores run lower or higher than the defaults assume (docs/counting.md, "Tracker
    settings"). Scores are kept in 0.01-wide bins, so memory does not grow with the
    video; a percentile is the lower edge of the bin it falls in.
    """

    def __init__(self) -> None:
        self.detections = np.zeros(SCORE_BINS, np.int64)
        self.tracked = np.zeros(SCORE_BINS, np.int64)

    def add(self, detections: Detections, tracked: Detections) -> None:
        self._add(self.detections, detections.confidence)
        self._add(self.tracked, tracked.confidence)

    @staticmethod
    def _add(hist: np.ndarray, scores: np.ndarray) -> None:
        if len(scores):
            bins = np.minimum((scores * SCORE_BINS).astype(np.intp), SCORE_BINS - 1)
            hist += np.bincount(bins, minlength=SCORE_BINS)

    @staticmethod
    def _percentiles(hist: np.ndarray) -> dict:
        n = int(hist.sum())
        out: dict = {"n": n}
        if n:
            cum = np.cumsum(hist)
            for q in (10, 50, 90):
                out[f"p{q}"] = int(np.searchsorted(cum, q * n / 100)) / SCORE_BINS
        return out

    def to_dict(self) -> dict:
        return {
            "detections": self._percentiles(self.detections),
            "tracked": self._percentiles(self.tracked),
        }


@dataclass
class CountReport:
    video: str
    model: str
    frames: int
    video_seconds: float
    elapsed_s: float
    inference_s: float
    tally: Tally
    speed_window_s: float | None = None  # set when speed was measured
    # Of elapsed_s, the time until the first frame was counted: the reader opening the
    # file and decoding ahead, plus the interpreter's slower first run. Benchmarks
    # report it apart from the steady per-frame rate (see benchmarks/bench_count.py).
    first_frame_s: float = 0.0
    scores: ScoreSummary = field(default_factory=ScoreSummary)
    thresholds: dict = field(default_factory=dict)  # CameraPipeline.thresholds()

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict:
        lines: dict[str, dict] = {}
        for (_, line, cls), (n_in, n_out) in sorted(self.tally.lines.items()):
            entry = lines.setdefault(line, {"classes": {}, "total": {"in": 0, "out": 0}})
            entry["classes"][cls] = {"in": n_in, "out": n_out}
            entry["total"]["in"] += n_in
            entry["total"]["out"] += n_out
        zones: dict[str, dict] = {}
        for (_, zone, cls), agg in sorted(self.tally.zones.items()):
            zones.setdefault(zone, {"classes": {}})["classes"][cls] = _zone_dict(agg)
        for (_, zone), agg in sorted(self.tally.zone_totals.items()):
            zones.setdefault(zone, {"classes": {}})["total"] = _zone_dict(agg)
        data = {
            "video": self.video,
            "model": self.model,
            "frames": self.frames,
            "video_seconds": round(self.video_seconds, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "fps": round(self.fps, 2),
            "inference_ms_mean": round(1000 * self.inference_s / max(self.frames, 1), 2),
            "scores": self.scores.to_dict(),
            "thresholds": self.thresholds,
            "lines": lines,
            "zones": zones,
        }
        if self.speed_window_s is not None:
            data["speed"] = self._speed_dict()
        return data

    def _speed_dict(self) -> dict:
        """Per class and in total: every measured track, and per line at its crossing."""
        out: dict = {"window_s": self.speed_window_s, "tracks": {"classes": {}}, "lines": {}}
        for (_, line, cls), agg in sorted(self.tally.speeds.items(), key=lambda i: i[0][2]):
            entry = (
                out["tracks"] if line is None else out["lines"].setdefault(line, {"classes": {}})
            )
            entry["classes"][cls] = agg.to_dict()
        for (_, line), agg in self.tally.speed_totals().items():
            entry = out["tracks"] if line is None else out["lines"][line]
            entry["total"] = agg.to_dict()
        out["tracks"].setdefault("total", {"n": 0, "insufficient": 0})
        out["lines"] = dict(sorted(out["lines"].items()))
        return out


def _zone_dict(agg: ZoneAgg) -> dict:
    return {
        "entries": agg.entries,
        "exits": agg.exits,
        "peak_occupancy": agg.peak_occupancy,
        **agg.dwell_summary(),
    }


def count_video(
    video: str | Path,
    model: str | Path,
    *,
    lines=(),
    zones=(),
    classes=None,
    labels: str | None = None,
    anchor: str = "bottom_center",
    threads: int = 2,
    conf_threshold: float = 0.1,
    progress: bool | None = None,
    speed=None,
    stationary=None,
    fps: float = 10.0,
    start_frame: int = 0,
    tracker=None,
    between_frames: Callable[[CameraPipeline, int], bool | None] | None = None,
) -> CountReport:
    """Count a video file or image folder end to end.

    ``speed`` (a `SpeedSpec`) adds ground speeds; ``stationary`` (a `StationarySpec`)
    keeps parked objects out of the counts; ``tracker`` (a `TrackerSpec`) changes the
    tracker's settings; ``fps`` stamps image-folder frames.
    ``between_frames(pipeline, frames_so_far)`` is called after each counted frame
    and its time is left out of ``elapsed_s``; when it returns True, counting stops
    there (the report covers the frames counted so far). `benchmarks/bench_count.py`
    runs the raw model on the pipeline's own interpreter there, interleaved with the
    counting.
    Raises SourceError / ModelError / ValueError.
    """
    if source_kind(str(video)) not in ("file", "folder"):
        raise SourceError(
            f"{video}: flowfleet count reads video files and image folders; "
            "live streams and cameras are counted by the agent"
        )
    source = open_source(str(video), realtime=False, fps=fps, start_frame=start_frame)
    pipeline = build_pipeline(
        CAMERA,
        model=str(model),
        lines=lines,
        zones=zones,
        classes=classes,
        labels=labels,
        anchor=anchor,
        threads=threads,
        conf_threshold=conf_threshold,
        fps=source.fps,
        speed=speed,
        stationary=stationary,
        tracker=tracker,
    )
    tally = Tally()
    scores = ScoreSummary()
    for spec in lines:
        tally.declare_line(CAMERA, spec.name, pipeline.counted_classes)
    for spec in zones:
        tally.declare_zone(CAMERA, spec.name, pipeline.counted_classes)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=source.frame_count, unit="frame", desc=Path(video).name, leave=False)
    start = time.perf_counter()
    frames = 0
    first_frame_s = 0.0
    paused = 0.0  # in between_frames
    last_ts = 0.0

    def take(result) -> None:
        for ev in result.crossings:
            tally.add_crossing(CAMERA, ev)
        for ev in result.zone_events:
            tally.add_zone_event(CAMERA, ev)
        for zone, by_class in result.occupancy.items():
            tally.note_occupancy(CAMERA, zone, by_class)
        for ev in result.speeds:
            tally.add_speed(CAMERA, ev)
        scores.add(result.detections, result.tracked)

    for frame in source:
        take(pipeline.process(frame.image, frame.ts))
        frames += 1
        if frames == 1:
            first_frame_s = time.perf_counter() - start
        last_ts = frame.ts
        if bar is not None:
            bar.update(1)
        if between_frames is not None:
            t0 = time.perf_counter()
            stop = between_frames(pipeline, frames)
            paused += time.perf_counter() - t0
            if stop:
                source.stop()
                break
    rest = pipeline.finish(last_ts)  # a video shorter than the threshold warm-up
    if rest is not None:
        rest = replace(rest, detections=rest.detections[:0])  # already in `scores`
        take(rest)
    for ev in pipeline.flush(last_ts):
        tally.add_zone_event(CAMERA, ev)
    for ev in pipeline.flush_speeds(last_ts):
        tally.add_speed(CAMERA, ev)
    elapsed = time.perf_counter() - start - paused
    if bar is not None:
        bar.close()
    pipeline.detector.close()
    return CountReport(
        video=str(video),
        model=str(model),
        frames=frames,
        video_seconds=frames / source.fps,
        elapsed_s=elapsed,
        inference_s=pipeline.stats.inference_s,
        tally=tally,
        speed_window_s=None if speed is None else speed.window_s,
        first_frame_s=first_frame_s,
        scores=scores,
        thresholds=pipeline.thresholds(),
    )
