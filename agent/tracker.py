"""A ByteTrack-style multi-object tracker.

Two-stage association (Zhang et al., ByteTrack, 2022): confident detections are
matched first to every live track by IoU against the Kalman prediction; the
low-confidence leftovers then rescue tracks that would otherwise be lost (occluded
people, blurred cars). New tracks start tentative and receive an id only once they
were matched ``min_hits`` times (a few more when the detection that started them was
unsure), with at most ``tentative_misses`` missed frames in a row, so a one-frame
false positive never gets an id and can never be counted.
`ByteTracker.confirmed_origins` hands each newly confirmed track's first box to the
line counters, so the frames a track spent tentative do not hide a crossing.

With ``appearance`` (default; people only, torso colour histograms computed by the
pipeline, agent/appearance.py), association also weighs how alike a track and a
detection look, and a lost track is taken back only by a detection that looks like
it: without it, an id whose person left passes to whoever appears next nearby.
When the frame size is known (`CameraPipeline` sets ``frame_size``), a lost track
whose prediction has left the image is dropped at once, for the same reason. The
association steps themselves (IoU, assignment, the appearance gates, re-linking)
are functions on arrays in agent/association.py.

Association ignores labels: a detector that flickers between car and truck still
yields one track. Each track keeps a confidence-weighted vote over the classes it was
detected as, and reports the current winner (on a tie, the lower class id).

Speed: an edge device tracks about ten objects per frame, where the cost of a numpy
call, not arithmetic, dominates. So there are no per-track Python objects: all
tracks live in one float64 table (one row per track: the packed Kalman state of
:mod:`.kalman`, then state, id, hit count, last matched frame, last matched box,
first box and the class votes), and every step (predict, one IoU matrix for all
tracks against all detections, the association stages on blocks of it, the Kalman
update, births and deaths) is a fixed, small number of numpy calls over the whole
table. Assignment skips ``linear_sum_assignment`` when every track and detection has
at most one candidate above the IoU gate (usual with a few well-separated objects),
where the answer is those pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import kalman
from .association import NONE as _NONE
from .association import block_match as _block_match
from .association import iou_matrix, left_frame, look_match, relink
from .association import match as _match
from .detections import UNTRACKED, Detections

TENTATIVE, TRACKED, LOST = 0, 1, 2

# Columns of the track table after the packed Kalman state (kalman.STATE_COLS).
_STATE = kalman.STATE_COLS
_ID = _STATE + 1
_HITS = _STATE + 2
_LAST = _STATE + 3
_OBS = slice(_STATE + 4, _STATE + 8)  # the last matched detection box (xyxy)
_ORIGIN = slice(_STATE + 8, _STATE + 12)  # the detection box that started the track
_VOTES = _STATE + 12  # one column per class id, widened when a new class id appears

LOST_SECONDS = 3.0  # how long ``TrackerConfig.for_fps`` keeps a lost track
WEAK_BIRTH_SECONDS = 0.1  # ``for_fps``: the extra confirmation of a weakly started track
RELINK_HEIGHTS_PER_S = 1.5  # ``for_fps``: how far (box heights per second) a re-link reaches


def _flat(mask: np.ndarray) -> np.ndarray:
    """Indices of the true entries of a 1-D mask (np.flatnonzero without the ravel)."""
    return mask.nonzero()[0]


@dataclass
class TrackerConfig:
    """Tuning knobs.

    Defaults: ByteTrack's association gate (IoU >= 0.2) with the score thresholds of
    Roboflow's ByteTrack (0.6 to join the first stage, 0.7 to start a track), checked
    on MOT15 (``benchmarks/bench_tracker.py``: fewer false tracks than 0.5 / 0.6, the
    better MOTA and IDF1) and on the sample videos (YOLOv8n scores people at 0.9);
    SORT's confirmation on the third hit and Kalman-filtered output boxes (fewer false
    tracks, steadier feet points at a line); lost tracks kept three seconds and
    recovered by their last seen box (the ``recover_iou`` stage). Together these cut
    the MOT15 line-count error from 11.3% to 8.0% and raised MOTA from 0.364 to 0.383;
    letting a tentative track miss one frame took the count error to 6.7% (MOTA 0.382).
    Tracks started by a detection under 0.85 wait about 0.1 s more before they are
    confirmed: MOTA 0.3875 (SORT: 0.3842), fewer ID switches, and fewer count errors
    on the benchmark's held-out lines (59 against 62 of 599 crossings), at the cost of
    one of its 150 tuning-line crossings (11 against 10).

    Attributes:
        high_thresh: detections at or above this score take part in the first
            association and may start tracks.
        low_thresh: detections below this are ignored entirely.
        new_track_thresh: minimum score for a detection to start a new track.
        match_iou: minimum IoU for a first-stage match.
        low_match_iou: minimum IoU for a second-stage (low score) match.
        tentative_match_iou: minimum IoU to continue a tentative track.
        min_hits: matched frames before a track is confirmed.
        strong_birth_thresh: a track whose first detection scored under this is
            weakly started and needs ``weak_birth_hits`` more matched frames before
            it is confirmed: an unsure detection must be seen a little longer
            before it becomes an object with an id (on MOT15 such tracks are the
            short false ones that cost MOTA). Its crossings made meanwhile still
            count (`confirmed_origins`).
        weak_birth_hits: the extra matched frames of a weakly started track;
            ``for_fps`` sets about 0.1 s of frames (3 at 30 fps, 1 at 10 fps, none
            at 5 fps or less, where a fast object may be in view for a few frames
            only). 0 turns the rule off; it has no effect when ``min_hits`` is 1.
        tentative_misses: frames in a row a tentative track may go unmatched and
            still be confirmed later (its hits are kept); more misses end it. 1
            lets a detector that flickers on a person for a frame still start a
            track; 0 is ByteTrack's rule (the first miss ends a tentative track).
        lost_buffer: frames a lost track is kept for re-identification; scale with fps
            (``for_fps``: three seconds, which keeps a person's id through the
            occlusions that would otherwise split one walk across a line in two).
        filtered_boxes: output the Kalman-corrected box instead of the detection's
            box (steadier boxes and anchor points; False outputs the detector's box).
        recover_iou: minimum IoU between a confirmed track's last matched box and a
            confident detection left over by the other stages (observation-centric
            recovery, as in OC-SORT): brings back a person who stood still behind an
            occluder, where the Kalman prediction kept moving. 0 turns it off.
        appearance: use the torso colour histograms `update` is given
            (agent/appearance.py): a fifth stage re-links a confirmed track that
            matched nothing to a confident leftover detection that looks like it
            (Bhattacharyya coefficient >= ``relink_sim``), is about its height
            (0.7-1.43x) and within ``relink_radius + relink_speed x frames unseen``
            box heights of where the track was last seen; instead of a new id.
        relink_sim: lowest appearance similarity (0..1) for that re-link.
        relink_radius: how far (box heights) a re-linked detection may be from the
            track's last box at once.
        relink_speed: how much farther (box heights) per frame the track was unseen;
            ``for_fps`` sets 1.5 heights per second (a brisk walk).
        appearance_weight: with appearance, stages 1 and 2 maximise IoU + this x
            similarity over the pairs that pass the IoU gate.
        appearance_veto: with appearance, a tracked track and a detection less alike
            than this are never matched (a lost track needs ``relink_sim``).
    """

    high_thresh: float = 0.6
    low_thresh: float = 0.1
    new_track_thresh: float = 0.7
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    tentative_match_iou: float = 0.3
    min_hits: int = 3
    strong_birth_thresh: float = 0.85
    weak_birth_hits: int = 1
    tentative_misses: int = 1
    lost_buffer: int = 30
    filtered_boxes: bool = True
    recover_iou: float = 0.2
    appearance: bool = True
    relink_sim: float = 0.7
    relink_radius: float = 0.5
    relink_speed: float = 0.15
    appearance_weight: float = 0.5
    appearance_veto: float = 0.5

    @classmethod
    def for_fps(
        cls,
        fps: float,
        *,
        lost_s: float = LOST_SECONDS,
        weak_birth_s: float = WEAK_BIRTH_SECONDS,
        **overrides,
    ) -> TrackerConfig:
        """Settings for a camera at ``fps``: the lost-track buffer covers ``lost_s``
        seconds of video (at least 5 frames) and a weakly started track's extra
        confirmation ``weak_birth_s`` seconds; an explicit ``lost_buffer`` or
        ``weak_birth_hits`` override wins."""
        overrides.setdefault("lost_buffer", max(5, round(lost_s * fps)))
        overrides.setdefault("weak_birth_hits", round(weak_birth_s * fps))
        overrides.setdefault("relink_speed", RELINK_HEIGHTS_PER_S / max(fps, 1e-3))
        return cls(**overrides)


def _default(name: str, **limits) -> Any:
    """A `TrackerSpec` field whose default is `TrackerConfig`'s, so the two never differ."""
    return Field(getattr(TrackerConfig, name), **limits)


class TrackerSpec(BaseModel):
    """Tracker settings of one camera (config value; docs/counting.md, "Tracker settings").

    The keys are `TrackerConfig`'s, except that the two frame counts that depend on the
    camera's frame rate are given in seconds (``lost_s``, ``weak_birth_s``); `config`
    turns them into frames. Every default is the tracker's own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lost_s: float = Field(LOST_SECONDS, gt=0, le=600)
    weak_birth_s: float = Field(WEAK_BIRTH_SECONDS, ge=0, le=10)
    high_thresh: float = _default("high_thresh", ge=0, le=1)
    low_thresh: float = _default("low_thresh", ge=0, le=1)
    new_track_thresh: float = _default("new_track_thresh", ge=0, le=1)
    strong_birth_thresh: float = _default("strong_birth_thresh", ge=0, le=1)
    match_iou: float = _default("match_iou", gt=0, le=1)
    low_match_iou: float = _default("low_match_iou", gt=0, le=1)
    tentative_match_iou: float = _default("tentative_match_iou", gt=0, le=1)
    recover_iou: float = _default("recover_iou", ge=0, le=1)
    min_hits: int = _default("min_hits", ge=1, le=100)
    tentative_misses: int = _default("tentative_misses", ge=0, le=100)
    filtered_boxes: bool = _default("filtered_boxes")
    appearance: bool = _default("appearance")
    relink_sim: float = _default("relink_sim", gt=0, le=1)
    auto_thresholds: bool = Field(
        True,
        description="set high_thresh, new_track_thresh and strong_birth_thresh from the "
        "camera's own detection scores (agent/calibration.py); any of them given "
        "explicitly turns this off",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.low_thresh > self.high_thresh:
            raise ValueError(
                f"low_thresh {self.low_thresh:g} is above high_thresh {self.high_thresh:g}"
            )
        # Tracks are born only from confident detections left over by the first stage,
        # so a lower new_track_thresh would silently act as high_thresh.
        if self.new_track_thresh < self.high_thresh:
            raise ValueError(
                f"new_track_thresh {self.new_track_thresh:g} is below high_thresh "
                f"{self.high_thresh:g}: tracks start only from detections at or above "
                "high_thresh, so lower both"
            )
        return self

    def given(self) -> str:
        """The settings given explicitly, as ``key=value, ...`` ('' when none)."""
        values = self.model_dump(include=self.model_fields_set)
        return ", ".join(f"{k}={v}" for k, v in sorted(values.items()))

    def calibrates(self) -> bool:
        """Whether the score thresholds set themselves (none given explicitly)."""
        explicit = {"high_thresh", "new_track_thresh", "strong_birth_thresh"}
        return self.auto_thresholds and not explicit & self.model_fields_set

    def config(self, fps: float) -> TrackerConfig:
        """The tracker's settings for a camera delivering ``fps`` frames per second."""
        values = self.model_dump(exclude={"lost_s", "weak_birth_s", "auto_thresholds"})
        return TrackerConfig.for_fps(
            fps, lost_s=self.lost_s, weak_birth_s=self.weak_birth_s, **values
        )


def _voted(rows: np.ndarray) -> np.ndarray:
    """Each track row's class: the most score-weighted votes (a tie: the lower id)."""
    if rows.shape[1] == _VOTES + 1:  # only class 0 seen so far
        return np.zeros(len(rows), np.int32)
    return rows[:, _VOTES:].argmax(axis=1).astype(np.int32)


class ByteTracker:
    """Assigns stable ids to detections frame by frame.

    ``update`` returns the confirmed tracks matched in this frame: the detection's box
    and score, the track's voted class and its id. Unconfirmed and lost tracks are not
    returned, so everything downstream sees only objects with a real id.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._table = np.zeros((0, _VOTES + 1))
        self._next_id = 1
        self.frame = 0
        self._origins: Detections | None = None
        # Appearance of each track row (unit vectors), kept once `update` got any.
        self._feat: np.ndarray | None = None
        self.frame_size: tuple[int, int] | None = None
        """(width, height) of the frames, when known (`CameraPipeline` sets it): a lost
        track whose predicted centre has left the image is dropped at once."""

    @property
    def active_ids(self) -> set[int]:
        """Ids of confirmed tracks that are still alive (tracked or lost)."""
        ids = self._table[:, _ID]
        return {int(i) for i in ids[ids != UNTRACKED]}

    def __len__(self) -> int:
        """Live tracks, tentative ones included."""
        return len(self._table)

    def confirmed_origins(self) -> Detections | None:
        """The tracks the last ``update`` confirmed, each at the box that started it.

        A track spends ``min_hits - 1`` frames tentative, without an id, before it
        is confirmed; an object that crossed a line in those frames (a fast car at
        a low frame rate, a person first seen just before a line) would be first
        seen by a line counter already on the far side. `LineCounter.seed` takes a
        new track's starting side from here instead. None when no track was
        confirmed in the last update.
        """
        return self._origins

    def update(self, dets: Detections, appearance: np.ndarray | None = None) -> Detections:
        """Associate one frame's detections; ``appearance`` (optional, one row per
        detection, from `appearance.torso_histograms`) is used when
        ``config.appearance`` is on."""
        cfg = self.config
        feats = appearance if cfg.appearance else None
        if feats is not None and self._feat is None:
            self._feat = np.zeros((len(self._table), feats.shape[1]), np.float32)
        self.frame += 1
        self._origins = None
        scores, classes, boxes = dets.confidence, dets.class_id, dets.xyxy
        n = len(scores)
        all_high = False
        if n:
            lowest = scores.min()
            all_high = lowest >= cfg.high_thresh
            if lowest < cfg.low_thresh:
                keep = scores >= cfg.low_thresh
                scores, classes, boxes = scores[keep], classes[keep], boxes[keep]
                if feats is not None:
                    feats = feats[keep]
                n = len(scores)
            if n and classes.max() >= self._table.shape[1] - _VOTES:
                self._widen(int(classes.max()) + 1)
        # Boxes stay float32: mixed with the float64 track table, numpy computes the
        # IoU in float64 anyway, and the output keeps the detector's dtype.
        table = self._table

        if len(table):
            # A lost track's height velocity is frozen so its predicted box does not
            # collapse or explode while nothing corrects it.
            table[table[:, _STATE] != TRACKED, 7] = 0
            kalman.predict(table)
        if not n:
            return self._no_detections(dets.names)

        state = table[:, _STATE]
        iou = iou_matrix(kalman.xyah_to_xyxy(table[:, :4]), boxes)
        if all_high:
            high = np.ones(n, bool)
            high_idx = np.arange(n)
        else:
            high = scores >= cfg.high_thresh
            high_idx = _flat(high)
        confirmed = state != TENTATIVE
        all_confirmed = bool(confirmed.all())

        # Stage 1: confident detections against every confirmed track (tracked or lost).
        if feats is not None:
            # With appearance, the pairs that overlap enough are weighed by how alike
            # they look, and a pair that looks nothing alike is not a pair: when two
            # people's boxes overlap, each track keeps to its own person.
            m1_t, m1_d = self._look_match(iou, _flat(confirmed), high_idx, feats, cfg.match_iou)
        elif all_confirmed and all_high:
            m1_t, m1_d = _match(iou, cfg.match_iou)
        else:
            m1_t, m1_d = _block_match(iou, _flat(confirmed), high_idx, cfg.match_iou)

        # Stage 2: low-score detections only rescue tracks that were tracked last frame.
        was_tracked = state == TRACKED
        free_track = np.ones(len(table), bool)
        free_track[m1_t] = False
        remaining = _flat(free_track & was_tracked)
        if all_high:
            m2_t, m2_d = _NONE, _NONE
        elif feats is not None:
            m2_t, m2_d = self._look_match(iou, remaining, _flat(~high), feats, cfg.low_match_iou)
        else:
            m2_t, m2_d = _block_match(iou, remaining, _flat(~high), cfg.low_match_iou)
        free_track[m2_t] = False

        # Tentative tracks continue only with confident detections.
        free_det = high  # not used as "high" from here on
        free_det[m1_d] = False
        left_high = _flat(free_det)
        if all_confirmed:
            m3_t, m3_d = _NONE, _NONE
        else:
            m3_t, m3_d = _block_match(iou, _flat(~confirmed), left_high, cfg.tentative_match_iou)
        free_det[m3_d] = False
        free_track[m3_t] = False

        # Stage 4: confident leftovers against the confirmed tracks still unmatched,
        # by IoU with the box they were last seen with rather than the prediction.
        m4_t, m4_d = _NONE, _NONE
        if cfg.recover_iou > 0 and free_det.any():
            orphans = _flat(free_track & confirmed)
            if len(orphans):
                left = _flat(free_det)
                last_seen = iou_matrix(table[orphans, _OBS], boxes[left])
                if feats is not None:
                    m4_t, m4_d = self._look_match(
                        last_seen, orphans, left, feats, cfg.recover_iou, block=True
                    )
                else:
                    r, c = _match(last_seen, cfg.recover_iou)
                    m4_t, m4_d = orphans[r], left[c]
                free_det[m4_d] = False
                free_track[m4_t] = False

        # Stage 5 (appearance): confident leftovers that look like a confirmed track
        # left unmatched, near where it was last seen, take its id back.
        if feats is not None and free_det.any():
            m4_t, m4_d = self._relink(free_track, confirmed, free_det, boxes, feats, m4_t, m4_d)

        # Tracks that were tracked and matched nothing are lost.
        table[free_track & was_tracked, _STATE] = LOST

        if len(m2_t) or len(m3_t) or len(m4_t):
            matched_t = np.concatenate((m1_t, m2_t, m4_t, m3_t))
            matched_d = np.concatenate((m1_d, m2_d, m4_d, m3_d))
        else:
            matched_t, matched_d = m1_t, m1_d
        n_confirmed = len(m1_t) + len(m2_t) + len(m4_t)
        if self._feat is not None and feats is not None and len(matched_t):
            # Appearance follows the track, from confident detections only (a
            # low-score box is usually part-hidden behind someone else).
            sure = scores[matched_d] >= cfg.high_thresh
            t, d = matched_t[sure], matched_d[sure]
            f = 0.9 * self._feat[t] + 0.1 * feats[d]
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)
            self._feat[t] = f
        out = self._apply_matches(
            matched_t, matched_d, n_confirmed, boxes, scores, classes, dets.names
        )

        self._drop_expired()
        births = _flat(free_det)
        if len(births):
            births = births[scores[births] >= cfg.new_track_thresh]
            if len(births):
                self._start_tracks(
                    boxes[births],
                    scores[births],
                    classes[births],
                    None if feats is None else feats[births],
                )

        rows, tids, voted, out_boxes = out
        if len(rows) == 0:
            return Detections.empty(dets.names)
        if out_boxes is None:
            out_boxes = boxes[rows]
        return Detections(out_boxes, scores[rows], voted, tids, dets.names)

    # -- internals ---------------------------------------------------------------

    def _look_match(self, iou, rows, cols, feats, min_iou, block=False):
        """`association.look_match` for track rows: a tracked track and a box less
        alike than ``appearance_veto`` are never a pair, and taking back a lost track
        is re-identification (``relink_sim``); a track or a box without colours
        passes."""
        cfg = self.config
        assert self._feat is not None
        lost = self._table[rows, _STATE] == LOST
        need = np.where(lost, cfg.relink_sim, cfg.appearance_veto)
        return look_match(
            iou, rows, cols, self._feat[rows], feats, need, min_iou, cfg.appearance_weight, block
        )

    def _relink(self, free_track, confirmed, free_det, boxes, feats, m4_t, m4_d):
        """Stage 5: returns stage 4's pairs plus the re-linked ones (see
        `TrackerConfig.appearance`); marks them matched in the two masks."""
        cfg = self.config
        orphans = _flat(free_track & confirmed)
        if not len(orphans):
            return m4_t, m4_d
        assert self._feat is not None
        left = _flat(free_det)
        r, c = relink(
            self._table[orphans, _OBS],
            self.frame - self._table[orphans, _LAST],
            self._feat[orphans],
            boxes[left],
            feats[left],
            radius=cfg.relink_radius,
            speed=cfg.relink_speed,
            min_sim=cfg.relink_sim,
        )
        if not len(r):
            return m4_t, m4_d
        free_det[left[c]] = False
        free_track[orphans[r]] = False
        return np.concatenate((m4_t, orphans[r])), np.concatenate((m4_d, left[c]))

    def _no_detections(self, names: tuple[str, ...]) -> Detections:
        """A frame without detections: tracked tracks become lost, expired ones go."""
        table = self._table
        if len(table):
            table[table[:, _STATE] == TRACKED, _STATE] = LOST
            self._drop_expired()
        return Detections.empty(names)

    def _drop_expired(self) -> None:
        """Drop tentative tracks unmatched for more than ``tentative_misses`` frames in
        a row and any track unmatched for more than ``lost_buffer`` frames."""
        table = self._table
        unmatched_for = self.frame - table[:, _LAST]
        drop = unmatched_for > self.config.lost_buffer
        drop |= (table[:, _STATE] == TENTATIVE) & (unmatched_for > self.config.tentative_misses)
        if self.frame_size is not None:
            # Whoever walked out of the picture is gone: kept for ``lost_buffer``, the
            # id would pass to the next person who comes in near where they left.
            lost = table[:, _STATE] == LOST
            if lost.any():
                drop |= lost & left_frame(table, self.frame_size)
        if drop.any():
            self._table = table[~drop]
            if self._feat is not None:
                self._feat = self._feat[~drop]

    def _apply_matches(self, track_rows, det_rows, n_confirmed, boxes, scores, classes, names):
        """Kalman-correct, vote, count hits and confirm the matched tracks.

        The first ``n_confirmed`` pairs hold confirmed tracks, the rest tentative ones.
        Returns (detection rows, track ids, voted classes, filtered boxes or None) of
        the matched tracks that are confirmed after this frame, in association order;
        the ones confirmed just now are also kept for `confirmed_origins`.
        """
        if len(track_rows) == 0:
            return _NONE, None, None, None
        table = self._table
        rows = table[track_rows]
        kalman.update(rows, kalman.xyxy_to_xyah(boxes[det_rows]))
        match_scores = scores[det_rows]
        if table.shape[1] == _VOTES + 1:  # only class 0 seen so far
            rows[:, _VOTES] += match_scores
        else:
            rows[np.arange(len(rows)), _VOTES + classes[det_rows]] += match_scores
        rows[:, _LAST] = self.frame
        rows[:, _OBS] = boxes[det_rows]
        rows[:n_confirmed, _STATE] = TRACKED
        if n_confirmed < len(rows):
            # Hits only matter while tentative (at most ``tentative_misses`` frames
            # in a row may separate them).
            tentative = rows[n_confirmed:]
            tentative[:, _HITS] += 1
            confirm = tentative[:, _HITS] >= self.config.min_hits
            k = int(np.count_nonzero(confirm))
            if k:
                tentative[confirm, _ID] = np.arange(self._next_id, self._next_id + k)
                tentative[confirm, _STATE] = TRACKED
                self._next_id += k
                confirmed = tentative[confirm]
                self._origins = Detections(
                    confirmed[:, _ORIGIN],
                    np.ones(k, np.float32),
                    _voted(confirmed),
                    confirmed[:, _ID],
                    names,
                )
            out = np.ones(len(rows), bool)
            out[n_confirmed:] = confirm
            table[track_rows] = rows
            rows, det_rows = rows[out], det_rows[out]
        else:
            table[track_rows] = rows
        voted = _voted(rows)
        filtered = None
        if self.config.filtered_boxes:
            filtered = kalman.xyah_to_xyxy(rows[:, :4], np.float32)
        return det_rows, rows[:, _ID].astype(np.int64), voted, filtered

    def _start_tracks(
        self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, feats=None
    ) -> None:
        k = len(boxes)
        if self._feat is not None:
            new_feat = np.zeros((k, self._feat.shape[1]), np.float32)
            if feats is not None:
                new_feat[:] = feats
            self._feat = np.concatenate((self._feat, new_feat))
        new = np.zeros((k, self._table.shape[1]))
        new[:, :_STATE] = kalman.initiate(kalman.xyxy_to_xyah(boxes))
        new[:, _OBS] = boxes
        new[:, _ORIGIN] = boxes
        if self.config.min_hits <= 1:
            new[:, _STATE : _LAST + 1] = (TRACKED, 0, 1, self.frame)
            new[:, _ID] = np.arange(self._next_id, self._next_id + k)
            self._next_id += k
        else:
            new[:, _STATE : _LAST + 1] = (TENTATIVE, UNTRACKED, 1, self.frame)
            if self.config.weak_birth_hits:
                # Hits start below 1, so confirmation (hits >= min_hits) comes later.
                weak = scores < self.config.strong_birth_thresh
                new[weak, _HITS] -= self.config.weak_birth_hits
        if new.shape[1] == _VOTES + 1:  # only class 0 seen so far
            new[:, _VOTES] = scores
        else:
            new[np.arange(k), _VOTES + classes] = scores
        self._table = np.concatenate((self._table, new)) if len(self._table) else new

    def _widen(self, n_classes: int) -> None:
        """Make room for class ids up to n_classes - 1 in the vote columns."""
        extra = n_classes - (self._table.shape[1] - _VOTES)
        self._table = np.hstack((self._table, np.zeros((len(self._table), extra))))
