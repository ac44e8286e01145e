"""Test data factories: Detections for scripted object paths, and count bins."""

from __future__ import annotations

import time

import numpy as np

from flowfleet.agent.detections import Detections
from flowfleet.contract import CountBin, LineCount

NAMES = ("person", "bicycle", "car", "motorcycle", "bus", "truck")


def box_at(x: float, y: float, w: float = 40, h: float = 80) -> list[float]:
    """A box whose bottom centre is at (x, y)."""
    return [x - w / 2, y - h, x + w / 2, y]


def dets(
    boxes: list[list[float]],
    *,
    ids: list[int] | None = None,
    classes: list[str] | None = None,
    scores: list[float] | None = None,
) -> Detections:
    n = len(boxes)
    classes = classes or ["person"] * n
    return Detections(
        np.array(boxes, np.float32).reshape(n, 4),
        np.array(scores or [0.9] * n, np.float32),
        np.array([NAMES.index(c) for c in classes], np.int32),
        None if ids is None else np.array(ids, np.int64),
        NAMES,
    )


def walk(points: list[tuple[float, float]], track_id: int = 1, cls: str = "person"):
    """One tracked Detections per point: the object's bottom centre follows the path."""
    return [dets([box_at(x, y)], ids=[track_id], classes=[cls]) for x, y in points]


# Bins sit a day in the past: recent enough for the registry's receive-time bounds,
# fixed for the whole test session so a re-sent bin has the same content.
BIN_BASE = float((int(time.time()) // 86400 - 1) * 86400)


def count_bin(device: str = "cam-1", seq: int = 1, *, in_: int | None = None) -> CountBin:
    """A one-minute count bin with one line row whose counts follow from ``seq``."""
    start = BIN_BASE + 60 * seq
    row = LineCount(
        camera="front",
        line="door",
        class_="person",
        in_=seq % 3 + 1 if in_ is None else in_,
        out=seq % 2,
    )
    return CountBin(device=device, seq=seq, start=start, end=start + 60, lines=(row,))
