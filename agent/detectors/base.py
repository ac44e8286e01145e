"""The small interface every detector runtime implements.

A runtime module (tflite.py, later onnx.py, eim.py) imports its SDK inside the module
only, so the agent imports and runs on machines that lack the other runtimes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import cv2
import numpy as np

from ..detections import Detections


class ModelError(Exception):
    """A model file that cannot be used; the message names the file and the reason."""


def check_frame(frame: np.ndarray) -> np.ndarray:
    """Validate a frame and return it as (H, W, 3) uint8 BGR (grey and BGRA converted).

    Raises:
        ValueError: not a non-empty uint8 image array.
    """
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ValueError("frame must be a uint8 numpy array (H, W, 3) in BGR order")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame must be (H, W, 3) BGR, got shape {frame.shape}")
    return frame


@dataclass(frozen=True)
class ModelInfo:
    path: str
    runtime: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_shapes: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]


class Detector(ABC):
    """Turns a BGR frame (H, W, 3 uint8, as OpenCV decodes it) into Detections.

    ``detect`` returns boxes in the frame's own pixel coordinates with ``names`` set
    to the model's label vocabulary; mapping labels to flow classes is the caller's.
    """

    info: ModelInfo

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @abstractmethod
    def detect(self, frame_bgr: np.ndarray) -> Detections: ...

    def invoke_raw(self) -> None:
        """Run the model once on the already-set input (for raw-rate benchmarks)."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""
