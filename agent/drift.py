"""Per-camera drift summaries: what the detector saw in a window, without images.

`RecordingDetector` wraps a camera's detector and keeps the raw detections of the
last frame (before class filtering: drift is about the model's output); `DriftWindow`
accumulates them per frame with the inference latency and two cheap image figures
(mean brightness and the variance of the Laplacian as a blur measure, both on a
downscaled grey copy), and turns a window into a contract `DriftSummary` with fixed
histogram bins so the registry can compare windows bin by bin.
"""

from __future__ import annotations

import threading
from collections import Counter

import cv2
import numpy as np

from flowfleet.contract import CONFIDENCE_EDGES, DETECTIONS_EDGES, DriftSummary

from .detections import Detections

IMAGE_FIGURES_WIDTH = 160  # brightness / blur on a copy about this wide
IMAGE_FIGURES_EVERY = 10  # ... on every 10th frame
MAX_CLASSES = 32  # class_mix keeps the most frequent labels


class RecordingDetector:
    """Forwards everything to ``inner``; remembers the last `detect()` result."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.last: Detections | None = None

    def detect(self, frame_bgr):
        self.last = self._inner.detect(frame_bgr)
        return self.last

    def __getattr__(self, name):
        return getattr(self._inner, name)


def image_figures(image: np.ndarray) -> tuple[float, float]:
    """(mean brightness 0..255, variance of the Laplacian) on a small grey copy.

    The copy is a strided subsample (no filtering: cheap, and the blur measure is
    compared between windows of the same camera, not as an absolute).
    """
    step = max(1, image.shape[1] // IMAGE_FIGURES_WIDTH)
    small = np.ascontiguousarray(image[::step, ::step])
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
    return float(grey.mean()), float(cv2.Laplacian(grey, cv2.CV_32F).var())


class DriftWindow:
    """Thread-safe accumulator; `add` per frame, `take` at the window's end."""

    def __init__(self, camera: str, model: str | None, start: float) -> None:
        self.camera = camera
        self.model = model
        self._lock = threading.Lock()
        self._reset(start)

    def _reset(self, start: float) -> None:
        self.start = start
        self.frames = 0
        self.detections = 0
        self.conf_hist = np.zeros(len(CONFIDENCE_EDGES) - 1, dtype=np.int64)
        self.det_hist = np.zeros(len(DETECTIONS_EDGES), dtype=np.int64)
        self.classes: Counter[str] = Counter()
        self.area_sum = 0.0
        self.latencies: list[float] = []
        self.brightness_sum = 0.0
        self.blur_sum = 0.0
        self.image_n = 0

    def add(self, dets: Detections | None, image: np.ndarray, inference_s: float) -> None:
        figures = image_figures(image) if self.frames % IMAGE_FIGURES_EVERY == 0 else None
        h, w = image.shape[:2]
        n = 0 if dets is None else len(dets)
        with self._lock:
            self.frames += 1
            self.latencies.append(inference_s * 1000.0)
            if figures is not None:
                self.brightness_sum += figures[0]
                self.blur_sum += figures[1]
                self.image_n += 1
            self.det_hist[np.searchsorted(DETECTIONS_EDGES, n, side="right") - 1] += 1
            if not n:
                return
            self.detections += n
            conf = np.clip(np.asarray(dets.confidence, dtype=np.float64), 0.0, 1.0)
            idx = np.minimum((conf * 10).astype(np.int64), len(self.conf_hist) - 1)
            self.conf_hist += np.bincount(idx, minlength=len(self.conf_hist))
            xyxy = np.asarray(dets.xyxy, dtype=np.float64)
            areas = np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(
                xyxy[:, 3] - xyxy[:, 1], 0, None
            )
            self.area_sum += float(areas.sum()) / max(1.0, float(w * h))
            self.classes.update(dets.class_names())

    def take(self, device: str, end: float) -> DriftSummary | None:
        """The window's summary (seq placeholder 1), and start the next; None if no frames."""
        with self._lock:
            return self._take(device, end)

    def switch(self, device: str, model: str | None, at: float) -> DriftSummary | None:
        """Close the window at a model swap and open the next one under ``model``.

        Returns the closed window's summary (None if it had no frames, or if the
        window already belongs to ``model``: a second call for the same swap is a
        no-op). The caller holds the camera's lock, so no frame falls on the wrong
        side of the swap.
        """
        with self._lock:
            if model == self.model:
                return None
            summary = self._take(device, at)
            self.model = model
            return summary

    def _take(self, device: str, end: float) -> DriftSummary | None:
        if not self.frames:
            self.start = end
            return None
        lat = np.asarray(self.latencies)
        p50, p90, p99 = (float(np.percentile(lat, q)) for q in (50, 90, 99))
        summary = DriftSummary(
            device=device,
            seq=1,
            camera=self.camera,
            model=self.model,
            start=round(self.start, 3),
            end=round(max(end, self.start), 3),
            frames=self.frames,
            detections=self.detections,
            confidence_hist=tuple(int(v) for v in self.conf_hist),
            detections_per_frame=round(self.detections / self.frames, 4),
            detections_hist=tuple(int(v) for v in self.det_hist),
            class_mix=dict(self.classes.most_common(MAX_CLASSES)),
            mean_box_area=(
                min(1.0, round(self.area_sum / self.detections, 6)) if self.detections else None
            ),
            latency_ms_p50=round(p50, 3),
            latency_ms_p90=round(p90, 3),
            latency_ms_p99=round(p99, 3),
            brightness=round(self.brightness_sum / self.image_n, 2) if self.image_n else None,
            blur=round(self.blur_sum / self.image_n, 2) if self.image_n else None,
        )
        self._reset(end)
        return summary
