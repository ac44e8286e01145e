"""Detector backends and ``load_detector``, which picks one by the file's content.

The runtime is chosen from the bytes, not the file name, so a renamed or mislabelled
file gets a precise error instead of a confusing one from the wrong SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import Detector, ModelError, ModelInfo, one_line

__all__ = [
    "Detector",
    "ModelError",
    "ModelInfo",
    "is_eim_script",
    "load_detector",
    "sniff_runtime",
]


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
    providers: str | Sequence[str] | None = None,
    label_map: str | Path | dict | None = "auto",
) -> Detector:
    """Load a detection model, choosing the runtime by file content.

    Args:
        path: model file: TFLite flatbuffer, ONNX, or Edge Impulse ``.eim``
            (an ELF executable, or an executable ``#!`` script named ``*.eim``).
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
        providers: ONNX Runtime execution providers (``"auto"``/None: TensorRT, CUDA
            when available, else CPU; or e.g. ``"cpu"``, ``"cuda,cpu"``); ignored by
            the other runtimes. See ``onnx.choose_providers``.
        label_map: rename the model's labels before anything sees them:
            ``"auto"`` (default) applies the built-in flow map (``labels.FLOW_SYNONYMS``:
            ``sedan``/``pickup_suv_van`` -> ``car``, ``large_veh_bus`` -> ``bus``, ...)
            only to models whose labels name none of the flow classes, so COCO models
            are untouched; ``"flow"`` always applies it; a dict or a label-map file
            (``model label = target`` lines, or TOML ``[labels]``) applies that map;
            None keeps the model's labels. The wrapped detector's ``model_labels``
            keeps the originals.

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
    if runtime is None and is_eim_script(p, head):
        runtime = "eim"
    common = dict(
        labels=labels,
        threads=threads,
        conf_threshold=conf_threshold,
        iou_threshold=iou_threshold,
        agnostic_nms=agnostic_nms,
    )
    if runtime == "tflite":
        from .tflite import TFLiteDetector

        detector: Detector = TFLiteDetector(p, **common)
    elif runtime == "onnx":
        from .onnx import ONNXDetector

        detector = ONNXDetector(p, providers=providers, **common)
    elif runtime == "eim":
        from .eim import EIMDetector

        detector = EIMDetector(p, **common)
    else:
        raise ModelError(
            f"{p}: not a model file this agent understands (expected a TFLite flatbuffer "
            f"with 'TFL3' at bytes 4..8, an ONNX protobuf or an Edge Impulse .eim "
            f"executable; first bytes {head[:8]!r})"
        )
    try:
        for _ in range(warmup):
            detector.invoke_raw()
    except ModelError:
        detector.close()
        raise
    except Exception as e:
        detector.close()
        raise ModelError(f"{p}: model failed its warm-up inference: {one_line(e)}") from e
    return _with_label_map(detector, label_map, p, iou_threshold)


def _with_label_map(detector: Detector, spec, path: Path, iou_threshold: float) -> Detector:
    from ..labels import LabelMap, auto_label_map, load_label_map
    from .mapped import MappedDetector

    if spec is None:
        return detector
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        lmap = auto_label_map(detector.labels)
    else:
        try:
            mapping = load_label_map(spec)
        except (OSError, ValueError) as e:
            detector.close()
            raise ModelError(f"{one_line(e)} (label map for model {path})") from e
        lmap = LabelMap(mapping or {}, detector.labels)
    if lmap is None or lmap.identity:
        return detector
    return MappedDetector(detector, lmap, iou_threshold=iou_threshold)


def is_eim_script(path: Path, head: bytes) -> bool:
    """A script named ``*.eim`` (``#!`` first line) is taken for an Edge Impulse model.

    Real ``.eim`` files are ELF executables and sniff as ``eim`` by content; a ``#!``
    script is accepted too when its name ends in ``.eim`` (wrappers, and the test
    suite's protocol stand-in), so a text file merely renamed ``.tflite`` is still
    "not a model file". The backend then requires the executable bit.
    """
    return head[:2] == b"#!" and path.suffix.lower() == ".eim"
