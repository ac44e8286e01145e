"""A shadow comparison over a video file, without an agent: tests and the benchmark.

`compare_video` runs the camera's active pipeline on every frame of a file (as the
agent does) and a `ShadowRunner` with the candidate beside it, and returns the
comparison window plus what each side cost, so the candidate's price per share of
frames can be measured against the pipeline without it on the same frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from flowfleet.contract_shadow import ShadowModel, ShadowWindow

from .config import CameraConfig
from .detectors import load_detector
from .pipeline import build_pipeline
from .shadow import ShadowRunner, candidate_pipeline, stride_for
from .sources import open_source


@dataclass(frozen=True)
class OfflineComparison:
    window: ShadowWindow | None  # None when the share is 0 (no candidate)
    frames: int
    cpu_s: float  # the process's CPU time over the frames (decoding included)
    wall_s: float


def compare_video(
    camera: CameraConfig,
    candidate_model: str | Path | None,
    *,
    share: float = 1.0,
    max_frames: int | None = None,
    device: str = "offline",
) -> OfflineComparison:
    """Run ``camera`` (its ``source`` must be a file) with ``candidate_model`` in
    shadow on ``share`` of the frames (None or share 0: no candidate)."""
    source = open_source(camera.source, realtime=False, fps=camera.fps)
    active = build_pipeline(
        camera.name,
        model=camera.model,
        lines=camera.lines,
        zones=camera.zones,
        classes=camera.classes,
        labels=camera.labels,
        anchor=camera.anchor,
        threads=camera.threads,
        conf_threshold=camera.conf_threshold,
        fps=source.fps,
        stationary=camera.stationary,
        tracker=camera.tracker,
    )
    runner = None
    if candidate_model is not None and share > 0:
        detector = load_detector(
            candidate_model, threads=camera.threads, conf_threshold=camera.conf_threshold
        )
        runner = ShadowRunner(
            camera.name,
            candidate_pipeline(camera, detector, source.fps, stride_for(share)),
            share=share,
            active=ShadowModel(file=Path(camera.model).name),
            candidate=ShadowModel(file=Path(candidate_model).name),
            start=0.0,
        )
    frames = 0
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        for frame in source:
            if max_frames is not None and frames >= max_frames:
                break
            result = active.process(frame.image, frame.ts)
            if runner is not None:
                runner.on_frame(frame.image, frame.ts, result)
            frames += 1
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        window = None
        if runner is not None:
            runner.declare_lines(active.counted_classes)
            window = runner.take(device, max(frames / source.fps, 0.0))
    finally:
        source.stop()
        active.detector.close()
        if runner is not None:
            runner.close()
    return OfflineComparison(window, frames, cpu, wall)
