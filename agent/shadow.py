"""Shadow comparison: a candidate model run beside the active one, never counting.

`ShadowRunner` holds one camera's candidate pipeline (its own detector, tracker and
line counters, built from the camera's own config) and sees every frame the active
pipeline processed, after it did (`on_frame`): the active model's crossings are
tallied on every frame, and every ``stride``-th frame (``stride = round(1 / share)``)
the candidate runs on the same image; its boxes are matched with the active model's
(`match_boxes`) and its crossings tallied apart. `take` turns the window into a
contract `ShadowWindow` (docs/protocol.md#shadow). Nothing here touches the
camera's count bins: only the active model counts.

The candidate's tracker is built for the frame rate it sees (the camera's divided by
the stride), so its tracks survive the gaps between its frames.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from flowfleet.contract_shadow import (
    IOU_THRESHOLD,
    ShadowDrift,
    ShadowLineCount,
    ShadowModel,
    ShadowWindow,
    ShadowZoneCount,
    agreement_of,
)

from .counting import LineCounter, StationaryFilter, ZoneCounter
from .detections import Detections
from .drift import DriftWindow, RecordingDetector
from .labels import ClassFilter
from .pipeline import CameraPipeline, FrameResult, calibrator_for

MAX_LATENCIES = 4096  # latency samples kept per window (median of the latest)


def stride_for(share: float) -> int:
    """Every how many frames the candidate runs for a share of frames (at least 1)."""
    return max(1, round(1.0 / share))


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4 xyxy) with every box of ``b`` (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(a: Detections, b: Detections, iou_threshold: float = IOU_THRESHOLD) -> int:
    """How many boxes of ``a`` and ``b`` pair up one to one: same class name, IoU
    above the threshold, greedily from the highest IoU (symmetric in a and b)."""
    if not len(a) or not len(b):
        return 0
    iou = _iou_matrix(np.asarray(a.xyxy, dtype=np.float64), np.asarray(b.xyxy, dtype=np.float64))
    same = np.asarray(a.class_names())[:, None] == np.asarray(b.class_names())[None, :]
    iou = np.where(same, iou, 0.0)
    pairs = np.argwhere(iou > iou_threshold)
    if not len(pairs):
        return 0
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_a, used_b, matched = set(), set(), 0
    for i, j in pairs[order]:
        if i in used_a or j in used_b:
            continue
        used_a.add(int(i))
        used_b.add(int(j))
        matched += 1
    return matched


def candidate_pipeline(config, detector, fps: float, stride: int) -> CameraPipeline:
    """A counting pipeline for ``detector`` with the camera's own classes, lines,
    zones, anchor, stationary filter and tracker settings (speed is left out: the
    comparison reports line and zone counts). Raises ValueError if the model cannot
    count the camera's classes."""
    class_filter = ClassFilter(config.classes, detector.labels)
    lines = [
        LineCounter(s.name, s.points[0], s.points[1], hysteresis=s.hysteresis, anchor=config.anchor)
        for s in config.lines
    ]
    seen_fps = max(fps / stride, 0.1)
    tracker_config = config.tracker.config(seen_fps)
    # As the camera's own pipeline: an exit once a track is unseen as long as the
    # tracker keeps lost tracks (at the frame rate the candidate sees).
    zones = [
        ZoneCounter(
            z.name,
            list(z.points),
            anchor=config.anchor,
            exit_after_s=tracker_config.lost_buffer / seen_fps,
        )
        for z in config.zones
    ]
    stationary = (
        None
        if config.stationary is None
        else StationaryFilter.from_spec(config.stationary, anchor=config.anchor)
    )
    return CameraPipeline(
        config.name,
        detector,
        class_filter,
        lines,
        zones,
        tracker_config,
        stationary=stationary,
        # The candidate sets its own score thresholds from its own scores, as the
        # active model's pipeline does (a new model may score the scene differently).
        calibrator=calibrator_for(config.tracker, tracker_config),
    )


class ShadowRunner:
    """One camera's shadow comparison (see the module docstring); thread-safe:
    `on_frame` runs on the camera's thread, `take` on the window loop's."""

    def __init__(
        self,
        camera: str,
        pipeline: CameraPipeline,
        *,
        share: float,
        active: ShadowModel,
        candidate: ShadowModel,
        start: float | None = None,
    ) -> None:
        self.camera = camera
        self.pipeline = pipeline
        self.share = share
        self.stride = stride_for(share)
        self.active = active
        self.candidate = candidate
        # The candidate's raw output (before class filtering) is binned as the agent's
        # drift summaries are, so the registry can judge it against the candidate's
        # own drift baseline: "the previous model shows the same change".
        if not isinstance(pipeline.detector, RecordingDetector):
            pipeline.detector = RecordingDetector(pipeline.detector)
        self._lock = threading.Lock()
        self._seen = 0  # frames since the runner started (picks the compared ones)
        self._reset(time.time() if start is None else start)

    def _reset(self, start: float) -> None:
        self.start = start
        self.frames = 0
        self.compared = 0
        self.boxes_active = 0
        self.boxes_candidate = 0
        self.matched = 0
        self.lines: dict[tuple[str, str], list[int]] = {}
        # (zone, class) -> [active entries, candidate entries, active occupancy sum,
        # candidate occupancy sum] (occupancy summed over the compared frames)
        self.zones: dict[tuple[str, str], list[float]] = {}
        self.ms_active: list[float] = []
        self.ms_candidate: list[float] = []
        self.drift = DriftWindow(self.camera, None, start)

    def _tally(self, crossings, offset: int) -> None:
        for c in crossings:
            row = self.lines.setdefault((c.line, c.class_name), [0, 0, 0, 0])
            row[offset + (0 if c.direction == "in" else 1)] += 1

    def _zone_row(self, zone: str, cls: str) -> list[float]:
        return self.zones.setdefault((zone, cls), [0, 0, 0.0, 0.0])

    def _tally_zones(self, result: FrameResult, side: int, occupancy: bool) -> None:
        for e in result.zone_events:
            if e.kind == "entry":
                self._zone_row(e.zone, e.class_name)[side] += 1
        if occupancy:
            for zone, by_class in result.occupancy.items():
                for cls, n in by_class.items():
                    self._zone_row(zone, cls)[2 + side] += n

    def on_frame(self, image: np.ndarray, ts: float, active: FrameResult) -> bool:
        """Account one frame the active pipeline processed; run the candidate on it if
        it is a compared frame (returns whether it was). Exceptions of the candidate
        propagate: the caller stops the comparison, counting goes on."""
        compare = self._seen % self.stride == 0
        self._seen += 1
        result = self.pipeline.process(image, ts) if compare else None
        with self._lock:
            self.frames += 1
            self._tally(active.crossings, 0)
            self._tally_zones(active, 0, occupancy=result is not None)
            if result is None:
                return False
            self.compared += 1
            self._tally(result.crossings, 2)
            self._tally_zones(result, 1, occupancy=True)
            self.boxes_active += len(active.detections)
            self.boxes_candidate += len(result.detections)
            self.drift.add(self.pipeline.detector.last, image, result.inference_s)
            self.matched += match_boxes(active.detections, result.detections)
            if len(self.ms_active) < MAX_LATENCIES:
                self.ms_active.append(1000.0 * active.inference_s)
                self.ms_candidate.append(1000.0 * result.inference_s)
        return True

    def declare_lines(self, classes) -> None:
        """Rows of zeros for every line and zone and counted class (a quiet one reports 0)."""
        with self._lock:
            for line in self.pipeline.lines:
                for cls in classes:
                    self.lines.setdefault((line.name, cls), [0, 0, 0, 0])
            for zone in self.pipeline.zones:
                for cls in classes:
                    self._zone_row(zone.name, cls)

    def take(self, device: str, end: float) -> ShadowWindow | None:
        """The window's comparison (seq placeholder 1), and start the next; None when
        no frame arrived in it."""
        with self._lock:
            if not self.frames:
                self.start = end
                return None
            n = max(1, self.compared)
            raw = self.drift.take("shadow", end)
            window = ShadowWindow(
                device=device,
                seq=1,
                camera=self.camera,
                start=round(self.start, 3),
                end=round(max(end, self.start), 3),
                active=self.active,
                candidate=self.candidate,
                share=self.share,
                frames=self.frames,
                frames_compared=self.compared,
                lines=tuple(
                    ShadowLineCount(
                        line=line,
                        class_=cls,
                        active_in=v[0],
                        active_out=v[1],
                        candidate_in=v[2],
                        candidate_out=v[3],
                    )
                    for (line, cls), v in sorted(self.lines.items())
                ),
                zones=tuple(
                    ShadowZoneCount(
                        zone=zone,
                        class_=cls,
                        active_entries=int(v[0]),
                        candidate_entries=int(v[1]),
                        active_occupancy=round(v[2] / n, 4),
                        candidate_occupancy=round(v[3] / n, 4),
                    )
                    for (zone, cls), v in sorted(self.zones.items())
                ),
                detections_per_frame_active=round(self.boxes_active / n, 4),
                detections_per_frame_candidate=round(self.boxes_candidate / n, 4),
                boxes_active=self.boxes_active,
                boxes_candidate=self.boxes_candidate,
                matched=self.matched,
                agreement=agreement_of(self.matched, self.boxes_active, self.boxes_candidate),
                latency_ms_active=_median(self.ms_active),
                latency_ms_candidate=_median(self.ms_candidate),
                candidate_drift=None
                if raw is None
                else ShadowDrift(
                    frames=raw.frames,
                    detections=raw.detections,
                    confidence_hist=raw.confidence_hist,
                    class_mix=raw.class_mix,
                ),
            )
            self._reset(end)
            return window

    def close(self) -> None:
        """Release the candidate's detector."""
        self.pipeline.detector.close()


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None
