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
from ..labels import COCO_80, load_labels


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

    def _set_decode_options(
        self,
        *,
        conf_threshold: float,
        iou_threshold: float,
        agnostic_nms: bool,
        max_det: int,
        threads: int,
    ) -> None:
        """Check and store the options every runtime that decodes on the host shares."""
        if not 0.0 <= conf_threshold <= 1.0:
            raise ValueError(f"conf_threshold must be in 0..1, got {conf_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.conf_threshold = float(conf_threshold)
        self.iou_threshold = float(iou_threshold)
        self.agnostic_nms = bool(agnostic_nms)
        self.max_det = int(max_det)
        self.threads = int(threads)


def one_line(exc: BaseException) -> str:
    """An exception as one line of text (runtimes' messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def resolve_labels(
    model_path, labels, num_classes: int, embedded=None, embedded_source: str = "embedded"
) -> tuple[tuple[str, ...], str]:
    """Pick the label vocabulary for a model with ``num_classes`` outputs.

    Order: an explicit label file; the labels the model carries (``embedded``: a
    callable returning them or None, read only when needed; reported as
    ``embedded_source``); COCO-80 when the head has 80 classes; ``class0..classN-1``.

    Returns ``(labels, source)``. Raises ModelError when the label file is unreadable
    or its count does not match the model's classes.
    """
    if labels is not None:
        try:
            names = load_labels(labels)
        except OSError as e:
            raise ModelError(
                f"{labels}: cannot read label file for model {model_path}: "
                f"{e.strerror or one_line(e)}"
            ) from e
        except ValueError as e:
            raise ModelError(f"{one_line(e)} (labels for model {model_path})") from e
        if len(names) != num_classes:
            raise ModelError(
                f"{labels}: label file has {len(names)} names but model {model_path} "
                f"outputs {num_classes} classes"
            )
        return names, "file"
    names = embedded() if embedded is not None else None
    if names is not None and len(names) == num_classes:
        return tuple(names), embedded_source
    if num_classes == len(COCO_80):
        return COCO_80, "coco80"
    return tuple(f"class{i}" for i in range(num_classes)), "generic"
