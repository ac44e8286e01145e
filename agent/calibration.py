"""Tracker score thresholds that set themselves from a camera's own scores.

The tracker's defaults (0.6 to join the first association, 0.7 to start a track,
0.85 for a strong start) assume a model that scores its objects like YOLOv8n scores
people seen from the side (0.9 and more). The same model scores cars seen from above
around 0.3, people on an elevated plaza camera around 0.75: with the defaults, such a
camera misses objects. `ScoreCalibrator` watches the scores of the detections that
persist from one frame to the next (a box overlapping one of the previous frame's at
IoU >= 0.3: objects, not one-frame clutter) and scales the three thresholds by

    f = clamp(median persistent score / REFERENCE, FLOOR, 1)

so a camera whose objects score like the defaults assume (median >= 0.8) keeps them
exactly, and one whose objects score lower gets proportionally lower thresholds, never
below FLOOR times the defaults (0.3 / 0.35 / 0.425), under which clutter would start
tracks. Measured on the sample videos and PETS09-S2L1 (docs/benchmarks.md,
"Thresholds that set themselves").

`CameraPipeline` uses it in two phases:

* **warm-up**: the first frames' detections are held back (not the images: a few
  boxes per frame) until ``min_samples`` persistent detections were seen, or
  ``max_warmup_s`` passed; then the thresholds are set and the held-back frames are
  tracked and counted, so an object that crossed a line during the warm-up still
  counts. Counts of the warm-up arrive late by that time, not lost.
* **re-check**: every ``recheck_s`` the thresholds are computed again from the
  persistent scores of that period (when it had ``min_samples``) and replaced when
  one moved by ``RECHECK_STEP`` or more (a scene that got darker, a new model).

An explicitly configured score threshold (``high_thresh``, ``new_track_thresh``,
``strong_birth_thresh``) turns calibration off: the configured values win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .detections import Detections

REFERENCE = 0.8  # median persistent score at or above which the defaults stand
FLOOR = 0.5  # the lowest scale applied to the defaults
PERSIST_IOU = 0.3  # overlap with a box of the previous frame that makes a detection persistent
RECHECK_STEP = 0.05  # change of a threshold that makes a re-check replace it
BINS = 100

SCORE_KEYS = ("high_thresh", "new_track_thresh", "strong_birth_thresh")


def _iou_any(a: np.ndarray, b: np.ndarray, min_iou: float) -> np.ndarray:
    """For each box of ``a``: does it overlap some box of ``b`` at IoU >= min_iou?"""
    wh = np.minimum(a[:, None, 2:], b[:, 2:]) - np.maximum(a[:, None, :2], b[:, :2])
    np.maximum(wh, 0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b - inter
    return (inter >= min_iou * np.maximum(union, 1e-9)).any(axis=1)


def thresholds_for(median: float, defaults: dict[str, float]) -> dict[str, float]:
    """The three score thresholds for a camera whose persistent detections have this
    median score (rounded to 0.01)."""
    scale = min(1.0, max(FLOOR, median / REFERENCE))
    return {k: round(defaults[k] * scale, 2) for k in SCORE_KEYS}


@dataclass
class ScoreCalibrator:
    """Collects persistent detection scores and decides the tracker's thresholds.

    Attributes:
        defaults: the thresholds a camera scoring like YOLOv8n on people uses.
        min_samples: persistent detections needed to calibrate (and to re-check).
        max_warmup_s: the warm-up ends after this long even with fewer samples (with
            at least ``min_samples // 5`` it calibrates, else the defaults stay).
        recheck_s: seconds between re-checks (0: never).
    """

    defaults: dict[str, float]
    min_samples: int = 50
    max_warmup_s: float = 30.0
    recheck_s: float = 300.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    chosen: dict[str, float] | None = None
    median: float | None = None
    samples: int = 0
    calibrated_at: float | None = None
    _prev: np.ndarray | None = None
    _start: float | None = None

    def observe(self, dets: Detections, ts: float) -> None:
        """Count the scores of this frame's detections that persist from the last."""
        if self._start is None:
            self._start = ts
        boxes = dets.xyxy
        prev, self._prev = self._prev, boxes
        if prev is None or not len(boxes) or not len(prev):
            return
        keep = _iou_any(boxes, prev, PERSIST_IOU)
        if keep.any():
            bins = np.minimum((dets.confidence[keep] * BINS).astype(np.intp), BINS - 1)
            self.hist += np.bincount(bins, minlength=BINS)

    def _median(self) -> float:
        cum = np.cumsum(self.hist)
        return (int(np.searchsorted(cum, cum[-1] / 2)) + 0.5) / BINS

    def warmup_done(self, ts: float, *, final: bool = False) -> bool:
        """True once the warm-up may end (enough samples, time up, or ``final``: the
        source ended); sets ``chosen`` when it ends."""
        n = int(self.hist.sum())
        timed_out = self._start is not None and ts - self._start >= self.max_warmup_s
        if n < self.min_samples and not timed_out and not final:
            return False
        self._decide(ts, n, enough=max(1, self.min_samples // 5))
        return True

    def recheck(self, ts: float) -> bool:
        """At a re-check time, recompute from the period's scores; True when the
        thresholds changed."""
        if not self.recheck_s or self.calibrated_at is None:
            return False
        if ts - self.calibrated_at < self.recheck_s:
            return False
        before = self.chosen
        self._decide(ts, int(self.hist.sum()), enough=self.min_samples, keep=True)
        return self.chosen != before

    def _decide(self, ts: float, n: int, *, enough: int, keep: bool = False) -> None:
        if n >= enough:
            median = self._median()
            new = thresholds_for(median, self.defaults)
            if (
                not keep
                or self.chosen is None
                or any(abs(new[k] - self.chosen[k]) >= RECHECK_STEP - 1e-9 for k in SCORE_KEYS)
            ):
                self.chosen = new
            self.median, self.samples = median, n
        elif self.chosen is None:
            self.chosen = {k: self.defaults[k] for k in SCORE_KEYS}
            self.median, self.samples = None, n
        self.calibrated_at = ts
        self.hist[:] = 0

    def report(self) -> dict:
        """What was chosen and from what (for `flowfleet count` and the health beat)."""
        return {
            "mode": "auto" if self.chosen is not None else "warming_up",
            **(self.chosen or {}),
            "median_score": None if self.median is None else round(self.median, 3),
            "samples": self.samples,
        }
