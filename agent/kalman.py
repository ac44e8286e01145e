"""Constant-velocity Kalman filter over boxes, batched over all tracks.

State per track: (cx, cy, a, h, vcx, vcy, va, vh) with a = w / h, the formulation of
SORT / ByteTrack. Noise scales with box height so near and far objects are treated
alike. All operations take stacked arrays so one numpy call serves every track.
"""

from __future__ import annotations

import numpy as np

_STD_POS = 1.0 / 20
_STD_VEL = 1.0 / 160

_F = np.eye(8, dtype=np.float64)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8, dtype=np.float64)


def xyxy_to_xyah(xyxy: np.ndarray) -> np.ndarray:
    w = xyxy[:, 2] - xyxy[:, 0]
    h = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-3)
    return np.stack([xyxy[:, 0] + w / 2, xyxy[:, 1] + h / 2, w / h, h], axis=1)


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    h = xyah[:, 3]
    w = xyah[:, 2] * h
    return np.stack(
        [xyah[:, 0] - w / 2, xyah[:, 1] - h / 2, xyah[:, 0] + w / 2, xyah[:, 1] + h / 2], axis=1
    )


def initiate(measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New states (N, 8) and covariances (N, 8, 8) from xyah measurements (N, 4)."""
    n = len(measurement)
    mean = np.zeros((n, 8))
    mean[:, :4] = measurement
    h = measurement[:, 3]
    std = np.stack(
        [
            2 * _STD_POS * h,
            2 * _STD_POS * h,
            np.full(n, 1e-2),
            2 * _STD_POS * h,
            10 * _STD_VEL * h,
            10 * _STD_VEL * h,
            np.full(n, 1e-5),
            10 * _STD_VEL * h,
        ],
        axis=1,
    )
    cov = np.zeros((n, 8, 8))
    idx = np.arange(8)
    cov[:, idx, idx] = std**2
    return mean, cov


def predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(mean) == 0:
        return mean, cov
    h = mean[:, 3]
    n = len(mean)
    std = np.stack(
        [
            _STD_POS * h,
            _STD_POS * h,
            np.full(n, 1e-2),
            _STD_POS * h,
            _STD_VEL * h,
            _STD_VEL * h,
            np.full(n, 1e-5),
            _STD_VEL * h,
        ],
        axis=1,
    )
    mean = mean @ _F.T
    cov = _F @ cov @ _F.T
    idx = np.arange(8)
    cov[:, idx, idx] += std**2
    return mean, cov


def update(
    mean: np.ndarray, cov: np.ndarray, measurement: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Correct states with xyah measurements, all arrays aligned row by row."""
    if len(mean) == 0:
        return mean, cov
    h = mean[:, 3]
    n = len(mean)
    std = np.stack([_STD_POS * h, _STD_POS * h, np.full(n, 1e-1), _STD_POS * h], axis=1)
    proj_mean = mean[:, :4]
    proj_cov = cov[:, :4, :4].copy()
    idx = np.arange(4)
    proj_cov[:, idx, idx] += std**2
    # K = P H^T S^-1; H selects the first four state entries.
    pht = cov[:, :, :4]
    gain = np.linalg.solve(proj_cov, pht.transpose(0, 2, 1)).transpose(0, 2, 1)
    innovation = measurement - proj_mean
    mean = mean + np.einsum("nij,nj->ni", gain, innovation)
    cov = cov - gain @ proj_cov @ gain.transpose(0, 2, 1)
    return mean, cov
