"""Ground speed from a 4-point image-to-ground homography.

Calibration: four points on the ground plane, each given twice: where it is in the
image (pixels) and where it is on the ground (metres, in any flat x/y frame you
measured, e.g. lane markings 3.5 m apart and dashes 12 m apart). From them
``cv2.getPerspectiveTransform`` gives the homography that maps an object's anchor
point (bottom centre of its box: where it touches the ground) to metres.

Per track, speed is the ground distance covered over a sliding window
(``window_s``, default 1 s) divided by the time it took: each frame whose window is
at least 80 % full gives one *sample*. A track's speed is the median of its samples,
reported in km/h with the sample count. A track with fewer than ``min_samples``
samples is reported as *insufficient samples* (``kmh`` is None), never as 0.

Speeds are reported twice: once per track when it ends (all measured tracks of a
camera) and once per line crossing (the smoothed speed at the moment the track
crossed, a "spot speed" as a traffic gantry measures it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import combinations
from typing import Annotated

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowfleet import speedhist
from flowfleet.cliutil import first_problem
from flowfleet.contract import MAX_SPEED_KMH

from .detections import Detections

Point = tuple[float, float]
INSUFFICIENT = "insufficient samples"

# Points closer to a line through two others than this (in their own units, relative
# to the spread of the points) count as collinear: the homography would be unstable.
_COLLINEAR_REL = 0.01


class HomographyError(ValueError):
    """A calibration that cannot give a usable homography; the message says why."""


def _check_points(points: tuple[Point, ...], what: str) -> None:
    pts = np.asarray(points, np.float64)
    if not np.isfinite(pts).all():
        raise ValueError(f"{what} points must be finite numbers")
    for i, j in combinations(range(4), 2):
        if np.hypot(*(pts[i] - pts[j])) == 0:
            raise ValueError(f"{what} points {i + 1} and {j + 1} are the same point")
    spread = float(np.ptp(pts, axis=0).max())
    for trio in combinations(range(4), 3):
        a, b, c = pts[list(trio)]
        # Distance of c from the line a-b, and the other two ways round: the triangle's
        # smallest height. Zero (or nearly) means the three points are on one line.
        area2 = abs((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))
        longest = max(np.hypot(*(b - a)), np.hypot(*(c - a)), np.hypot(*(c - b)))
        if area2 / longest <= _COLLINEAR_REL * spread:
            names = ", ".join(str(k + 1) for k in trio)
            raise ValueError(
                f"{what} points {names} are collinear (on one line): choose 4 points "
                "with no three on a line, e.g. the corners of a lane section"
            )


class HomographySpec(BaseModel):
    """Four ground points, each as image pixels and ground metres (same order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: tuple[Point, Point, Point, Point] = Field(description="pixels in the source image")
    ground: tuple[Point, Point, Point, Point] = Field(description="metres on the ground plane")

    @field_validator("image")
    @classmethod
    def _image_ok(cls, v):
        _check_points(v, "image")
        return v

    @field_validator("ground")
    @classmethod
    def _ground_ok(cls, v):
        _check_points(v, "ground")
        return v

    @model_validator(mode="after")
    def _invertible(self) -> HomographySpec:
        h = _matrix(self)
        if not np.isfinite(h).all() or abs(np.linalg.det(h)) < 1e-12:
            raise ValueError("image and ground points give a degenerate homography")
        # Every calibration point must land in front of the camera (w > 0) and map
        # back onto its ground point: a mirrored or twisted point order fails here.
        src = np.hstack([np.asarray(self.image, np.float64), np.ones((4, 1))])
        w = src @ h.T
        if not ((w[:, 2] > 0).all() or (w[:, 2] < 0).all()):
            raise ValueError(
                "image and ground points are not in the same order around the area "
                "(the mapping folds the ground plane)"
            )
        return self


def _matrix(spec: HomographySpec) -> np.ndarray:
    return cv2.getPerspectiveTransform(
        np.asarray(spec.image, np.float32), np.asarray(spec.ground, np.float32)
    ).astype(np.float64)


class SpeedSpec(BaseModel):
    """Speed measurement of one camera (config value; see docs/counting.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    homography: HomographySpec
    window_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    min_samples: Annotated[int, Field(ge=1, le=1000)] = 3
    # Faster samples are tracker glitches; at most what the wire contract accepts.
    max_kmh: Annotated[float, Field(gt=0, le=MAX_SPEED_KMH)] = 300.0


def parse_homography(text: str) -> HomographySpec:
    """``x1,y1:X1,Y1;x2,y2:X2,Y2;x3,y3:X3,Y3;x4,y4:X4,Y4`` (pixels:metres) -> spec.

    Raises HomographyError naming the problem.
    """
    pairs = [p.strip() for p in text.strip().split(";") if p.strip()]
    if len(pairs) != 4:
        raise HomographyError(
            f"need exactly 4 points as x,y:X,Y (pixels:metres) separated by ';', got {len(pairs)}"
        )
    image, ground = [], []
    for n, pair in enumerate(pairs, 1):
        px, sep, gx = pair.partition(":")
        try:
            if not sep:
                raise ValueError
            xy = [float(v) for v in px.split(",")]
            XY = [float(v) for v in gx.split(",")]
            if len(xy) != 2 or len(XY) != 2:
                raise ValueError
        except ValueError:
            raise HomographyError(f"point {n} {pair!r}: expected x,y:X,Y (numbers)") from None
        image.append(tuple(xy))
        ground.append(tuple(XY))
    return homography_spec(image, ground)


def homography_spec(image, ground) -> HomographySpec:
    """Validate four image/ground point pairs; raises HomographyError naming the problem."""
    from pydantic import ValidationError

    try:
        return HomographySpec(image=tuple(image), ground=tuple(ground))
    except ValidationError as exc:
        raise HomographyError(first_problem(exc, "homography")) from None


class GroundPlane:
    """Maps image pixels to ground metres through the calibration's homography."""

    def __init__(self, spec: HomographySpec) -> None:
        self.spec = spec
        self.matrix = _matrix(spec)

    def to_ground(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) pixels -> (N, 2) metres; points on or beyond the horizon give NaN."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        h = np.hstack([pts, np.ones((len(pts), 1))]) @ self.matrix.T
        w = h[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = h[:, :2] / w[:, None]
        # Beyond the horizon the homogeneous coordinate flips sign: not on the ground.
        ref = (np.asarray(self.spec.image[0] + (1.0,)) @ self.matrix.T)[2]
        out[(np.sign(w) != np.sign(ref)) | (np.abs(w) < 1e-12)] = np.nan
        return out


@dataclass(frozen=True)
class SpeedEvent:
    """One speed measurement: a finished track (``line`` None) or a line crossing."""

    class_name: str
    track_id: int
    ts: float
    kmh: float | None  # None: insufficient samples
    samples: int
    line: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.kmh is not None else INSUFFICIENT


@dataclass
class _Track:
    class_name: str
    last_seen: float
    path: deque = field(default_factory=deque)  # (ts, X, Y) within the window
    speeds: list[float] = field(default_factory=list)  # smoothed samples, m/s


class SpeedEstimator:
    """Per-track smoothed ground speed over tracked Detections."""

    def __init__(
        self,
        spec: SpeedSpec,
        *,
        anchor: str = "bottom_center",
        forget_after_s: float = 2.0,
    ) -> None:
        self.spec = spec
        self.plane = GroundPlane(spec.homography)
        self.anchor = anchor
        self.forget_after_s = forget_after_s
        self._tracks: dict[int, _Track] = {}

    def update(self, dets: Detections, ts: float) -> list[SpeedEvent]:
        """Add one frame; returns the tracks that ended (unseen for ``forget_after_s``)."""
        tracked = dets.tracker_id >= 0
        if tracked.any():
            ground = self.plane.to_ground(dets.anchors(self.anchor)[tracked])
            names = np.asarray(dets.names, dtype=object)[dets.class_id[tracked]]
            for tid, (gx, gy), cname in zip(
                dets.tracker_id[tracked].tolist(), ground, names, strict=True
            ):
                self._step(tid, float(gx), float(gy), str(cname), ts)
        ended = [t for t, s in self._tracks.items() if ts - s.last_seen > self.forget_after_s]
        return [self._finish(t) for t in ended]

    def _step(self, tid: int, gx: float, gy: float, cname: str, ts: float) -> None:
        track = self._tracks.get(tid)
        if track is None:
            track = self._tracks[tid] = _Track(cname, ts)
        track.class_name, track.last_seen = cname, ts  # the tracker's majority class
        if not (np.isfinite(gx) and np.isfinite(gy)):
            return
        path = track.path
        path.append((ts, gx, gy))
        window = self.spec.window_s
        while len(path) > 2 and ts - path[1][0] >= window:
            path.popleft()
        t0, x0, y0 = path[0]
        dt = ts - t0
        if dt >= 0.8 * window:
            mps = float(np.hypot(gx - x0, gy - y0)) / dt
            if mps * 3.6 <= self.spec.max_kmh:
                track.speeds.append(mps)

    def current(self, tid: int) -> tuple[float | None, int]:
        """(km/h or None, samples) of a live track: its latest smoothed speed."""
        track = self._tracks.get(tid)
        if track is None or len(track.speeds) < self.spec.min_samples:
            return None, 0 if track is None else len(track.speeds)
        return round(track.speeds[-1] * 3.6, 2), len(track.speeds)

    def crossing(self, tid: int, cname: str, line: str, ts: float) -> SpeedEvent:
        kmh, n = self.current(tid)
        return SpeedEvent(cname, tid, ts, kmh, n, line=line)

    def flush(self, ts: float) -> list[SpeedEvent]:
        """End every track (end of file, shutdown)."""
        return [self._finish(t) for t in list(self._tracks)]

    def _finish(self, tid: int) -> SpeedEvent:
        track = self._tracks.pop(tid)
        n = len(track.speeds)
        # The median of the windowed samples: one bad box (a detection that jumped to
        # a neighbour for a frame) moves a few samples, not the track's speed.
        kmh = round(float(np.median(track.speeds)) * 3.6, 2) if n >= self.spec.min_samples else None
        return SpeedEvent(track.class_name, tid, track.last_seen, kmh, n)


@dataclass
class SpeedAgg:
    """Speeds of one camera / line (or all tracks) / class: mean, p85, max, count and
    the histogram that lets the registry combine percentiles across bins."""

    kmh: list[float] = field(default_factory=list)
    insufficient: int = 0

    def add(self, ev: SpeedEvent) -> None:
        if ev.kmh is None:
            self.insufficient += 1
        else:
            self.kmh.append(ev.kmh)

    def merge(self, other: SpeedAgg) -> None:
        self.kmh.extend(other.kmh)
        self.insufficient += other.insufficient

    @property
    def n(self) -> int:
        return len(self.kmh)

    @property
    def mean_kmh(self) -> float | None:
        return round(float(np.mean(self.kmh)), 2) if self.kmh else None

    @property
    def p85_kmh(self) -> float | None:
        return round(float(np.percentile(self.kmh, 85)), 2) if self.kmh else None

    @property
    def max_kmh(self) -> float | None:
        return round(max(self.kmh), 2) if self.kmh else None

    @property
    def hist(self) -> tuple[int, ...] | None:
        """Tracks per bucket of the contract's speed histogram (sums to ``n``), from
        the same per-track speeds as the mean and p85; None when nothing was measured."""
        return speedhist.histogram(self.kmh) if self.kmh else None

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "mean_kmh": self.mean_kmh,
            "p85_kmh": self.p85_kmh,
            "max_kmh": self.max_kmh,
            "insufficient": self.insufficient,
        }
