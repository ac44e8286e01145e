"""YOLO helpers without a model: quantisation, letterbox, NMS, output decoding."""

from __future__ import annotations

import numpy as np
import pytest

from flowfleet.agent.detectors.base import ModelError
from flowfleet.agent.detectors.yolo import (
    PAD_VALUE,
    OutputShapeError,
    decode_yolov8,
    dequantize,
    letterbox,
    nms,
    nms_per_class,
    quantize,
    unletterbox,
    yolov8_layout,
)

# The real yolov8n_full_integer_quant.tflite tensors (see ../shared/data/README.md).
IN_SCALE, IN_ZP = 0.01865844801068306, -14
OUT_SCALE, OUT_ZP = 0.003986023832112551, -128


# -- quantisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "zp", "dtype", "lo", "hi"),
    [
        pytest.param(IN_SCALE, IN_ZP, np.int8, 0.0, 1.0, id="model-input-int8"),
        pytest.param(OUT_SCALE, OUT_ZP, np.int8, 0.0, 1.0, id="model-output-int8"),
        pytest.param(1 / 255, 0, np.uint8, 0.0, 1.0, id="uint8-unit"),
        pytest.param(0.0078125, 128, np.uint8, -1.0, 0.99, id="uint8-symmetric"),
    ],
)
def test_quantize_dequantize_round_trip(scale, zp, dtype, lo, hi):
    x = np.linspace(lo, hi, 1001)
    q = quantize(x, scale, zp, dtype)
    assert q.dtype == dtype
    back = dequantize(q, scale, zp)
    assert back.dtype == np.float32
    # Round to nearest: the error is at most half a step.
    assert np.abs(back - x).max() <= scale / 2 + 1e-6
    # Every integer code survives dequantize -> quantize exactly.
    info = np.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1).astype(dtype)
    np.testing.assert_array_equal(quantize(dequantize(codes, scale, zp), scale, zp, dtype), codes)


def test_quantize_saturates_and_dequantize_passthrough():
    q = quantize(np.array([-100.0, 100.0]), IN_SCALE, IN_ZP, np.int8)
    assert q.tolist() == [-128, 127]
    assert dequantize(np.array([-128, 127], np.int8), OUT_SCALE, OUT_ZP).tolist() == pytest.approx(
        [0.0, 255 * OUT_SCALE]
    )
    # scale 0 is TFLite's "not quantised": values pass through as float32.
    np.testing.assert_array_equal(dequantize(np.array([0.5, 2.0]), 0.0, 0), [0.5, 2.0])
    with pytest.raises(ValueError):
        quantize(np.zeros(3), 0.0, 0, np.int8)


# -- letterbox ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame_hw", "size", "exp_scale", "exp_pad"),
    [
        pytest.param((432, 768), 640, 640 / 768, (0, 140), id="768x432"),
        pytest.param((540, 960), 640, 640 / 960, (0, 140), id="960x540"),
        pytest.param((960, 540), 640, 640 / 960, (140, 0), id="portrait-540x960"),
        pytest.param((480, 640), (384, 640), 384 / 480, (64, 0), id="640x480-into-640x384"),
        pytest.param((370, 1224), 640, 640 / 1224, (0, 223), id="kitti-1224x370"),
    ],
)
def test_letterbox_geometry_and_inverse(frame_hw, size, exp_scale, exp_pad):
    h, w = frame_hw
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img, scale, pad = letterbox(frame, size)
    assert img.shape == (out_h, out_w, 3) and img.dtype == np.uint8
    assert scale == pytest.approx(exp_scale)
    assert pad == exp_pad
    # Padding is grey on every side that has any.
    px, py = pad
    if py:
        assert (img[:py] == PAD_VALUE).all() and (img[-py:] == PAD_VALUE).all()
    if px:
        assert (img[:, :px] == PAD_VALUE).all() and (img[:, -px:] == PAD_VALUE).all()

    # Boxes mapped into the letterbox the way a detector would see them come back
    # to within 1 px (the resize rounds the scaled size to whole pixels).
    x1 = rng.uniform(0, w - 20, 50)
    y1 = rng.uniform(0, h - 20, 50)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, 20, 50), y1 + rng.uniform(5, 20, 50)], 1)
    sx, sy = (round(w * scale)) / w, (round(h * scale)) / h  # the actual resize factors
    in_model = boxes * [sx, sy, sx, sy] + [px, py, px, py]
    back = unletterbox(in_model, scale, pad, frame.shape)
    assert back.dtype == np.float32
    assert np.abs(back - boxes).max() < 1.0


@pytest.mark.parametrize("frame_hw", [(432, 768), (540, 960)])
def test_letterbox_content_round_trip(frame_hw):
    # A bright rectangle found in the letterboxed image maps back onto itself.
    h, w = frame_hw
    frame = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = 301, 97, 457, 333
    frame[y1:y2, x1:x2] = 255
    img, scale, pad = letterbox(frame, 640)
    ys, xs = np.nonzero(img[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = unletterbox(found, scale, pad, frame.shape)[0]
    assert np.abs(back - [x1, y1, x2, y2]).max() < 2.0  # interpolation blurs edges by <1 px


def test_unletterbox_clips_to_frame():
    boxes = np.array([[-30.0, 100.0, 700.0, 639.0]])
    out = unletterbox(boxes, 640 / 768, (0, 140), (432, 768, 3))
    assert out.min() >= 0
    assert out[0, 2] <= 768 and out[0, 3] <= 432
    assert unletterbox(np.zeros((0, 4)), 1.0, (0, 0), (10, 10)).shape == (0, 4)


# -- NMS --------------------------------------------------------------------------------

NMS_CASES = [
    pytest.param([[0, 0, 10, 10], [1, 1, 11, 11]], [0.9, 0.8], 0.5, [0], id="overlap-suppressed"),
    pytest.param([[0, 0, 10, 10], [20, 20, 30, 30]], [0.8, 0.9], 0.5, [1, 0], id="separate-kept"),
    pytest.param(
        [[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110], [101, 101, 111, 111]],
        [0.9, 0.85, 0.7, 0.95],
        0.5,
        [3, 0, 1],
        id="two-clusters-iou-1/3-kept",
    ),
    pytest.param([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.85], 0.3, [0], id="iou-1/3-above-0.3"),
    pytest.param(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.7, 0.6], 0.45, [1], id="dupes"
    ),
    pytest.param(np.zeros((0, 4)), [], 0.5, [], id="empty"),
]


@pytest.mark.parametrize(("boxes", "scores", "thr", "expected"), NMS_CASES)
def test_nms(boxes, scores, thr, expected):
    keep = nms(np.asarray(boxes, np.float32), np.asarray(scores, np.float32), thr)
    assert keep.dtype == np.int64
    assert keep.tolist() == expected


def test_nms_class_aware_and_max_det():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 0, 11, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    classes = np.array([2, 7, 2])
    # Same box, different class (car vs truck): class-aware keeps both, agnostic one.
    assert nms_per_class(boxes, scores, classes, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [0]
    separate = np.array([[0, 0, 5, 5], [10, 10, 15, 15], [20, 20, 25, 25]], np.float32)
    assert nms(separate, scores, 0.5, max_det=2).tolist() == [0, 1]


# -- decode -----------------------------------------------------------------------------

# (cx, cy, w, h) normalised to the 640x640 input, class id, score.
OBJECTS = [
    ((0.60, 0.44, 0.20, 0.50), 0, 0.92),  # a person
    ((0.20, 0.70, 0.15, 0.10), 2, 0.81),  # a car
    ((0.80, 0.20, 0.10, 0.10), 7, 0.30),  # a truck below a 0.35 threshold
]


def _synthetic_head(pixels: bool, *, duplicate: bool = True) -> np.ndarray:
    out = np.zeros((84, 8400), np.float32)
    rng = np.random.default_rng(1)
    # Background anchors: plausible boxes, scores far below any threshold.
    out[:4] = rng.uniform(0.05, 0.95, (4, 8400))
    out[4:] = rng.uniform(0.0, 0.02, (80, 8400))
    anchors = [1000, 4000, 8000]
    for a, (box, cls, score) in zip(anchors, OBJECTS, strict=True):
        out[:4, a] = box
        out[4 + cls, a] = score
    if duplicate:  # a slightly shifted, weaker copy of the person: NMS must drop it
        out[:4, 1001] = (0.605, 0.445, 0.20, 0.50)
        out[4, 1001] = 0.70
    if pixels:
        out[:4] *= 640
    return out[None]


def _expected(conf: float):
    rows = [(box, c, s) for box, c, s in OBJECTS if s > conf]
    xyxy = [
        [(cx - w / 2) * 640, (cy - h / 2) * 640, (cx + w / 2) * 640, (cy + h / 2) * 640]
        for (cx, cy, w, h), _, _ in rows
    ]
    return np.array(xyxy, np.float32), [c for _, c, _ in rows], [s for _, _, s in rows]


@pytest.mark.parametrize("layout", ["channels_first", "transposed"])
@pytest.mark.parametrize("pixels", [False, True], ids=["normalised", "pixels"])
@pytest.mark.parametrize("normalized_arg", [None, "explicit"], ids=["auto", "explicit"])
def test_decode_layouts_and_units(layout, pixels, normalized_arg):
    head = _synthetic_head(pixels)
    if layout == "transposed":
        head = np.ascontiguousarray(head.transpose(0, 2, 1))
    normalized = None if normalized_arg is None else not pixels
    dec = decode_yolov8(
        head, input_size=640, conf_threshold=0.35, iou_threshold=0.45, normalized=normalized
    )
    boxes, classes, scores = _expected(0.35)
    assert dec.class_ids.tolist() == classes
    np.testing.assert_allclose(dec.scores, scores, rtol=1e-6)
    np.testing.assert_allclose(dec.boxes, boxes, atol=1e-3)
    assert dec.boxes.dtype == np.float32 and dec.class_ids.dtype == np.int32


@pytest.mark.parametrize("layout", ["channels_first", "transposed"])
def test_decode_quantized_int8_matches_float(layout):
    # The real model's output quantisation: normalised boxes and scores share one scale.
    head = quantize(_synthetic_head(False), OUT_SCALE, OUT_ZP, np.int8)
    if layout == "transposed":
        head = np.ascontiguousarray(head.transpose(0, 2, 1))
    dec = decode_yolov8(head, input_size=640, conf_threshold=0.25, quantization=(OUT_SCALE, OUT_ZP))
    boxes, classes, scores = _expected(0.25)
    assert dec.class_ids.tolist() == classes
    np.testing.assert_allclose(dec.scores, scores, atol=OUT_SCALE)
    # Half a quantisation step in 0..1 units is 1.3 px at 640; corners add two halves.
    np.testing.assert_allclose(dec.boxes, boxes, atol=OUT_SCALE * 640 + 1e-3)
    # Integer-domain filtering loses nothing the float path keeps.
    as_float = decode_yolov8(
        dequantize(head, OUT_SCALE, OUT_ZP), input_size=640, conf_threshold=0.25
    )
    np.testing.assert_allclose(dec.boxes, as_float.boxes, atol=1e-4)
    np.testing.assert_array_equal(dec.class_ids, as_float.class_ids)


def test_decode_threshold_nms_modes_and_rectangular_input():
    head = _synthetic_head(False)
    assert len(decode_yolov8(head, input_size=640, conf_threshold=0.99).boxes) == 0
    assert len(decode_yolov8(head, input_size=640, conf_threshold=0.1).boxes) == 3
    # Same box for car and truck: kept twice class-aware, once agnostic.
    head[0, :4, 5000] = head[0, :4, 4000]
    head[0, 4 + 7, 5000] = 0.75
    assert len(decode_yolov8(head, input_size=640, conf_threshold=0.5).boxes) == 3
    assert len(decode_yolov8(head, input_size=640, conf_threshold=0.5, agnostic=True).boxes) == 2
    # Normalised boxes scale by (height, width) of a non-square input.
    one = np.zeros((1, 5, 10), np.float32)
    one[0, :, 3] = (0.5, 0.5, 0.5, 0.5, 0.9)
    dec = decode_yolov8(one, input_size=(320, 640), conf_threshold=0.5)
    np.testing.assert_allclose(dec.boxes, [[160, 80, 480, 240]])
    assert dec.class_ids.tolist() == [0]


@pytest.mark.parametrize(
    ("shape", "input_size"),
    [
        pytest.param((1, 84), None, id="1d-per-batch"),
        pytest.param((2, 84, 8400), None, id="batch-2"),
        pytest.param((1, 4, 8400), None, id="no-class-channels"),
        pytest.param((1, 1, 84, 8400), None, id="rank-4"),
        pytest.param((1, 84, 84), None, id="square-ambiguous"),
        pytest.param((1, 84, 2100), 640, id="anchors-for-320-input"),
        pytest.param((1, 300, 6), 640, id="yolov10-end-to-end"),
        pytest.param((1, 10, 4), 640, id="ssd-boxes"),
    ],
)
def test_unknown_output_shape_rejected(shape, input_size):
    with pytest.raises(OutputShapeError) as err:
        yolov8_layout(shape, input_size)
    assert isinstance(err.value, ModelError) and isinstance(err.value, ValueError)
    assert str(list(shape)) in str(err.value)
    if input_size is None:
        with pytest.raises(ValueError):
            decode_yolov8(np.zeros(shape, np.float32), input_size=640)


@pytest.mark.parametrize(
    ("shape", "input_size", "expected"),
    [
        ((1, 84, 8400), 640, (True, 80, 8400)),
        ((1, 8400, 84), 640, (False, 80, 8400)),
        ((1, 5, 2100), 320, (True, 1, 2100)),
        ((84, 8400), None, (True, 80, 8400)),
        ((1, 84, 5040), (384, 640), (True, 80, 5040)),
    ],
)
def test_layout_detection(shape, input_size, expected):
    assert yolov8_layout(shape, input_size) == expected
