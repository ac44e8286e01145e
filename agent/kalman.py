"""Constant-velocity Kalman filter over boxes, batched over all tracks.

State per track: (cx, cy, a, h) and their velocities, with a = w / h, the formulation
of SORT / ByteTrack. Noise scales with box height so near and far objects are treated
alike.

The motion model moves each coordinate by its own velocity, the process and
measurement noises are diagonal and the filter starts from a diagonal covariance, so
the usual 8x8 covariance never gains a term between two different coordinates: it is
four independent 2x2 blocks [[pp, pv], [pv, vv]], one per coordinate. Storing just
those three numbers per coordinate makes predict and update a handful of elementwise
numpy operations over all tracks (no 8x8 matrix products, no matrix solve), exactly
equivalent to the full filter; ``tests/test_tracker.py`` checks it against a textbook
8x8 implementation.

Packed state: one row per track, ``STATE_COLS`` (20) float64 columns::

    0:4   mean position     (cx, cy, a, h)
    4:8   mean velocity     (vcx, vcy, va, vh)
    8:12  variance of each position               (pp)
    12:16 covariance of each position with its velocity (pv)
    16:20 variance of each velocity                (vv)

Functions take a 2-D array whose first 20 columns are this state (it may carry more
columns, as the tracker's table does) and update it in place.
"""

from __future__ import annotations

import numpy as np

_STD_POS = 1.0 / 20
_STD_VEL = 1.0 / 160

STATE_COLS = 20
MEAN = slice(0, 4)
VEL = slice(4, 8)
PP = slice(8, 12)
PV = slice(12, 16)
VV = slice(16, 20)

# Standard deviations are (coefficient * box height) for cx, cy, h and a constant for
# the aspect ratio a, stored squared as (coefficient^2, constant^2) per coordinate;
# the process noise keeps positions and velocities side by side (8 columns).
_ONES = np.array([1, 1, 0, 1.0])
_INIT_PP = (_ONES * (2 * _STD_POS) ** 2, np.array([0, 0, 1e-2**2, 0]))
_INIT_VV = (_ONES * (10 * _STD_VEL) ** 2, np.array([0, 0, 1e-5**2, 0]))
_Q = (
    np.concatenate([_ONES * _STD_POS**2, _ONES * _STD_VEL**2]),
    np.array([0, 0, 1e-2**2, 0, 0, 0, 1e-5**2, 0]),
)
_R = (_ONES * _STD_POS**2, np.array([0, 0, 1e-1**2, 0]))


def xyxy_to_xyah(xyxy: np.ndarray) -> np.ndarray:
    """(N, 4) left, top, right, bottom -> centre x, centre y, aspect w/h, height."""
    out = np.empty((len(xyxy), 4))
    wh = xyxy[:, 2:] - xyxy[:, :2]
    h = np.maximum(wh[:, 1], 1e-3)
    out[:, 3] = h
    out[:, 1] = h
    out[:, 0] = wh[:, 0]
    out[:, :2] *= 0.5
    out[:, :2] += xyxy[:, :2]
    np.divide(wh[:, 0], h, out=out[:, 2])
    return out


def xyah_to_xyxy(xyah: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(N, 4) centre x, centre y, aspect w/h, height -> left, top, right, bottom."""
    out = np.empty((len(xyah), 4), dtype)
    half = out[:, 2:]
    half[:, 1] = xyah[:, 3]
    np.multiply(xyah[:, 2], xyah[:, 3], out=half[:, 0])
    half *= 0.5
    np.subtract(xyah[:, :2], half, out=out[:, :2])
    half += xyah[:, :2]
    return out


def _noise(h: np.ndarray, coef: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Variances coef^2 * h^2 (cx, cy, h) or const^2 (a), one row per track."""
    return np.multiply.outer(h * h, coef[0]) + coef[1]


def initiate(measurement: np.ndarray) -> np.ndarray:
    """New packed states (N, 20) from xyah measurements (N, 4), zero velocity."""
    state = np.zeros((len(measurement), STATE_COLS))
    state[:, MEAN] = measurement
    h = measurement[:, 3]
    state[:, PP] = _noise(h, _INIT_PP)
    state[:, VV] = _noise(h, _INIT_VV)
    return state


def predict(state: np.ndarray) -> None:
    """Advance every row one frame, in place."""
    if len(state) == 0:
        return
    q = _noise(state[:, 3], _Q)  # (N, 8): position then velocity variances
    state[:, MEAN] += state[:, VEL]
    # F P F^T on each block [[1, 1], [0, 1]]: pp + 2 pv + vv, pv + vv, vv.
    pv, vv = state[:, PV], state[:, VV]
    q[:, :4] += pv
    q[:, :4] += pv
    q[:, :4] += vv
    state[:, PP] += q[:, :4]
    pv += vv
    vv += q[:, 4:]


def update(state: np.ndarray, measurement: np.ndarray) -> None:
    """Correct packed states with xyah measurements (rows aligned), in place.

    Pass a gathered copy (``table[rows]``) and scatter it back.
    """
    if len(state) == 0:
        return
    pp, pv = state[:, PP], state[:, PV]
    s = pp + _noise(state[:, 3], _R)  # innovation variance per coordinate
    k_p = pp / s  # Kalman gain, position and velocity rows
    k_v = pv / s
    innovation = measurement - state[:, MEAN]
    state[:, MEAN] += k_p * innovation
    state[:, VEL] += k_v * innovation
    # P - K S K^T per block, in an order that reads pv and pp before they change.
    state[:, VV] -= k_v * pv
    state[:, PV] -= k_p * pv
    state[:, PP] -= k_p * pp
