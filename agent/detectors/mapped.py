"""A detector whose labels go through a ``LabelMap`` (model vocabulary -> flow classes)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..detections import Detections
from ..labels import LabelMap
from .base import Detector
from .yolo import nms_per_class


class MappedDetector(Detector):
    """Wraps a detector; ``labels`` and every result use the mapped vocabulary.

    When the map merges several model labels into one (``sedan`` and
    ``pickup_suv_van`` -> ``car``), overlapping boxes that now share a class are
    suppressed once more, so one vehicle scored as both is one ``car``.

    Attributes:
        inner: the wrapped runtime detector (``inner.labels`` are the model's own).
        label_map: the ``LabelMap`` applied.
    """

    def __init__(self, inner: Detector, label_map: LabelMap, iou_threshold: float = 0.45) -> None:
        self.inner = inner
        self.label_map = label_map
        self.iou_threshold = float(iou_threshold)
        self.info = replace(inner.info, labels=label_map.labels)

    def __getattr__(self, name: str):
        # runtime, decoder, input_size, providers, label_source, reset_state, ...
        return getattr(self.inner, name)

    @property
    def model_labels(self) -> tuple[str, ...]:
        return self.inner.labels

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        dets = self.label_map.apply(self.inner.detect(frame_bgr))
        if self.label_map.merges and len(dets) > 1:
            keep = nms_per_class(dets.xyxy, dets.confidence, dets.class_id, self.iou_threshold)
            dets = dets[np.sort(keep)]
        return dets

    def invoke_raw(self) -> None:
        self.inner.invoke_raw()

    def close(self) -> None:
        self.inner.close()
