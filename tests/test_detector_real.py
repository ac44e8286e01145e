"""The TFLite detector on the real YOLOv8n exports and reference videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors import ModelError, load_detector
from flowfleet.agent.detectors.tflite import TFLiteDetector
from flowfleet.agent.labels import COCO_80, ClassFilter

PERSON, CAR, BUS, TRUCK = 0, 2, 5, 7

# one-by-one-person-detection.mp4: checked by eye and with the model; someone stands
# at the table in these frames, the room is empty in EMPTY_FRAMES.
PERSON_FRAMES = (100, 150, 300, 400, 600, 800, 1000)
EMPTY_FRAMES = (0, 200, 500)


def read_frames(path: Path, wanted: tuple[int, ...] | None = None) -> dict[int, np.ndarray]:
    """Decode sequentially (seeking in MP4 is not frame exact) and keep ``wanted``."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"cannot open {path}"
    frames: dict[int, np.ndarray] = {}
    last = max(wanted) if wanted else None
    i = 0
    try:
        while last is None or i <= last:
            ok, frame = cap.read()
            if not ok:
                break
            if wanted is None or i in wanted:
                frames[i] = frame
            i += 1
    finally:
        cap.release()
    if wanted:
        assert set(frames) == set(wanted), f"{path} ended at frame {i}"
    return frames


@pytest.fixture(scope="module", params=["full_integer_int8", "dynamic_float_io"])
def detector(request, int8_model: Path) -> TFLiteDetector:
    path = int8_model
    if request.param == "dynamic_float_io":
        path = int8_model.parent / "yolov8n_int8_dynamic.tflite"
    det = load_detector(path, threads=2)
    assert isinstance(det, TFLiteDetector)
    yield det
    det.close()


@pytest.fixture(scope="module")
def person_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "one-by-one-person-detection.mp4", PERSON_FRAMES + EMPTY_FRAMES)


@pytest.fixture(scope="module")
def traffic_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "traffic_frames.mp4")


def assert_inside(dets: Detections, frame: np.ndarray) -> None:
    h, w = frame.shape[:2]
    b = dets.xyxy
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def assert_person_found(dets: Detections, frame: np.ndarray, i: int) -> np.ndarray:
    """Frame ``i`` of one-by-one-person-detection.mp4: boxes inside the frame and the
    person standing near the camera found above 0.5, as a tall box in the right half
    of the frame (catches boxes mapped back with the wrong scale or padding). Returns
    that person's box."""
    assert_inside(dets, frame)
    people = dets[(dets.class_id == PERSON) & (dets.confidence > 0.5)]
    assert len(people) >= 1, f"frame {i}: no person above 0.5 ({dets.class_names()})"
    best = people.xyxy[np.argmax(people.confidence)]
    assert best[3] - best[1] > 0.6 * frame.shape[0], f"frame {i}: box {best}"
    assert (best[0] + best[2]) / 2 > frame.shape[1] / 2, f"frame {i}: box {best}"
    return best


def test_model_info(detector: TFLiteDetector):
    info = detector.info
    assert info.runtime == "tflite"
    assert info.input_shape == (1, 640, 640, 3)
    assert info.output_shapes == ((1, 84, 8400),)
    assert info.labels == COCO_80 and detector.labels == COCO_80
    if "full_integer" in info.path:
        assert info.input_dtype == "int8"
        assert detector.input_quantization == pytest.approx((0.018658, -14), abs=1e-5)
        assert detector.output_quantization == pytest.approx((0.003986, -128), abs=1e-5)
    else:
        assert info.input_dtype == "float32"
        assert detector.input_quantization is None and detector.output_quantization is None


def test_people_found(detector: TFLiteDetector, person_frames):
    for i in PERSON_FRAMES:
        frame = person_frames[i]
        dets = detector.detect(frame)
        assert dets.names == COCO_80
        assert_person_found(dets, frame, i)


def test_empty_room_has_no_person(detector: TFLiteDetector, person_frames):
    for i in EMPTY_FRAMES:
        dets = detector.detect(person_frames[i])
        assert not ((dets.class_id == PERSON) & (dets.confidence > 0.5)).any(), f"frame {i}"


def test_vehicles_found(detector: TFLiteDetector, traffic_frames):
    assert len(traffic_frames) == 20
    for i, frame in traffic_frames.items():
        dets = detector.detect(frame)
        assert_inside(dets, frame)
        vehicles = np.isin(dets.class_id, [CAR, BUS, TRUCK]) & (dets.confidence > 0.5)
        assert vehicles.sum() >= 1, f"frame {i}: no vehicle above 0.5 ({dets.class_names()})"
    # The highway clip shows several vehicles at once.
    first = detector.detect(traffic_frames[0])
    assert (np.isin(first.class_id, [CAR, BUS, TRUCK]) & (first.confidence > 0.5)).sum() >= 3


def test_flow_filter_on_real_detections(detector: TFLiteDetector, person_frames):
    dets = detector.detect(person_frames[300])
    kept = ClassFilter(None, detector.labels).apply(dets)
    assert len(kept) >= 1
    assert set(kept.class_names()) <= {"person", "bicycle", "car", "motorcycle", "bus", "truck"}


def test_detect_accepts_other_frame_forms(detector: TFLiteDetector, person_frames):
    frame = person_frames[300]
    gray = detector.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    assert (gray.class_id == PERSON).any()
    bgra = detector.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA))
    np.testing.assert_allclose(bgra.xyxy, detector.detect(frame).xyxy)
    # A frame of another size after the first: buffers are rebuilt, boxes still fit.
    small = cv2.resize(frame, (384, 216))
    dets = detector.detect(small)
    assert_inside(dets, small)
    with pytest.raises(ValueError):
        detector.detect(frame.astype(np.float32))
    detector.invoke_raw()


def test_explicit_labels_file(int8_model: Path, tmp_path: Path):
    det = load_detector(int8_model, labels=int8_model.parent / "coco_labels.txt")
    assert det.labels == COCO_80
    assert det.label_source == "file"
    custom = tmp_path / "labels.txt"
    custom.write_text("\n".join(f"thing{i}" for i in range(80)))
    assert load_detector(int8_model, labels=custom).labels[79] == "thing79"


# -- load errors -----------------------------------------------------------------------


def _assert_model_error(path: Path, match: str, **kwargs) -> ModelError:
    with pytest.raises(ModelError) as err:
        load_detector(path, **kwargs)
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    assert match in msg.lower(), msg
    return err.value


def test_missing_file(tmp_path: Path):
    _assert_model_error(tmp_path / "nope.tflite", "not found")


def test_truncated_model(int8_model: Path, tmp_path: Path):
    data = int8_model.read_bytes()
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(data[: len(data) // 2])
    _assert_model_error(bad, "cannot load")
    tiny = tmp_path / "tiny.tflite"
    tiny.write_bytes(data[:6])
    _assert_model_error(tiny, "truncated")


def test_text_file_renamed(tmp_path: Path):
    bad = tmp_path / "model.tflite"
    bad.write_text("this is not a model, just some text that someone renamed\n")
    _assert_model_error(bad, "not a model file")


def test_empty_file(tmp_path: Path):
    bad = tmp_path / "empty.tflite"
    bad.write_bytes(b"")
    _assert_model_error(bad, "empty")


def test_corrupt_body(int8_model: Path, tmp_path: Path):
    # Header intact, flatbuffer tables overwritten: the runtime's verifier rejects it.
    data = bytearray(int8_model.read_bytes())
    data[8:4096] = b"\xff" * (4096 - 8)
    bad = tmp_path / "corrupt.tflite"
    bad.write_bytes(bytes(data))
    _assert_model_error(bad, "cannot load")


def test_unsupported_heads(tmp_path: Path):
    # A YOLOv10-style end-to-end head [1, 300, 6]: no decoder here understands it.
    # (The ONNX and SSD/LSTM reference models are supported: see test_onnx_detector.py
    # and test_ssd_detector.py.)
    from .fixtures.onnx_models import make_head_model

    model = make_head_model(tmp_path / "yolov10.onnx", (1, 300, 6), input_shape=(1, 3, 640, 640))
    _assert_model_error(model, "unsupported output shape")
    two = make_head_model(tmp_path / "ssd_boxes.onnx", (1, 10, 4))
    _assert_model_error(two, "unsupported output shape")


def test_label_count_mismatch(int8_model: Path, tmp_path: Path):
    labels = tmp_path / "three.txt"
    labels.write_text("a\nb\nc\n")
    err = _assert_model_error(int8_model, "3 names", labels=labels)
    assert str(labels) in str(err)
    _assert_model_error(int8_model, "cannot read label file", labels=tmp_path / "missing.txt")
