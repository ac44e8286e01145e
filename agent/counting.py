"""Directional line counters and polygon zone counters over tracked Detections.

Line direction: for a line drawn from A to B, an object crossing from the left of
A->B to its right (as seen on the image, x to the right and y down) counts as "in";
the other way counts as "out". For a line drawn left to right across the image,
moving down the image is "in"; for a line drawn top to bottom, moving left is "in".

Robustness rules (the bugs users of other counters hit):
- only tracked rows count (tracker id -1 is ignored, never one shared object);
- a track's side of a line is only established once its anchor is at least
  ``hysteresis`` pixels from the line, so jitter around the line or a box edge
  resting on it never counts, and a track that appears on the line is not counted
  until it has been seen clearly on one side and then clearly on the other;
- the crossing must happen within the segment (with a small margin), not on its
  infinite extension;
- each track counts at most once per line and direction, so a person loitering on
  the line (in, out, in, ...) gives at most one "in" and one "out".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .detections import Detections


@dataclass(frozen=True)
class Crossing:
    line: str
    class_name: str
    direction: str  # "in" | "out"
    track_id: int
    ts: float


@dataclass(frozen=True)
class ZoneEvent:
    zone: str
    class_name: str
    kind: str  # "entry" | "exit"
    track_id: int
    ts: float
    dwell_s: float = 0.0


@dataclass
class _LineTrack:
    side: int = 0  # -1 left, +1 right, 0 not established
    counted: set[str] = field(default_factory=set)
    last_seen: float = 0.0


class LineCounter:
    """Counts directional crossings of one line segment."""

    def __init__(
        self,
        name: str,
        start: tuple[float, float],
        end: tuple[float, float],
        *,
        hysteresis: float = 8.0,
        anchor: str = "bottom_center",
        segment_margin: float = 0.05,
        forget_after_s: float = 60.0,
    ) -> None:
        self.name = name
        self.a = np.asarray(start, np.float64)
        self.b = np.asarray(end, np.float64)
        direction = self.b - self.a
        self.length = float(np.hypot(*direction))
        if self.length < 1.0:
            raise ValueError(f"line {name!r}: its two points are the same")
        self.unit = direction / self.length
        self.hysteresis = hysteresis
        self.anchor = anchor
        self.margin = segment_margin
        self.forget_after_s = forget_after_s
        self._tracks: dict[int, _LineTrack] = {}

    def _geometry(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance (positive = right of A->B) and position along the segment 0..1."""
        rel = points - self.a
        signed = self.unit[0] * rel[:, 1] - self.unit[1] * rel[:, 0]
        along = (rel @ self.unit) / self.length
        return signed, along

    def update(self, dets: Detections, ts: float) -> list[Crossing]:
        events: list[Crossing] = []
        tracked = dets.tracker_id >= 0
        if tracked.any():
            points = dets.anchors(self.anchor)[tracked]
            signed, along = self._geometry(points)
            ids = dets.tracker_id[tracked]
            names = np.asarray(dets.names, dtype=object)[dets.class_id[tracked]]
            for tid, dist, pos, cname in zip(ids, signed, along, names, strict=True):
                events.extend(self._step(int(tid), float(dist), float(pos), str(cname), ts))
        self._forget(ts)
        return events

    def _step(self, tid: int, dist: float, pos: float, cname: str, ts: float) -> list[Crossing]:
        state = self._tracks.setdefault(tid, _LineTrack())
        state.last_seen = ts
        if abs(dist) < self.hysteresis:
            return []  # inside the dead band: neither side, nothing changes
        side = 1 if dist > 0 else -1
        previous, state.side = state.side, side
        if previous == 0 or previous == side:
            return []
        if not (-self.margin <= pos <= 1 + self.margin):
            return []  # crossed the line's extension, not the segment
        direction = "in" if side > 0 else "out"
        if direction in state.counted:
            return []
        state.counted.add(direction)
        return [Crossing(self.name, cname, direction, tid, ts)]

    def _forget(self, ts: float) -> None:
        stale = [t for t, s in self._tracks.items() if ts - s.last_seen > self.forget_after_s]
        for t in stale:
            del self._tracks[t]


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Vectorised even-odd rule: which of (N, 2) points lie inside the polygon (M, 2)."""
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return np.count_nonzero(crosses & (x < x_at), axis=1) % 2 == 1


@dataclass
class _ZoneTrack:
    class_name: str
    entered: float
    last_seen: float


class ZoneCounter:
    """Occupancy, entries, exits and dwell time of tracks in one polygon.

    A track exits once it has not been seen inside for ``exit_after_s`` (it walked
    out, left the frame, or the tracker lost it); its dwell ends at the last moment
    it was seen inside. The delay is the zone's hysteresis: feet jittering across the
    zone's edge do not produce a string of exits and re-entries.
    """

    def __init__(
        self,
        name: str,
        polygon: list[tuple[float, float]],
        *,
        anchor: str = "bottom_center",
        exit_after_s: float = 1.0,
    ) -> None:
        if len(polygon) < 3:
            raise ValueError(f"zone {name!r}: needs at least 3 points, got {len(polygon)}")
        self.name = name
        self.polygon = np.asarray(polygon, np.float64)
        self.anchor = anchor
        self.exit_after_s = exit_after_s
        self._inside: dict[int, _ZoneTrack] = {}
        self.peak_occupancy = 0

    @property
    def occupancy(self) -> int:
        return len(self._inside)

    def occupancy_by_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._inside.values():
            out[t.class_name] = out.get(t.class_name, 0) + 1
        return out

    def update(self, dets: Detections, ts: float) -> list[ZoneEvent]:
        events: list[ZoneEvent] = []
        tracked = dets.tracker_id >= 0
        if tracked.any():
            inside = points_in_polygon(dets.anchors(self.anchor)[tracked], self.polygon)
            ids = dets.tracker_id[tracked][inside]
            names = np.asarray(dets.names, dtype=object)[dets.class_id[tracked][inside]]
            for tid, cname in zip(ids.tolist(), names, strict=True):
                state = self._inside.get(tid)
                if state is None:
                    self._inside[tid] = _ZoneTrack(str(cname), ts, ts)
                    events.append(ZoneEvent(self.name, str(cname), "entry", tid, ts))
                else:
                    state.last_seen = ts
        for tid in [t for t, s in self._inside.items() if ts - s.last_seen > self.exit_after_s]:
            events.append(self._exit(tid))
        self.peak_occupancy = max(self.peak_occupancy, len(self._inside))
        return events

    def flush(self, ts: float) -> list[ZoneEvent]:
        """Exit every track still inside (end of a file, shutdown)."""
        return [self._exit(tid) for tid in list(self._inside)]

    def _exit(self, tid: int) -> ZoneEvent:
        state = self._inside.pop(tid)
        dwell = max(0.0, state.last_seen - state.entered)
        return ZoneEvent(self.name, state.class_name, "exit", tid, state.last_seen, dwell_s=dwell)
