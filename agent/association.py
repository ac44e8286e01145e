"""The association steps of `ByteTracker` (agent/tracker.py), as functions on arrays.

Everything here works on plain arrays: IoU matrices, track boxes and the tracks'
appearance rows, so the tracker's table layout stays in tracker.py. The stages that
use them, and why, are described there (`TrackerConfig`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _load_linear_sum_assignment():
    """SciPy's `linear_sum_assignment`, without importing all of `scipy.optimize`.

    ``import scipy.optimize`` loads every solver SciPy has (about 50 MB of resident
    memory on x86-64 with SciPy 1.17, a quarter of the agent's budget) to reach one
    compiled function. Its extension module (``scipy/optimize/_lsap*.so``) depends on
    NumPy alone, so it is loaded from its file; should a SciPy build lay it out
    differently, the ordinary import is used. Either way it is the same solver, so
    the assignments are identical."""
    import scipy

    try:
        folder = Path(scipy.__file__).parent / "optimize"
        ext = next(folder.glob("_lsap.*.so"), None) or next(folder.glob("_lsap.*.pyd"))
        spec = importlib.util.spec_from_file_location("scipy.optimize._lsap", ext)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.linear_sum_assignment
    except (StopIteration, ImportError, AttributeError, OSError):
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment


linear_sum_assignment = _load_linear_sum_assignment()

NONE = np.zeros(0, np.intp)
# A re-linked box is this many times the height the track was last seen with.
RELINK_MIN_RATIO, RELINK_MAX_RATIO = 0.7, 1.43


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    wh = np.minimum(a[:, None, 2:], b[:, 2:])
    wh -= np.maximum(a[:, None, :2], b[:, :2])
    np.maximum(wh, 0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    size_a = a[:, 2:] - a[:, :2]
    size_b = b[:, 2:] - b[:, :2]
    union = (size_a[:, 0] * size_a[:, 1])[:, None] + size_b[:, 0] * size_b[:, 1]
    union -= inter
    return inter / np.maximum(union, 1e-9)


def match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-IoU assignment over the pairs with IoU >= min_iou: (rows, cols).

    Pairs under the gate cannot be matched, so they take no part in the optimisation
    either. When no row and no column has two candidates, the candidates are the
    answer and the assignment solver is skipped.
    """
    ok = iou >= min_iou
    rows, cols = ok.nonzero()
    n = len(rows)
    if n <= 1:
        return rows, cols
    # A handful of candidates: Python sets are cheaper than numpy reductions here.
    if len(set(rows.tolist())) == n and len(set(cols.tolist())) == n:
        return rows, cols
    rows, cols = linear_sum_assignment(np.where(ok, iou, 0.0), maximize=True)
    keep = ok[rows, cols]
    return rows[keep], cols[keep]


def block_match(
    iou: np.ndarray, rows: np.ndarray, cols: np.ndarray, min_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """`match` on the block iou[rows][:, cols]; returns global (rows, cols)."""
    if len(rows) == 0 or len(cols) == 0:
        return NONE, NONE
    r, c = match(iou[rows][:, cols], min_iou)
    return rows[r], cols[c]


def similarity(track_feat: np.ndarray, feats: np.ndarray, blank: float = 1.0) -> np.ndarray:
    """Appearance similarity (Bhattacharyya coefficient) of track rows x detection
    rows; ``blank`` where either has no colours (not a person, no torso pixels): by
    default 1, so it neither helps nor blocks a match."""
    sim = track_feat @ feats.T
    none = (track_feat.sum(axis=1) == 0)[:, None] | (feats.sum(axis=1) == 0)[None, :]
    sim[none] = blank
    return sim


def look_match(
    iou: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    track_feat: np.ndarray,
    feats: np.ndarray,
    need: np.ndarray,
    min_iou: float,
    weight: float,
    block: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`block_match` by IoU + ``weight`` x similarity over the pairs with IoU >=
    ``min_iou`` whose similarity reaches the track's ``need`` (one per row).

    ``iou`` is the full matrix (tracks x detections), or with ``block`` the block
    iou[rows][:, cols] itself; ``track_feat`` holds the rows' appearance. Returns
    global (rows, cols)."""
    if len(rows) == 0 or len(cols) == 0:
        return NONE, NONE
    if not block:
        iou = iou[rows][:, cols]
    sim = similarity(track_feat, feats[cols])
    ok = (iou >= min_iou) & (sim >= need[:, None])
    r, c = match(np.where(ok, iou + weight * sim, 0.0), 1e-9)
    return rows[r], cols[c]


def relink(
    last_box: np.ndarray,
    unseen: np.ndarray,
    track_feat: np.ndarray,
    boxes: np.ndarray,
    feats: np.ndarray,
    *,
    radius: float,
    speed: float,
    min_sim: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-identification of unmatched tracks among leftover detections: (rows, cols)
    of the pairs, local to ``last_box`` (the boxes the tracks were last seen with,
    ``unseen`` frames ago) and ``boxes``.

    A pair needs colours on both sides that look alike (similarity >= ``min_sim``),
    a box about the track's height (0.7-1.43x) and a centre within ``radius + speed
    x unseen`` box heights of where the track was last seen (a person walks on while
    hidden, but not across the scene in a frame)."""
    seen_h = np.maximum(last_box[:, 3] - last_box[:, 1], 1.0)
    cand = boxes.astype(np.float64)
    ratio = (cand[:, 3] - cand[:, 1])[None, :] / seen_h[:, None]
    dx = (last_box[:, 0] + last_box[:, 2])[:, None] - (cand[:, 0] + cand[:, 2])[None, :]
    dy = (last_box[:, 1] + last_box[:, 3])[:, None] - (cand[:, 1] + cand[:, 3])[None, :]
    dist = 0.5 * np.hypot(dx, dy)
    reach = seen_h * (radius + speed * unseen)
    sim = similarity(track_feat, feats, blank=0.0)  # colours needed here
    ok = (dist <= reach[:, None]) & (ratio >= RELINK_MIN_RATIO) & (ratio <= RELINK_MAX_RATIO)
    return match(np.where(ok, sim, 0.0), min_sim)


def left_frame(xyah: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Which (cx, cy, a, h) boxes have their centre outside a (width, height) frame:
    objects that walked or drove out of view."""
    w, h = frame_size
    cx, cy = xyah[:, 0], xyah[:, 1]
    return (cx < 0) | (cx > w) | (cy < 0) | (cy > h)
