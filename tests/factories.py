"""Test data factories: Detections for scripted object paths."""

from __future__ import annotations

import numpy as np

from flowfleet.agent.detections import Detections

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
