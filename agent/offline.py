"""Offline counting of a whole video file or image folder: `flowfleet count`.

Reads the file as fast as the detector allows (decoding overlaps inference on a
reader thread) and returns final totals per line / class / direction and per zone,
each with a class-agnostic total, and ground speeds when a calibration is given.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pipeline import build_pipeline
from .sources import SourceError, open_source, source_kind
from .tally import Tally, ZoneAgg

CAMERA = "video"


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
) -> CountReport:
    """Count a video file or image folder end to end.

    ``speed`` (a `SpeedSpec`) adds ground speeds; ``stationary`` (a `StationarySpec`)
    keeps parked objects out of the counts; ``fps`` stamps image-folder frames.
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
    )
    tally = Tally()
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
    last_ts = 0.0
    for frame in source:
        result = pipeline.process(frame.image, frame.ts)
        for ev in result.crossings:
            tally.add_crossing(CAMERA, ev)
        for ev in result.zone_events:
            tally.add_zone_event(CAMERA, ev)
        for zone, by_class in result.occupancy.items():
            tally.note_occupancy(CAMERA, zone, by_class)
        for ev in result.speeds:
            tally.add_speed(CAMERA, ev)
        frames += 1
        if frames == 1:
            first_frame_s = time.perf_counter() - start
        last_ts = frame.ts
        if bar is not None:
            bar.update(1)
    for ev in pipeline.flush(last_ts):
        tally.add_zone_event(CAMERA, ev)
    for ev in pipeline.flush_speeds(last_ts):
        tally.add_speed(CAMERA, ev)
    elapsed = time.perf_counter() - start
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
    )
