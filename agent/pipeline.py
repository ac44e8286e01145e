"""One camera's per-frame work: detect -> filter classes -> track -> count.

Counting: stationary tracks are dropped first (when configured), then lines, zones
and speed see the same tracked Detections. A line crossing also records the
track's speed at that moment when the camera measures speed.

`CameraPipeline.process` takes a frame and returns what happened in it; the caller
(the offline counter or the agent service) decides where the counts go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .counting import (
    Crossing,
    LineCounter,
    StationaryFilter,
    StationarySpec,
    ZoneCounter,
    ZoneEvent,
    count_lines,
)
from .detections import Detections
from .detectors.base import Detector
from .labels import ClassFilter
from .speed import SpeedEstimator, SpeedEvent, SpeedSpec
from .tracker import ByteTracker, TrackerConfig, TrackerSpec


@dataclass(frozen=True)
class FrameResult:
    detections: Detections  # the frame's detections of the counted classes
    tracked: Detections
    crossings: list[Crossing]
    zone_events: list[ZoneEvent]
    occupancy: dict[str, dict[str, int]]  # zone -> class -> objects inside now
    inference_s: float
    speeds: list[SpeedEvent] = field(default_factory=list)  # ended tracks, line crossings


@dataclass
class PipelineStats:
    frames: int = 0
    inference_s: float = 0.0
    detections: int = 0
    last_inference_s: float = field(default=0.0)


class CameraPipeline:
    def __init__(
        self,
        name: str,
        detector: Detector,
        class_filter: ClassFilter,
        lines: list[LineCounter],
        zones: list[ZoneCounter],
        tracker_config: TrackerConfig | None = None,
        *,
        speed: SpeedEstimator | None = None,
        stationary: StationaryFilter | None = None,
    ) -> None:
        self.name = name
        self.detector = detector
        self.class_filter = class_filter
        self.lines = lines
        self.zones = zones
        self.speed = speed
        self.stationary = stationary
        self.tracker = ByteTracker(tracker_config)
        self.stats = PipelineStats()

    @property
    def counted_classes(self) -> list[str]:
        return list(self.class_filter.names)

    def process(self, image: np.ndarray, ts: float) -> FrameResult:
        t0 = time.perf_counter()
        dets = self.class_filter.apply(self.detector.detect(image))
        infer = time.perf_counter() - t0
        tracked = self.tracker.update(dets)
        counted = tracked if self.stationary is None else self.stationary.apply(tracked, ts)
        speeds: list[SpeedEvent] = []
        if self.speed is not None:
            speeds.extend(self.speed.update(counted, ts))
        crossings = count_lines(self.lines, counted, self.tracker.confirmed_origins(), ts)
        if self.speed is not None:
            speeds.extend(
                self.speed.crossing(c.track_id, c.class_name, c.line, ts) for c in crossings
            )
        zone_events: list[ZoneEvent] = []
        occupancy: dict[str, dict[str, int]] = {}
        for zone in self.zones:
            zone_events.extend(zone.update(counted, ts))
            occupancy[zone.name] = zone.occupancy_by_class()
        self.stats.frames += 1
        self.stats.inference_s += infer
        self.stats.last_inference_s = infer
        self.stats.detections += len(dets)
        return FrameResult(dets, tracked, crossings, zone_events, occupancy, infer, speeds)

    def flush(self, ts: float) -> list[ZoneEvent]:
        """Close open zone visits (end of file or shutdown)."""
        events: list[ZoneEvent] = []
        for zone in self.zones:
            events.extend(zone.flush(ts))
        return events

    def flush_speeds(self, ts: float) -> list[SpeedEvent]:
        """End every track's speed measurement (end of file or shutdown)."""
        return [] if self.speed is None else self.speed.flush(ts)


def build_pipeline(
    name: str,
    *,
    model: str,
    lines=(),
    zones=(),
    classes=None,
    labels: str | None = None,
    anchor: str = "bottom_center",
    threads: int = 2,
    conf_threshold: float = 0.1,
    fps: float = 25.0,
    speed: SpeedSpec | None = None,
    stationary: StationarySpec | None = None,
    tracker: TrackerSpec | None = None,
) -> CameraPipeline:
    """Assemble a pipeline from config values (LineSpec / ZoneSpec sequences,
    optional `SpeedSpec`, `StationarySpec` and `TrackerSpec`).

    Raises ModelError for an unusable model and ValueError for an unknown class.
    """
    from .detectors import load_detector

    detector = load_detector(model, labels=labels, threads=threads, conf_threshold=conf_threshold)
    class_filter = ClassFilter(classes, detector.labels)
    line_counters = [
        LineCounter(s.name, s.points[0], s.points[1], hysteresis=s.hysteresis, anchor=anchor)
        for s in lines
    ]
    # A zone exit is declared when a track is unseen for as long as the tracker
    # keeps lost tracks, so a brief occlusion is not an exit and a re-entry.
    tracker_config = (tracker or TrackerSpec()).config(fps)
    zone_counters = [
        ZoneCounter(
            s.name, list(s.points), anchor=anchor, exit_after_s=tracker_config.lost_buffer / fps
        )
        for s in zones
    ]
    lost_s = tracker_config.lost_buffer / fps
    return CameraPipeline(
        name,
        detector,
        class_filter,
        line_counters,
        zone_counters,
        tracker_config,
        speed=None
        if speed is None
        else SpeedEstimator(speed, anchor=anchor, forget_after_s=max(lost_s, 0.5)),
        stationary=None
        if stationary is None
        else StationaryFilter.from_spec(stationary, anchor=anchor),
    )
