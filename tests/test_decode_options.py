"""Every runtime that decodes on the host refuses bad decode options up front.

The check runs before the model is opened, so the ``.eim`` case needs no executable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowfleet.agent.detectors.eim import EIMDetector
from flowfleet.agent.detectors.onnx import ONNXDetector
from flowfleet.agent.detectors.tflite import TFLiteDetector

RUNTIMES = {
    "tflite": (TFLiteDetector, "yolov8n_full_integer_quant.tflite"),
    "onnx": (ONNXDetector, "yolov8n_int8.onnx"),
    "eim": (EIMDetector, "not-there.eim"),
}


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("conf_threshold", 1.5, "conf_threshold must be in 0..1, got 1.5"),
        ("conf_threshold", -0.1, "conf_threshold must be in 0..1, got -0.1"),
        ("iou_threshold", 0.0, r"iou_threshold must be in \(0, 1\], got 0.0"),
        ("iou_threshold", 1.2, r"iou_threshold must be in \(0, 1\], got 1.2"),
        ("threads", 0, "threads must be >= 1, got 0"),
    ],
)
def test_bad_decode_option_is_refused(data: Path, runtime, option, value, message):
    cls, model = RUNTIMES[runtime]
    with pytest.raises(ValueError, match=message):
        cls(data / "models" / model, **{option: value})
