"""The one value that flows detect -> track -> count -> publish.

`Detections` holds parallel numpy arrays, one row per object in one frame. Every
stage returns a new value rather than mutating its input, so a stage can be tested
on its own and two consumers never see each other's changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

UNTRACKED = -1


@dataclass(frozen=True)
class Detections:
    """Objects found in one frame.

    Attributes:
        xyxy: (N, 4) float32 boxes, left/top/right/bottom in source-image pixels.
        confidence: (N,) float32 scores in 0..1.
        class_id: (N,) int32 indices into ``names``.
        tracker_id: (N,) int64 track ids; ``UNTRACKED`` (-1) before tracking or for
            objects the tracker has not confirmed. Counters ignore untracked rows.
        names: the label vocabulary ``class_id`` indexes (shared, not copied).
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    tracker_id: np.ndarray = field(default=None)  # type: ignore[assignment]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.xyxy)
        object.__setattr__(self, "xyxy", np.asarray(self.xyxy, np.float32).reshape(n, 4))
        object.__setattr__(self, "confidence", np.asarray(self.confidence, np.float32))
        object.__setattr__(self, "class_id", np.asarray(self.class_id, np.int32))
        tid = self.tracker_id
        tid = np.full(n, UNTRACKED, np.int64) if tid is None else np.asarray(tid, np.int64)
        object.__setattr__(self, "tracker_id", tid)
        for name in ("confidence", "class_id", "tracker_id"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Detections.{name} has {len(getattr(self, name))} rows, xyxy {n}")
        # Every line, zone and speed estimator asks for the same anchor points.
        object.__setattr__(self, "_anchors", {})

    @classmethod
    def empty(cls, names: tuple[str, ...] = ()) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0), names=names)

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index) -> Detections:
        """Select rows with a boolean mask, an index array or a slice."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(
            self.xyxy[index],
            self.confidence[index],
            self.class_id[index],
            self.tracker_id[index],
            self.names,
        )

    def with_tracker_id(self, tracker_id: np.ndarray) -> Detections:
        return replace(self, tracker_id=np.asarray(tracker_id, np.int64))

    def class_names(self) -> list[str]:
        return [self.names[i] for i in self.class_id]

    def anchors(self, anchor: str = "bottom_center") -> np.ndarray:
        """(N, 2) anchor points of the boxes: bottom_center, center or top_center.

        Computed once per anchor kind and shared (read-only) by every caller.
        """
        points = self._anchors.get(anchor)
        if points is not None:
            return points
        xyxy = self.xyxy
        points = np.empty((len(xyxy), 2), np.float32)
        np.add(xyxy[:, 0], xyxy[:, 2], out=points[:, 0])
        if anchor == "bottom_center":
            points[:, 1] = xyxy[:, 3]
            points[:, 0] *= 0.5
        elif anchor == "center":
            np.add(xyxy[:, 1], xyxy[:, 3], out=points[:, 1])
            points *= 0.5
        elif anchor == "top_center":
            points[:, 1] = xyxy[:, 1]
            points[:, 0] *= 0.5
        else:
            raise ValueError(f"unknown anchor {anchor!r} (bottom_center, center, top_center)")
        points.flags.writeable = False
        self._anchors[anchor] = points
        return points

    @staticmethod
    def concat(items: list[Detections], names: tuple[str, ...] = ()) -> Detections:
        if not items:
            return Detections.empty(names)
        return Detections(
            np.concatenate([d.xyxy for d in items]),
            np.concatenate([d.confidence for d in items]),
            np.concatenate([d.class_id for d in items]),
            np.concatenate([d.tracker_id for d in items]),
            items[0].names,
        )
