"""A ByteTrack-style multi-object tracker.

Two-stage association (Zhang et al., ByteTrack, 2022): confident detections are
matched first to every live track by IoU against the Kalman prediction; the
low-confidence leftovers then rescue tracks that would otherwise be lost (occluded
people, blurred cars). New tracks start tentative and receive an id only once they
were matched on ``min_hits`` consecutive frames, so a one-frame false positive never
gets an id and can never be counted.

Association ignores labels: a detector that flickers between car and truck still
yields one track. Each track keeps a confidence-weighted vote over the classes it was
detected as, and reports the current winner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import kalman
from .detections import UNTRACKED, Detections

TENTATIVE, TRACKED, LOST = 0, 1, 2


@dataclass
class TrackerConfig:
    """Tuning knobs; defaults follow ByteTrack's published settings.

    Attributes:
        high_thresh: detections at or above this score take part in the first
            association and may start tracks.
        low_thresh: detections below this are ignored entirely.
        new_track_thresh: minimum score for a detection to start a new track.
        match_iou: minimum IoU for a first-stage match.
        low_match_iou: minimum IoU for a second-stage (low score) match.
        tentative_match_iou: minimum IoU to continue a tentative track.
        min_hits: consecutive matched frames before a track is confirmed.
        lost_buffer: frames a lost track is kept for re-identification; scale with fps.
    """

    high_thresh: float = 0.5
    low_thresh: float = 0.1
    new_track_thresh: float = 0.6
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    tentative_match_iou: float = 0.3
    min_hits: int = 2
    lost_buffer: int = 30

    @classmethod
    def for_fps(cls, fps: float, **overrides) -> TrackerConfig:
        """Settings with the lost-track buffer covering about one second of video."""
        overrides.setdefault("lost_buffer", max(5, round(fps)))
        return cls(**overrides)


@dataclass
class _Track:
    mean: np.ndarray
    cov: np.ndarray
    box: np.ndarray
    score: float
    state: int = TENTATIVE
    track_id: int = UNTRACKED
    hits: int = 1
    last_frame: int = 0
    votes: dict[int, float] = field(default_factory=dict)

    def vote(self, class_id: int, score: float) -> None:
        self.votes[class_id] = self.votes.get(class_id, 0.0) + score

    @property
    def class_id(self) -> int:
        return max(self.votes.items(), key=lambda kv: kv[1])[0]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _match(iou: np.ndarray, min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Optimal assignment keeping only pairs with IoU >= min_iou."""
    rows, cols = iou.shape
    if rows == 0 or cols == 0:
        return [], list(range(rows)), list(range(cols))
    r, c = linear_sum_assignment(-iou)
    pairs = [(i, j) for i, j in zip(r, c, strict=True) if iou[i, j] >= min_iou]
    matched_r = {i for i, _ in pairs}
    matched_c = {j for _, j in pairs}
    return (
        pairs,
        [i for i in range(rows) if i not in matched_r],
        [j for j in range(cols) if j not in matched_c],
    )


class ByteTracker:
    """Assigns stable ids to detections frame by frame.

    ``update`` returns the confirmed tracks matched in this frame: the detection's box
    and score, the track's voted class and its id. Unconfirmed and lost tracks are not
    returned, so everything downstream sees only objects with a real id.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self.frame = 0

    @property
    def active_ids(self) -> set[int]:
        """Ids of confirmed tracks that are still alive (tracked or lost)."""
        return {t.track_id for t in self._tracks if t.track_id != UNTRACKED}

    def update(self, dets: Detections) -> Detections:
        cfg = self.config
        self.frame += 1
        keep = dets.confidence >= cfg.low_thresh
        boxes = dets.xyxy[keep].astype(np.float64)
        scores = dets.confidence[keep]
        classes = dets.class_id[keep]
        high = scores >= cfg.high_thresh

        self._predict()
        confirmed = [t for t in self._tracks if t.state in (TRACKED, LOST)]
        tentative = [t for t in self._tracks if t.state == TENTATIVE]

        # Stage 1: confident detections against every confirmed track (tracked or lost).
        high_idx = np.flatnonzero(high)
        pairs, free_tracks, free_high = _match(
            iou_matrix(self._boxes(confirmed), boxes[high_idx]), cfg.match_iou
        )
        matched: list[tuple[_Track, int]] = [(confirmed[i], high_idx[j]) for i, j in pairs]

        # Stage 2: low-score detections only rescue tracks that were tracked last frame.
        low_idx = np.flatnonzero(~high)
        remaining = [confirmed[i] for i in free_tracks if confirmed[i].state == TRACKED]
        pairs2, free2, _ = _match(
            iou_matrix(self._boxes(remaining), boxes[low_idx]), cfg.low_match_iou
        )
        matched += [(remaining[i], low_idx[j]) for i, j in pairs2]
        for i in free2:
            remaining[i].state = LOST

        # Tentative tracks continue only with confident detections.
        left_high = high_idx[free_high]
        pairs3, free_tent, free_new = _match(
            iou_matrix(self._boxes(tentative), boxes[left_high]), cfg.tentative_match_iou
        )
        matched += [(tentative[i], left_high[j]) for i, j in pairs3]
        dead = {id(tentative[i]) for i in free_tent}

        self._apply_matches(matched, boxes, scores, classes)
        self._tracks = [
            t
            for t in self._tracks
            if id(t) not in dead and self.frame - t.last_frame <= cfg.lost_buffer
        ]
        for j in left_high[free_new]:
            if scores[j] >= cfg.new_track_thresh:
                self._start_track(boxes[j], float(scores[j]), int(classes[j]))

        out = [(t, j) for t, j in matched if t.state == TRACKED]
        if not out:
            return Detections.empty(dets.names)
        rows = np.array([j for _, j in out])
        return Detections(
            boxes[rows].astype(np.float32),
            scores[rows],
            np.array([t.class_id for t, _ in out], np.int32),
            np.array([t.track_id for t, _ in out], np.int64),
            dets.names,
        )

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _boxes(tracks: list[_Track]) -> np.ndarray:
        if not tracks:
            return np.zeros((0, 4))
        return kalman.xyah_to_xyxy(np.stack([t.mean[:4] for t in tracks]))

    def _predict(self) -> None:
        if not self._tracks:
            return
        mean = np.stack([t.mean for t in self._tracks])
        cov = np.stack([t.cov for t in self._tracks])
        # A lost track's height velocity is frozen so its predicted box does not
        # collapse or explode while nothing corrects it.
        for k, t in enumerate(self._tracks):
            if t.state != TRACKED:
                mean[k, 7] = 0
        mean, cov = kalman.predict(mean, cov)
        for k, t in enumerate(self._tracks):
            t.mean, t.cov = mean[k], cov[k]

    def _apply_matches(self, matched, boxes, scores, classes) -> None:
        if not matched:
            return
        tracks = [t for t, _ in matched]
        rows = np.array([j for _, j in matched])
        mean, cov = kalman.update(
            np.stack([t.mean for t in tracks]),
            np.stack([t.cov for t in tracks]),
            kalman.xyxy_to_xyah(boxes[rows]),
        )
        for k, (t, j) in enumerate(matched):
            t.mean, t.cov = mean[k], cov[k]
            t.box = boxes[j]
            t.score = float(scores[j])
            t.vote(int(classes[j]), float(scores[j]))
            t.hits = t.hits + 1 if t.last_frame == self.frame - 1 else 1
            t.last_frame = self.frame
            if t.state == TENTATIVE:
                if t.hits >= self.config.min_hits:
                    t.state = TRACKED
                    t.track_id = self._issue_id()
            else:
                t.state = TRACKED

    def _start_track(self, box: np.ndarray, score: float, class_id: int) -> None:
        mean, cov = kalman.initiate(kalman.xyxy_to_xyah(box[None, :]))
        track = _Track(mean[0], cov[0], box, score, last_frame=self.frame)
        track.vote(class_id, score)
        if self.config.min_hits <= 1:
            track.state = TRACKED
            track.track_id = self._issue_id()
        self._tracks.append(track)

    def _issue_id(self) -> int:
        tid = self._next_id
        self._next_id += 1
        return tid
