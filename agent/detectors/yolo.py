"""Runtime-independent pieces of a YOLO detector: letterbox, (de)quantisation, NMS, decode.

Everything here is plain numpy/OpenCV so each runtime backend (TFLite, ONNX, ...)
shares one implementation and the maths can be tested without a model.

Conventions:
    * ``size`` arguments are an ``int`` (square) or ``(height, width)``, the order of
      the model's input tensor, not OpenCV's ``(width, height)``.
    * Boxes are ``(N, 4)`` float32 ``x1, y1, x2, y2``.
    * YOLOv8/YOLO11 heads output ``[1, 4 + C, N]`` (or transposed ``[1, N, 4 + C]``):
      ``cx, cy, w, h`` then ``C`` class scores that are already sigmoid-ed; there is
      no objectness column and no NMS inside the model. Depending on the exporter
      the box values are normalised to 0..1 of the input or in input pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from .base import ModelError

Size = int | tuple[int, int]

PAD_VALUE = 114
"""Letterbox border grey, the value Ultralytics trains with."""

# Box coordinates whose maximum over all anchors stays below this are taken to be
# normalised (0..1, a little above 1 for boxes overhanging the border); pixel
# outputs of any realistic input size reach into the hundreds.
_NORMALIZED_MAX = 2.0

# Head strides of the YOLOv8 families: P3-P5 (standard), P2-P5 ("-p2"), P3-P6 ("-p6").
_STRIDE_SETS = ((8, 16, 32), (4, 8, 16, 32), (8, 16, 32, 64))


class OutputShapeError(ModelError, ValueError):
    """A model output that no decoder here understands.

    Both a ``ModelError`` (so loaders can let it through) and a ``ValueError`` (it is
    raised by pure functions that know nothing of files); loaders re-word it with the
    file name.
    """


class Decoded(NamedTuple):
    """Decoder result in model-input pixels; rows sorted by descending score."""

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32


class LetterboxParams(NamedTuple):
    """Geometry of one letterbox: resized size, scale factor and padding offsets."""

    new_w: int
    new_h: int
    scale: float
    pad_x: int
    pad_y: int


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def letterbox_params(frame_shape: tuple[int, ...], size: Size) -> LetterboxParams:
    """Compute the resize/pad geometry that fits ``frame_shape`` into ``size``.

    The image keeps its aspect ratio and is centred; an odd leftover pixel of
    padding goes right/bottom.
    """
    h, w = int(frame_shape[0]), int(frame_shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"cannot letterbox an empty frame of shape {tuple(frame_shape)}")
    out_h, out_w = _hw(size)
    scale = min(out_w / w, out_h / h)
    new_w = min(out_w, max(1, round(w * scale)))
    new_h = min(out_h, max(1, round(h * scale)))
    return LetterboxParams(new_w, new_h, scale, (out_w - new_w) // 2, (out_h - new_h) // 2)


def letterbox(
    frame: np.ndarray,
    size: Size,
    *,
    pad_value: int = PAD_VALUE,
    interpolation: int = cv2.INTER_LINEAR,
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize ``frame`` to fit ``size`` keeping its aspect ratio, pad the rest grey.

    Returns:
        ``(image, scale, (pad_x, pad_y))``: the padded image (a new array, same dtype
        and channel count as ``frame``), the resize factor, and the left/top padding.
        Map boxes back with ``unletterbox(boxes, scale, (pad_x, pad_y), frame.shape)``.
    """
    p = letterbox_params(frame.shape, size)
    out_h, out_w = _hw(size)
    if (p.new_w, p.new_h) != (frame.shape[1], frame.shape[0]):
        resized = cv2.resize(frame, (p.new_w, p.new_h), interpolation=interpolation)
    else:
        resized = frame
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    img = cv2.copyMakeBorder(
        resized,
        p.pad_y,
        out_h - p.new_h - p.pad_y,
        p.pad_x,
        out_w - p.new_w - p.pad_x,
        cv2.BORDER_CONSTANT,
        value=(pad_value,) * max(channels, 3),
    )
    return img, p.scale, (p.pad_x, p.pad_y)


def unletterbox(
    boxes_xyxy: np.ndarray,
    scale: float,
    pad: tuple[float, float],
    frame_shape: tuple[int, ...],
) -> np.ndarray:
    """Map xyxy boxes from letterboxed-input pixels back to the original frame.

    Inverse of ``letterbox``; results are clipped to ``[0, width] x [0, height]`` of
    ``frame_shape`` (boxes overhanging the border would otherwise reach into the
    padding). Returns a new ``(N, 4)`` float32 array.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    px, py = float(pad[0]), float(pad[1])
    out = (b - np.array([px, py, px, py], np.float32)) * np.float32(1.0 / scale)
    h, w = frame_shape[0], frame_shape[1]
    np.clip(out, 0.0, np.array([w, h, w, h], np.float32), out=out)
    return out


def dequantize(arr: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 (affine per-tensor quantisation).

    A ``scale`` of 0 is how TFLite marks a tensor that is not quantised; the values
    are then returned as float32 unchanged.
    """
    a = np.asarray(arr)
    if not scale:
        return a.astype(np.float32, copy=False)
    out = a.astype(np.float32)
    out -= np.float32(zero_point)
    out *= np.float32(scale)
    return out


def quantize(arr_float: np.ndarray, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    """``round(x / scale) + zero_point`` saturated to ``dtype`` (int8, uint8, int16...)."""
    if not scale:
        raise ValueError("quantize needs a non-zero scale")
    info = np.iinfo(dtype)
    q = np.round(np.asarray(arr_float, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    *,
    max_det: int | None = None,
) -> np.ndarray:
    """Greedy class-agnostic non-maximum suppression.

    Walks boxes by descending score; each kept box suppresses every remaining box
    whose IoU with it exceeds ``iou_threshold``. Each step is one vectorised IoU of
    the kept box against what remains, so the Python loop runs once per *kept* box,
    not per candidate.

    Returns:
        int64 indices into ``boxes`` of the kept boxes, by descending score.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, i]) for i in range(4))
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    limit = n if max_det is None else max(0, int(max_det))
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        union = areas[i] + areas[rest] - inter
        # IoU > thr  <=>  inter > thr * union, which avoids a division (and 0/0).
        order = rest[inter <= iou_threshold * union]
    return np.asarray(keep, dtype=np.int64)


def nms_per_class(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    *,
    max_det: int | None = None,
) -> np.ndarray:
    """Class-aware NMS: boxes only suppress boxes of the same class.

    Uses the offset trick: each class is shifted by ``class_id * (extent + 1)`` so
    boxes of different classes can never overlap, then one agnostic pass runs.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    extent = float(b.max() - b.min()) + 1.0
    shifted = b + (np.asarray(class_ids, dtype=np.float64) * extent)[:, None]
    return nms(shifted, scores, iou_threshold, max_det=max_det)


def expected_anchor_counts(input_size: Size) -> tuple[int, ...]:
    """Anchor counts a YOLOv8-style head can have for this input (one per stride set)."""
    h, w = _hw(input_size)
    return tuple(
        sum(math.ceil(h / s) * math.ceil(w / s) for s in strides) for strides in _STRIDE_SETS
    )


def yolov8_layout(shape: tuple[int, ...], input_size: Size | None = None) -> tuple[bool, int, int]:
    """Work out how a YOLOv8/YOLO11 output tensor is laid out.

    Args:
        shape: the output tensor shape: ``[1, 4+C, N]``, ``[1, N, 4+C]`` or either
            without the batch dimension.
        input_size: when given, the anchor count must match a YOLOv8 head for this
            input (8400 for 640x640); this both disambiguates the layout and rejects
            other heads with a similar rank (e.g. YOLOv10's ``[1, 300, 6]``).

    Returns:
        ``(channels_first, num_classes, num_anchors)``.

    Raises:
        OutputShapeError: the shape is not a YOLOv8-style detection head.
    """
    shape = tuple(int(d) for d in shape)
    expected = "[1, 4+C, N] or [1, N, 4+C] (YOLOv8/YOLO11 detection head)"
    if len(shape) == 3 and shape[0] == 1:
        a, b = shape[1], shape[2]
    elif len(shape) == 2:
        a, b = shape
    else:
        raise OutputShapeError(f"unsupported output shape {list(shape)}: expected {expected}")
    if input_size is not None:
        anchors = expected_anchor_counts(input_size)
        if b in anchors and a >= 5:
            return True, a - 4, b
        if a in anchors and b >= 5:
            return False, b - 4, a
        h, w = _hw(input_size)
        raise OutputShapeError(
            f"unsupported output shape {list(shape)}: expected {expected} with N="
            f"{anchors[0]} anchors for a {h}x{w} input"
        )
    # Without an input size: the anchor axis is the long one (8400 vs 84).
    if a < b and a >= 5:
        return True, a - 4, b
    if b < a and b >= 5:
        return False, b - 4, a
    raise OutputShapeError(f"unsupported output shape {list(shape)}: expected {expected}")


def decode_yolov8(
    output: np.ndarray,
    *,
    input_size: Size,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    normalized: bool | None = None,
    quantization: tuple[float, int] | None = None,
    agnostic: bool = False,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> Decoded:
    """Decode a YOLOv8/YOLO11 detection head into boxes, scores and class ids.

    Args:
        output: ``[1, 4+C, N]`` or ``[1, N, 4+C]`` (batch axis optional), float or, with
            ``quantization``, the raw integer tensor.
        input_size: model input ``int`` or ``(height, width)``; normalised boxes are
            scaled by it.
        conf_threshold: keep anchors whose best class score is above this.
        iou_threshold: NMS IoU threshold.
        normalized: box units; ``None`` detects them (all box values <= 2 means 0..1
            of the input, otherwise input pixels). TFLite Ultralytics exports are
            normalised, ONNX ones are in pixels.
        quantization: ``(scale, zero_point)`` of an integer output. Anchors are then
            filtered on the raw integers and only survivors are dequantised, which
            avoids converting the whole ``84 x 8400`` tensor every frame.
        agnostic: class-agnostic NMS (one box per object even when two classes, say
            car and truck, both fire) instead of per-class NMS.
        max_det: keep at most this many detections after NMS.
        max_candidates: cap on boxes entering NMS (highest scores kept).

    Returns:
        ``Decoded(boxes, scores, class_ids)``, boxes xyxy in input pixels.

    Raises:
        OutputShapeError: the output shape is not a YOLOv8-style head.
    """
    arr = np.asarray(output)
    channels_first, _, _ = yolov8_layout(arr.shape)
    a = arr.reshape(arr.shape[-2:])
    if not channels_first:
        a = a.T  # a view: rows are channels either way, no copy
    box_raw, cls_raw = a[:4], a[4:]

    scale = zp = None
    if quantization is not None and quantization[0] and np.issubdtype(arr.dtype, np.integer):
        scale, zp = float(quantization[0]), int(quantization[1])

    # Cheap pre-filter on the best class score of each anchor. For an integer tensor
    # the threshold is moved into the integer domain (rounded down, so nothing that
    # would pass after dequantisation is lost); the exact test follows below.
    best = cls_raw.max(axis=0)
    if scale is not None:
        info = np.iinfo(arr.dtype)
        thr = math.floor(conf_threshold / scale + zp)
        if thr > info.max:
            return _empty_decoded()
        cand = np.flatnonzero(best >= max(thr, info.min))
    else:
        cand = np.flatnonzero(best > conf_threshold)

    h, w = _hw(input_size)
    if cand.size == 0:
        return _empty_decoded()

    cls_c = cls_raw[:, cand]
    class_ids = cls_c.argmax(axis=0)
    scores = cls_c[class_ids, np.arange(cand.size)]
    boxes_c = box_raw[:, cand]
    if scale is not None:
        scores = dequantize(scores, scale, zp)
        boxes_c = dequantize(boxes_c, scale, zp)
    scores = scores.astype(np.float32, copy=False)
    boxes_c = boxes_c.astype(np.float32, copy=False)

    exact = scores > conf_threshold
    if not exact.all():
        scores, class_ids, boxes_c = scores[exact], class_ids[exact], boxes_c[:, exact]
        if scores.size == 0:
            return _empty_decoded()
    if scores.size > max_candidates:
        top = np.argpartition(-scores, max_candidates - 1)[:max_candidates]
        scores, class_ids, boxes_c = scores[top], class_ids[top], boxes_c[:, top]

    if normalized is None:
        # Decided over all anchors, not just survivors: robust even with few boxes.
        peak = float(box_raw.max())
        if scale is not None:
            peak = (peak - zp) * scale
        normalized = peak <= _NORMALIZED_MAX
    cx, cy, bw, bh = boxes_c
    if normalized:
        cx, bw = cx * w, bw * w
        cy, bh = cy * h, bh * h
    half_w, half_h = bw * 0.5, bh * 0.5
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)

    if agnostic:
        keep = nms(boxes, scores, iou_threshold, max_det=max_det)
    else:
        keep = nms_per_class(boxes, scores, class_ids, iou_threshold, max_det=max_det)
    return Decoded(
        boxes[keep].astype(np.float32, copy=False),
        scores[keep],
        class_ids[keep].astype(np.int32),
    )


def _empty_decoded() -> Decoded:
    return Decoded(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
