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
- a new track's starting side is where it was first detected (`LineCounter.seed`
  with the tracker's `confirmed_origins`), not where the tracker confirmed it a few
  frames later, so an object that crossed while being confirmed still counts;
- the crossing must happen within the segment (with a small margin), not on its
  infinite extension;
- each track counts at most once per line and direction, so a person loitering on
  the line (in, out, in, ...) gives at most one "in" and one "out".

Stationary objects (parked cars) can be kept out of every count with
`StationaryFilter` (off by default): a track whose anchor stayed within
``min_move_px`` pixels for ``window_s`` seconds is hidden from the counters until
it moves again. See docs/counting.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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


_IN, _OUT = 1, 2  # bits of a track's "already counted" mask


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
        # (point - A) @ _project = (signed distance, position along the segment 0..1)
        self._project = np.array(
            [
                [-self.unit[1], self.unit[0] / self.length],
                [self.unit[0], self.unit[1] / self.length],
            ]
        )
        self.hysteresis = hysteresis
        self.anchor = anchor
        self.margin = segment_margin
        self.forget_after_s = forget_after_s
        # Per-track state in flat dicts (this runs for every track on every frame):
        # established side (-1 left, +1 right; absent = not established yet), the
        # directions already counted (bit mask), and when the track was last seen.
        self._side: dict[int, int] = {}
        self._counted: dict[int, int] = {}
        self._seen: dict[int, float] = {}
        self._next_forget = float("-inf")

    def update(self, dets: Detections, ts: float) -> list[Crossing]:
        events: list[Crossing] = []
        tids = dets.tracker_id
        if len(tids):
            points, rows = dets.anchors(self.anchor), None
            tracked = tids >= 0
            if not tracked.all():  # the tracker's output is all tracked: skip the copy
                rows = np.flatnonzero(tracked)
                points, tids = points[rows], tids[rows]
            # One product gives both coordinates; plain Python numbers from here on,
            # because numpy scalars would dominate this per-track loop.
            signed, along = ((points - self.a) @ self._project).T.tolist()
            ids = tids.tolist()
            h, lo, hi = self.hysteresis, -self.margin, 1 + self.margin
            sides, seen = self._side, self._seen
            for k, (tid, dist, pos) in enumerate(zip(ids, signed, along, strict=True)):
                seen[tid] = ts
                if -h < dist < h:
                    continue  # inside the dead band: neither side, nothing changes
                side = 1 if dist > 0 else -1
                previous = sides.get(tid, 0)
                if previous == side:
                    continue
                sides[tid] = side
                if previous == 0 or not (lo <= pos <= hi):
                    continue  # first side seen, or crossed the line's extension
                bit = _IN if side > 0 else _OUT
                done = self._counted.get(tid, 0)
                if done & bit:
                    continue
                self._counted[tid] = done | bit
                cname = dets.names[int(dets.class_id[k if rows is None else rows[k]])]
                events.append(Crossing(self.name, cname, "in" if side > 0 else "out", tid, ts))
        if ts >= self._next_forget:
            self._forget(ts)
        return events

    def seed(self, origins: Detections | None) -> None:
        """Take the starting side of tracks this counter has not seen yet from
        ``origins`` (`ByteTracker.confirmed_origins`: where each new track was first
        detected, before it was confirmed). Counts nothing itself: the next `update`
        that sees such a track on the other side counts the crossing it made while
        the tracker was still confirming it. A point inside the dead band sets no side.
        """
        if origins is None or not len(origins):
            return
        signed = ((origins.anchors(self.anchor) - self.a) @ self._project)[:, 0].tolist()
        sides, h = self._side, self.hysteresis
        for tid, dist in zip(origins.tracker_id.tolist(), signed, strict=True):
            if tid not in sides and (dist >= h or dist <= -h):
                sides[tid] = 1 if dist > 0 else -1

    def _forget(self, ts: float) -> None:
        """Drop tracks unseen for forget_after_s; runs at most once per second of ts."""
        self._next_forget = ts + 1.0
        stale = [t for t, last in self._seen.items() if ts - last > self.forget_after_s]
        for t in stale:
            del self._seen[t]
            self._side.pop(t, None)
            self._counted.pop(t, None)


def count_lines(
    lines: list[LineCounter], tracked: Detections, origins: Detections | None, ts: float
) -> list[Crossing]:
    """One frame for every line: seed each with the tracks confirmed in this frame
    (``ByteTracker.confirmed_origins()``), then count the frame's tracks. The seeding
    must come first, so a track confirmed on the far side of a line counts the
    crossing it made while tentative; the agent's pipeline and the benchmarks all
    count through here."""
    crossings: list[Crossing] = []
    for line in lines:
        line.seed(origins)
        crossings.extend(line.update(tracked, ts))
    return crossings


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


class StationarySpec(BaseModel):
    """Config value: exclude stationary tracks (parked cars) from flow counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_move_px: Annotated[float, Field(gt=0)] = 10.0
    window_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


@dataclass
class _Still:
    last_seen: float
    history: deque = field(default_factory=deque)  # (ts, x, y), thinned to ~32 points


class StationaryFilter:
    """Hides tracks whose anchor moved less than ``min_move_px`` over ``window_s``.

    A track is judged once it has been seen for ``window_s``: before that it counts
    as moving, so a car driving through is never delayed. While stationary its rows
    are removed from what the counters see (no line side change, no zone presence, no
    speed); when it moves again (``min_move_px`` from where it stood) it is back.
    So a car parked in a zone ends its visit after the zone's exit delay, and one
    already parked when counting starts enters the zone at most once, in the first
    ``window_s``.
    """

    def __init__(
        self,
        min_move_px: float = 10.0,
        window_s: float = 30.0,
        *,
        anchor: str = "bottom_center",
        forget_after_s: float = 60.0,
    ) -> None:
        self.min_move_px = min_move_px
        self.window_s = window_s
        self.anchor = anchor
        self.forget_after_s = forget_after_s
        self._sample_dt = window_s / 32
        self._tracks: dict[int, _Still] = {}
        self.stationary: set[int] = set()

    @classmethod
    def from_spec(cls, spec: StationarySpec, *, anchor: str = "bottom_center"):
        return cls(spec.min_move_px, spec.window_s, anchor=anchor)

    def apply(self, dets: Detections, ts: float) -> Detections:
        """``dets`` without the rows of stationary tracks (untracked rows are kept)."""
        keep = np.ones(len(dets), bool)
        rows = np.flatnonzero(dets.tracker_id >= 0)
        if len(rows):
            points = dets.anchors(self.anchor)[rows]
            for row, tid, (x, y) in zip(rows, dets.tracker_id[rows].tolist(), points, strict=True):
                keep[row] = not self._step(tid, float(x), float(y), ts)
        stale = [t for t, s in self._tracks.items() if ts - s.last_seen > self.forget_after_s]
        for t in stale:
            del self._tracks[t]
            self.stationary.discard(t)
        return dets if keep.all() else dets[keep]

    def _step(self, tid: int, x: float, y: float, ts: float) -> bool:
        state = self._tracks.get(tid)
        if state is None:
            state = self._tracks[tid] = _Still(ts)
        state.last_seen = ts
        h = state.history
        if not h or ts - h[-1][0] >= self._sample_dt:
            h.append((ts, x, y))
        # Keep exactly one point at or before the window's start, so the history
        # covers the whole window.
        while len(h) > 1 and ts - h[1][0] >= self.window_s:
            h.popleft()
        covered = ts - h[0][0] >= self.window_s
        pts = np.asarray([(px, py) for _, px, py in h])
        moved = float(np.hypot(pts[:, 0] - x, pts[:, 1] - y).max())
        still = covered and moved < self.min_move_px
        if still:
            self.stationary.add(tid)
        elif tid in self.stationary and moved >= self.min_move_px:
            self.stationary.discard(tid)
            h.clear()
            h.append((ts, x, y))  # judged afresh: moving until proven still again
        return tid in self.stationary
