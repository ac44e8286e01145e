"""One camera's per-frame work: detect -> filter classes -> track -> count.

Counting: stationary tracks are dropped first (when configured), then lines, zones
and speed see the same tracked Detections. A line crossing also records the
track's speed at that moment when the camera measures speed.

`CameraPipeline.process` takes a frame and returns what happened in it; the caller
(the offline counter or the agent service) decides where the counts go.

Score thresholds that set themselves (`calibration.ScoreCalibrator`, on unless a
camera configures a score threshold): the first frames' detections are held back
until the camera's own scores say where its thresholds lie, then tracked and
counted in one go (their crossings come back from the frame that ended the warm-up,
each with its own timestamp); `finish` does the same when the source ends first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .appearance import DIM, torso_histograms
from .calibration import SCORE_KEYS, ScoreCalibrator
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
    # The end of a threshold warm-up: each held-back frame's own result, in order
    # (their crossings, zone events and speeds are also in the fields above).
    replayed: list[FrameResult] = field(default_factory=list)


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
        calibrator: ScoreCalibrator | None = None,
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
        self.calibrator = calibrator
        labels = [n.lower() for n in class_filter.labels]
        self._person = labels.index("person") if "person" in labels else -1
        # Frames (detections, ts) held back while the calibrator warms up; None after.
        self._held: list[tuple] | None = [] if calibrator else None  # (dets, ts, feats)

    def thresholds(self) -> dict:
        """The tracker's score thresholds now and where they come from: ``mode`` is
        ``auto`` (calibrated, with the median persistent score and the sample count),
        ``warming_up`` or ``config`` (set explicitly, or calibration turned off)."""
        cfg = self.tracker.config
        if self.calibrator is None:
            return {"mode": "config", **{k: getattr(cfg, k) for k in SCORE_KEYS}}
        return self.calibrator.report()

    def _apply_thresholds(self) -> None:
        assert self.calibrator is not None and self.calibrator.chosen is not None
        for key, value in self.calibrator.chosen.items():
            setattr(self.tracker.config, key, value)

    @property
    def counted_classes(self) -> list[str]:
        return list(self.class_filter.names)

    def process(self, image: np.ndarray, ts: float) -> FrameResult:
        t0 = time.perf_counter()
        dets = self.class_filter.apply(self.detector.detect(image))
        infer = time.perf_counter() - t0
        self.stats.frames += 1
        self.stats.inference_s += infer
        self.stats.last_inference_s = infer
        self.stats.detections += len(dets)
        if image is not None:
            self.tracker.frame_size = (image.shape[1], image.shape[0])
        feats = None  # torso colours, for a tracker that uses appearance
        if self.tracker.config.appearance and image is not None and len(dets):
            # Only people have a torso; other objects get no colours and are
            # associated by motion alone, as without appearance.
            people = dets.class_id == self._person
            if people.any():
                feats = np.zeros((len(dets), DIM), np.float32)
                feats[people] = torso_histograms(image, dets.xyxy[people])
        if self.calibrator is not None:
            self.calibrator.observe(dets, ts)
            if self._held is not None:
                self._held.append((dets, ts, feats))
                if not self.calibrator.warmup_done(ts):
                    empty = Detections.empty(dets.names)
                    occupancy = {z.name: z.occupancy_by_class() for z in self.zones}
                    return FrameResult(dets, empty, [], [], occupancy, infer)
                return self._release(infer)
            if self.calibrator.recheck(ts):
                self._apply_thresholds()
        return self._track(dets, ts, infer, feats)

    def finish(self, ts: float) -> FrameResult | None:
        """At the end of the source: calibrate from what was seen and count the
        frames still held back by the warm-up (None when there are none)."""
        if self._held is None or self.calibrator is None:
            return None
        if not self._held:
            self._held = None
            return None
        self.calibrator.warmup_done(ts, final=True)
        return self._release(0.0)

    def _release(self, infer: float) -> FrameResult:
        """Set the calibrated thresholds, then track and count the held-back frames;
        one result: their crossings, zone events and speeds, the last frame's
        detections and occupancy, every replayed frame's tracked objects."""
        self._apply_thresholds()
        held, self._held = self._held or [], None
        results = [self._track(d, t, 0.0, f) for d, t, f in held]
        last = results[-1]
        return FrameResult(
            last.detections,
            Detections.concat([r.tracked for r in results], last.detections.names),
            [c for r in results for c in r.crossings],
            [z for r in results for z in r.zone_events],
            last.occupancy,
            infer,
            [s for r in results for s in r.speeds],
            results,
        )

    def _track(self, dets: Detections, ts: float, infer: float, feats=None) -> FrameResult:
        """Track and count one frame's detections."""
        tracked = self.tracker.update(dets, feats)
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
    spec = tracker or TrackerSpec()
    tracker_config = spec.config(fps)
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
        calibrator=calibrator_for(spec, tracker_config),
    )


def calibrator_for(spec: TrackerSpec, config: TrackerConfig) -> ScoreCalibrator | None:
    """The score calibrator of a camera with these tracker settings (None: its score
    thresholds are configured, or calibration is turned off)."""
    if not spec.calibrates():
        return None
    return ScoreCalibrator({k: getattr(config, k) for k in SCORE_KEYS})
