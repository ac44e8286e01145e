"""The small interface every detector runtime implements.

A runtime module (tflite.py, later onnx.py, eim.py) imports its SDK inside the module
only, so the agent imports and runs on machines that lack the other runtimes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..detections import Detections


class ModelError(Exception):
    """A model file that cannot be used; the message names the file and the reason."""


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
