"""``flowfleet models quantize``: static int8 QDQ quantisation of a float ONNX YOLO model.

Steps:

1. Sample frames evenly from a video (or an image folder); every k-th sample is held
   out, the rest calibrate. Frames are letterboxed exactly as the ONNX backend does
   at run time (``ONNXDetector``), so calibration sees the real input distribution.
2. ``onnxruntime.quantization.quant_pre_process`` (shape inference, graph
   optimisation), then ``quantize_static`` in QDQ format: uint8 activations, int8
   weights (per tensor or per channel), ranges from MinMax / Entropy / Percentile
   calibration.
3. The YOLO decode tail (everything between the last convolutions and the output:
   DFL softmax, box arithmetic, sigmoid, the final concat of boxes in pixels with
   scores in 0..1) stays float: quantising that concat to 8 bits with one range
   would wipe out the scores.
4. Agreement on the held-out frames: both models run through the agent's own
   detector, and each float detection is matched to a same-class int8 detection
   with IoU >= 0.5.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
}


class QuantizeError(Exception):
    """One-line error; ``code`` 1 for an unusable file, 2 for bad usage."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def sample_frames(source: str | Path, count: int) -> list[np.ndarray]:
    """``count`` BGR frames spread evenly over a video file or an image folder.

    Raises:
        QuantizeError: missing/unreadable source or fewer frames than asked for.
    """
    src = Path(source)
    if not src.exists():
        raise QuantizeError(f"{src}: calibration source not found")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < count:
            raise QuantizeError(
                f"{src}: {len(files)} images ({', '.join(IMAGE_SUFFIXES)}), need {count}"
            )
        picks = np.linspace(0, len(files) - 1, count).round().astype(int)
        frames = []
        for i in picks:
            img = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
            if img is None:
                raise QuantizeError(f"{files[i]}: cannot decode image")
            frames.append(img)
        return frames
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise QuantizeError(f"{src}: cannot open video")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if total <= 0:  # unknown length: decode everything once
            frames_all = []
            while True:
                ok, f = cap.read()
                if not ok:
                    break
                frames_all.append(f)
            total = len(frames_all)
            if total < count:
                raise QuantizeError(f"{src}: video has {total} frames, need {count}")
            picks = np.linspace(0, total - 1, count).round().astype(int)
            return [frames_all[i] for i in picks]
        if total < count:
            raise QuantizeError(f"{src}: video has {total} frames, need {count}")
        wanted = set(np.linspace(0, total - 1, count).round().astype(int).tolist())
        frames = []
        i = 0
        while len(frames) < len(wanted):
            ok, f = cap.read()
            if not ok:
                break
            if i in wanted:
                frames.append(f)
            i += 1
    finally:
        cap.release()
    if len(frames) < len(wanted):
        raise QuantizeError(f"{src}: video ended after {i} frames, need {count} samples")
    return frames


def _decode_tail(model) -> list[str]:
    """Names of the nodes between the graph outputs and the last Conv layers."""
    producer = {o: n for n in model.graph.node for o in n.output}
    tail: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            continue
        tail.append(node.name)
        stack.extend(node.input)
    return tail


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def agreement(ref_dets: list, test_dets: list, iou: float = 0.5) -> dict:
    """Match each reference detection to an unused same-class test detection (greedy by
    score) with IoU >= ``iou``; report recall/precision against the reference."""
    matched = n_ref = n_test = 0
    ious: list[float] = []
    for a, b in zip(ref_dets, test_dets, strict=True):
        n_ref += len(a)
        n_test += len(b)
        if not len(a) or not len(b):
            continue
        m = _iou(a.xyxy, b.xyxy)
        m[a.class_id[:, None] != b.class_id[None, :]] = 0
        used = np.zeros(len(b), bool)
        for i in np.argsort(-a.confidence):
            row = np.where(used, 0, m[i])
            j = int(np.argmax(row))
            if row[j] >= iou:
                used[j] = True
                matched += 1
                ious.append(float(row[j]))
    return {
        "reference_detections": n_ref,
        "quantized_detections": n_test,
        "matched": matched,
        "recall": round(matched / n_ref, 4) if n_ref else None,
        "precision": round(matched / n_test, 4) if n_test else None,
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
    }


def quantize_onnx(
    model: str | Path,
    output: str | Path,
    *,
    calib: str | Path,
    frames: int = 32,
    holdout: int = 8,
    method: str = "minmax",
    per_channel: bool = False,
    conf_threshold: float = 0.25,
    threads: int = 2,
    overwrite: bool = False,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Quantise ``model`` to static int8 QDQ at ``output``; return a report dict.

    Raises:
        QuantizeError: bad arguments (code 2) or unusable input files (code 1).
        ModelError: the float model cannot be loaded by the agent's ONNX backend.
    """
    from flowfleet.agent.detectors.onnx import ONNXDetector

    src, dst = Path(model), Path(output)
    if frames < 1 or holdout < 0:
        raise QuantizeError("--frames must be >= 1 and --holdout >= 0", 2)
    if dst.suffix.lower() != ".onnx":
        raise QuantizeError(f"{dst}: output must be an .onnx file", 2)
    if dst.exists() and not overwrite:
        raise QuantizeError(f"{dst}: output exists (use --force to overwrite)", 2)
    if dst.resolve() == src.resolve():
        raise QuantizeError(f"{dst}: output would overwrite the input model", 2)
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise QuantizeError(f"quantize needs onnx and onnxruntime: {e}") from None

    ref = ONNXDetector(src, threads=threads, conf_threshold=conf_threshold, providers="cpu")
    try:
        proto = onnx.load(str(src))
    except Exception as e:
        raise QuantizeError(f"{src}: cannot read ONNX model: {_one_line(e)}") from e
    q_ops = sorted({n.op_type for n in proto.graph.node} & QUANT_OPS)
    if q_ops:
        raise QuantizeError(
            f"{src}: model is already quantised ({', '.join(q_ops)}); give the float model"
        )

    samples = sample_frames(calib, frames + holdout)
    # Interleave: every k-th sample is held out, so both sets span the whole source.
    held_idx = (
        set(np.linspace(0, len(samples) - 1, holdout).round().astype(int).tolist())
        if holdout
        else set()
    )
    if len(held_idx) < holdout:
        held_idx = set(range(len(samples) - holdout, len(samples)))
    calib_frames = [f for i, f in enumerate(samples) if i not in held_idx]
    held_frames = [f for i, f in enumerate(samples) if i in held_idx]

    name = ref._in_name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib_frames)

        def get_next(self):
            frame = next(self._it, None)
            if frame is None:
                return None
            ref._set_input(frame)
            if progress is not None:
                progress(1)
            return {name: ref._input.copy()}

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise QuantizeError(f"unknown calibration method {method!r}", 2)
    exclude = _decode_tail(proto)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowfleet-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            exclude = _decode_tail(onnx.load(str(pre)))
        except Exception:
            pre = src
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(dst.name + ".part")
        try:
            quantize_static(
                str(pre),
                str(part),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=methods[method],
                nodes_to_exclude=exclude,
            )
        except Exception as e:
            part.unlink(missing_ok=True)
            raise QuantizeError(f"{src}: quantisation failed: {_one_line(e)}") from e
        # Keep the model's metadata (labels in `names`, ...) on the quantised copy.
        q = onnx.load(str(part))
        have = {p.key for p in q.metadata_props}
        for p in proto.metadata_props:
            if p.key not in have:
                q.metadata_props.add(key=p.key, value=p.value)
        q.metadata_props.add(key="flowfleet.quantize", value=f"static QDQ u8s8 {method}")
        onnx.save(q, str(part))
        os.replace(part, dst)
    quant_s = time.perf_counter() - t0

    test = ONNXDetector(dst, threads=threads, conf_threshold=conf_threshold, providers="cpu")
    try:
        ref_dets, test_dets = [], []
        ref_ms, test_ms = [], []
        for f in held_frames:
            t = time.perf_counter()
            ref_dets.append(ref.detect(f))
            ref_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            test_dets.append(test.detect(f))
            test_ms.append((time.perf_counter() - t) * 1000)
        agree = agreement(ref_dets, test_dets)
        labels_kept = test.labels == ref.labels
    finally:
        test.close()
        ref.close()
    return {
        "model": str(src),
        "output": str(dst),
        "calibration_source": str(calib),
        "calibration_frames": len(calib_frames),
        "holdout_frames": len(held_frames),
        "method": method,
        "per_channel": per_channel,
        "format": "QDQ (uint8 activations, int8 weights)",
        "float_kept_nodes": len(exclude),
        "seconds": round(quant_s, 1),
        "size_bytes": {"float": src.stat().st_size, "int8": dst.stat().st_size},
        "conf_threshold": conf_threshold,
        "agreement": agree,
        "labels_kept": labels_kept,
        "detect_ms_mean": {
            "float": round(float(np.mean(ref_ms)), 1) if ref_ms else None,
            "int8": round(float(np.mean(test_ms)), 1) if test_ms else None,
        },
    }


def format_report(r: dict) -> str:
    a = r["agreement"]

    def pct(v):
        return "n/a" if v is None else f"{v * 100:.1f}%"

    return "\n".join(
        [
            f"wrote {r['output']} ({r['format']}, {r['method']} calibration on "
            f"{r['calibration_frames']} frames of {r['calibration_source']}, {r['seconds']} s)",
            f"size: float {r['size_bytes']['float']:,} bytes -> "
            f"int8 {r['size_bytes']['int8']:,} bytes",
            f"agreement with the float model on {r['holdout_frames']} held-out frames "
            f"(score > {r['conf_threshold']}, same class, IoU >= 0.5): "
            f"{a['matched']}/{a['reference_detections']} float detections found "
            f"(recall {pct(a['recall'])}), precision {pct(a['precision'])}, "
            f"mean IoU {a['mean_iou'] if a['mean_iou'] is not None else 'n/a'}",
            f"detect ms (mean, held-out): float {r['detect_ms_mean']['float']}, "
            f"int8 {r['detect_ms_mean']['int8']}",
        ]
    )
