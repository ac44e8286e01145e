"""Detector backends and ``load_detector``, which picks one by the file's content.

The runtime is chosen from the bytes, not the file name, so a renamed or mislabelled
file gets a precise error instead of a confusing one from the wrong SDK.
"""

from __future__ import annotations

from pathlib import Path

from .base import Detector, ModelError, ModelInfo

__all__ = ["Detector", "ModelError", "ModelInfo", "load_detector", "sniff_runtime"]


def sniff_runtime(head: bytes) -> str | None:
    """Name the runtime for a model file from its first bytes (at least 8), or None.

    * ``tflite``: a TFLite flatbuffer carries the file identifier ``TFL3`` at bytes 4..8.
    * ``eim``: Edge Impulse ``.eim`` models are Linux executables (ELF).
    * ``onnx``: an ONNX ``ModelProto`` is a protobuf whose first field is
      ``ir_version`` (field 1, varint: tag byte 0x08) followed by a small version.
    """
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if head[:4] == b"\x7fELF":
        return "eim"
    if len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80:
        return "onnx"
    return None


def load_detector(
    path: str | Path,
    *,
    labels: str | Path | None = None,
    threads: int = 2,
    conf_threshold: float = 0.1,
    iou_threshold: float = 0.45,
    agnostic_nms: bool = False,
    warmup: int = 2,
) -> Detector:
    """Load a detection model, choosing the runtime by file content.

    Args:
        path: model file (TFLite today; ONNX and Edge Impulse ``.eim`` later).
        labels: label file (plain text, indexed text or ``.pbtxt`` label map);
            default: labels embedded in the model, else COCO-80 for 80-class heads,
            else ``class0..``.
        threads: CPU threads for the runtime.
        conf_threshold: minimum score kept.
        iou_threshold: NMS IoU threshold.
        agnostic_nms: NMS across classes (one box per object even if car and truck
            both fire), useful when counting.
        warmup: invocations run at load, so the runtime's one-off set-up cost
            (XNNPACK packs weights on the first invoke) is not paid by the first frame
            and a model that cannot run fails here rather than mid-stream.

    Raises:
        ModelError: one line naming the file: missing, empty, truncated or corrupt,
            an unsupported runtime or format, or an output no decoder understands
            (checked here, before any frame).
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: model file not found")
    if not p.is_file():
        raise ModelError(f"{p}: not a regular file")
    try:
        with p.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ModelError(f"{p}: cannot read model file: {e.strerror or e}") from e
    if not head:
        raise ModelError(f"{p}: model file is empty")
    if len(head) < 8:
        raise ModelError(f"{p}: model file is truncated ({len(head)} bytes)")

    runtime = sniff_runtime(head)
    if runtime == "tflite":
        from .tflite import TFLiteDetector

        detector = TFLiteDetector(
            p,
            labels=labels,
            threads=threads,
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            agnostic_nms=agnostic_nms,
        )
        try:
            for _ in range(warmup):
                detector.invoke_raw()
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{p}: model failed its warm-up inference: {e}") from e
        return detector
    if runtime == "onnx":
        raise ModelError(f"{p}: ONNX models are not supported yet (no ONNX Runtime backend)")
    if runtime == "eim":
        raise ModelError(f"{p}: Edge Impulse .eim models are not supported yet")
    raise ModelError(
        f"{p}: not a model file this agent understands (expected a TFLite flatbuffer with "
        f"'TFL3' at bytes 4..8; first bytes {head[:8]!r})"
    )
