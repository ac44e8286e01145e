"""MOT15 reference data for the tracker and count-accuracy benchmarks.

The six MOT Challenge 2015 training sequences live in ``$FLOWFLEET_DATA/mot15/<SEQ>/``
(default ``../shared/data/mot15``): ``det.txt`` (public ACF detections, as
redistributed by abewley/sort) for all six, ``gt.txt`` (ground truth) for four. Rows
are ``frame,id,left,top,width,height,conf,x,y,z`` with 1-based frames; ``id`` is -1 in
``det.txt``; in ``gt.txt`` ``conf`` is 1 for an object that counts (PETS09-S2L1 has 174
rows with 0, which are ignored, as motmetrics does with ``min_confidence=1``).

This module needs only numpy and the standard library, so the peer-tracker runner
(which runs in its own virtual environment without flowfleet installed) can share the
sequence table and the readers by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Sequence:
    name: str
    frames: int
    fps: float
    width: int
    height: int
    has_gt: bool


SEQUENCES: dict[str, Sequence] = {
    s.name: s
    for s in (
        Sequence("PETS09-S2L1", 795, 7, 768, 576, True),
        Sequence("TUD-Stadtmitte", 179, 25, 640, 480, True),
        Sequence("TUD-Campus", 71, 25, 640, 480, False),
        Sequence("ADL-Rundle-6", 525, 30, 1920, 1080, True),
        Sequence("Venice-2", 600, 30, 1920, 1080, True),
        Sequence("KITTI-17", 145, 10, 1224, 370, False),
    )
}
GT_SEQUENCES = [name for name, s in SEQUENCES.items() if s.has_gt]


def mot15_dir(data: Path | None = None) -> Path:
    """The folder holding one sub-folder per sequence; raises if anything is missing."""
    if data is None:
        from flowfleet.data import data_dir  # not needed inside the peers' venv

        data = data_dir()
    root = Path(data) / "mot15"
    missing = [
        str(root / name / f)
        for name, seq in SEQUENCES.items()
        for f in (("det.txt", "gt.txt") if seq.has_gt else ("det.txt",))
        if not (root / name / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            "MOT15 reference data missing (set FLOWFLEET_DATA to the folder holding "
            f"mot15/): {', '.join(missing)}"
        )
    return root


def read_mot(path: Path) -> np.ndarray:
    """All rows of a MOT text file as an (N, 10) float64 array (short rows padded)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            values = [float(v) for v in line.split(",")]
            rows.append((values + [-1.0] * 10)[:10])
    if not rows:
        return np.zeros((0, 10))
    return np.asarray(rows, np.float64)


def per_frame(rows: np.ndarray, frames: int) -> list[np.ndarray]:
    """Split MOT rows into one array per frame (index 0 is frame 1)."""
    frame_no = rows[:, 0].astype(np.int64)
    order = np.argsort(frame_no, kind="stable")
    rows, frame_no = rows[order], frame_no[order]
    bounds = np.searchsorted(frame_no, np.arange(1, frames + 2))
    return [rows[bounds[i] : bounds[i + 1]] for i in range(frames)]


def load_detections(root: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame: (xyxy float32 (N, 4), score float32 (N,)) from det.txt."""
    seq = SEQUENCES[name]
    out = []
    for rows in per_frame(read_mot(root / name / "det.txt"), seq.frames):
        xyxy = np.empty((len(rows), 4), np.float32)
        xyxy[:, :2] = rows[:, 2:4]
        xyxy[:, 2:] = rows[:, 2:4] + rows[:, 4:6]
        out.append((xyxy, rows[:, 6].astype(np.float32)))
    return out


def load_ground_truth(root: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame: (ids int64 (N,), xyxy float32 (N, 4)) of the counted gt objects."""
    seq = SEQUENCES[name]
    rows = read_mot(root / name / "gt.txt")
    rows = rows[rows[:, 6] >= 1]
    out = []
    for r in per_frame(rows, seq.frames):
        xyxy = np.empty((len(r), 4), np.float32)
        xyxy[:, :2] = r[:, 2:4]
        xyxy[:, 2:] = r[:, 2:4] + r[:, 4:6]
        out.append((r[:, 1].astype(np.int64), xyxy))
    return out


def write_tracks(path: Path, tracks: list[tuple[int, int, np.ndarray]]) -> None:
    """Write (frame, id, xyxy) rows as a MOT results file (left, top, width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for frame, tid, box in tracks:
            x1, y1, x2, y2 = (float(v) for v in box)
            f.write(f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},1,-1,-1,-1\n")


def read_tracks(path: Path, frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame: (ids int64 (N,), xyxy float32 (N, 4)) from a MOT results file."""
    out = []
    for r in per_frame(read_mot(path), frames):
        xyxy = np.empty((len(r), 4), np.float32)
        xyxy[:, :2] = r[:, 2:4]
        xyxy[:, 2:] = r[:, 2:4] + r[:, 4:6]
        out.append((r[:, 1].astype(np.int64), xyxy))
    return out
