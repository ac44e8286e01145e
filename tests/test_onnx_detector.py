"""The ONNX Runtime detector on the real yolov8n_int8.onnx and the reference videos."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors import ModelError, load_detector
from flowfleet.agent.detectors import onnx as onnx_backend
from flowfleet.agent.detectors.onnx import (
    CPU,
    CUDA,
    TENSORRT,
    ONNXDetector,
    choose_providers,
    metadata_labels,
)
from flowfleet.agent.labels import COCO_80

from .test_detector_real import assert_inside, assert_person_found, read_frames

PERSON, CAR, BUS, TRUCK = 0, 2, 5, 7
PERSON_FRAMES = (150, 300, 600, 1000)
EMPTY_FRAMES = (0, 500)
TRAFFIC_FRAMES = (0, 5, 10, 15, 19)


@pytest.fixture(scope="module")
def onnx_model(data: Path) -> Path:
    return data / "models" / "yolov8n_int8.onnx"


@pytest.fixture(scope="module")
def detector(onnx_model: Path) -> ONNXDetector:
    det = load_detector(onnx_model, threads=2)
    assert isinstance(det, ONNXDetector)
    yield det
    det.close()


@pytest.fixture(scope="module")
def tflite_detector(int8_model: Path):
    det = load_detector(int8_model, threads=2)
    yield det
    det.close()


@pytest.fixture(scope="module")
def person_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "one-by-one-person-detection.mp4", PERSON_FRAMES + EMPTY_FRAMES)


@pytest.fixture(scope="module")
def traffic_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "traffic_frames.mp4", TRAFFIC_FRAMES)


def test_model_info_and_metadata_labels(detector: ONNXDetector):
    info = detector.info
    assert info.runtime == "onnx"
    assert info.input_shape == (1, 3, 640, 640)
    assert info.input_dtype == "float32"
    assert info.output_shapes == ((1, 84, 8400),)
    # Labels come from the model's own `names` metadata, not the COCO fallback.
    assert detector.label_source == "metadata"
    assert info.labels == COCO_80
    assert detector.providers[-1] == CPU
    assert detector.metadata.get("task") == "detect"


def test_people_found(detector: ONNXDetector, person_frames):
    for i in PERSON_FRAMES:
        frame = person_frames[i]
        dets = detector.detect(frame)
        assert dets.names == COCO_80
        assert_person_found(dets, frame, i)  # pixel-unit boxes mapped back correctly
    for i in EMPTY_FRAMES:
        dets = detector.detect(person_frames[i])
        assert not ((dets.class_id == PERSON) & (dets.confidence > 0.5)).any(), f"frame {i}"


def test_vehicles_found(detector: ONNXDetector, traffic_frames):
    for i, frame in traffic_frames.items():
        dets = detector.detect(frame)
        assert_inside(dets, frame)
        vehicles = np.isin(dets.class_id, [CAR, BUS, TRUCK]) & (dets.confidence > 0.5)
        assert vehicles.sum() >= 1, f"frame {i}: no vehicle above 0.5 ({dets.class_names()})"


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def _matched(ref: Detections, other: Detections, iou: float = 0.5) -> int:
    """Boxes of ``ref`` that have a same-class box in ``other`` with IoU >= ``iou``."""
    if not len(ref) or not len(other):
        return 0
    m = _iou(ref.xyxy, other.xyxy) >= iou
    m &= ref.class_id[:, None] == other.class_id[None, :]
    return int(m.any(axis=1).sum())


def test_agrees_with_tflite_int8(detector, tflite_detector, person_frames, traffic_frames):
    """Two independent int8 exports of YOLOv8n on two runtimes find the same objects."""
    frames = [person_frames[i] for i in PERSON_FRAMES] + list(traffic_frames.values())
    total = matched = 0
    for frame in frames:
        a = detector.detect(frame)
        b = tflite_detector.detect(frame)
        a, b = a[a.confidence > 0.5], b[b.confidence > 0.5]
        total += len(a)
        matched += _matched(a, b)
    assert total >= 15
    assert matched / total >= 0.8, f"{matched}/{total} ONNX boxes matched a TFLite box"


def test_detect_time(detector: ONNXDetector, traffic_frames):
    frame = traffic_frames[0]
    detector.detect(frame)
    t0 = time.perf_counter()
    for _ in range(5):
        detector.detect(frame)
    ms = (time.perf_counter() - t0) / 5 * 1000
    print(f"\nONNX Runtime CPU detect(): {ms:.1f} ms per 960x540 frame")
    assert ms < 1000


def test_explicit_labels_file(onnx_model: Path, tmp_path: Path):
    custom = tmp_path / "labels.txt"
    custom.write_text("\n".join(f"thing{i}" for i in range(80)))
    det = ONNXDetector(onnx_model, labels=custom)
    assert det.label_source == "file" and det.labels[79] == "thing79"
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ModelError, match="2 names but model"):
        ONNXDetector(onnx_model, labels=short)


# -- provider choice ---------------------------------------------------------------


def test_choose_providers_auto_prefers_tensorrt_then_cuda(tmp_path: Path):
    jetson = [TENSORRT, CUDA, CPU]
    chosen = choose_providers(jetson, trt_cache_dir=tmp_path, trt_fp16=True)
    assert [n for n, _ in chosen] == [TENSORRT, CUDA, CPU]
    trt = chosen[0][1]
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert choose_providers(jetson, trt_fp16=False)[0][1]["trt_fp16_enable"] is False
    assert [n for n, _ in choose_providers([CUDA, CPU])] == [CUDA, CPU]
    assert [n for n, _ in choose_providers(["AzureExecutionProvider", CPU])] == [CPU]


def test_choose_providers_explicit(monkeypatch):
    assert [n for n, _ in choose_providers([TENSORRT, CUDA, CPU], "cpu")] == [CPU]
    assert [n for n, _ in choose_providers([TENSORRT, CUDA, CPU], "cuda")] == [CUDA, CPU]
    monkeypatch.setenv("FLOWFLEET_ORT_PROVIDERS", "cpu")
    assert [n for n, _ in choose_providers([TENSORRT, CUDA, CPU])] == [CPU]
    monkeypatch.delenv("FLOWFLEET_ORT_PROVIDERS")
    with pytest.raises(ValueError, match="CUDAExecutionProvider"):
        choose_providers([CPU], "cuda")


def test_requested_gpu_missing_is_a_model_error(onnx_model: Path):
    with pytest.raises(ModelError) as err:
        load_detector(onnx_model, providers="tensorrt")
    assert str(onnx_model) in str(err.value) and "not available" in str(err.value)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_gpu_provider_that_does_not_start_falls_back_to_cpu(onnx_model, monkeypatch, caplog):
    """A build that lists CUDA/TensorRT but cannot start them (no CUDA libraries):
    the session runs on the CPU and the reason is logged."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: [TENSORRT, CUDA, CPU], raising=True
    )
    with caplog.at_level(logging.WARNING, logger=onnx_backend.__name__):
        det = ONNXDetector(onnx_model)
    assert det.providers == (CPU,)
    assert det.fallback_reason and "CPU" in det.fallback_reason
    assert any("running on the CPU" in r.message for r in caplog.records)


def test_metadata_labels_parsing():
    assert metadata_labels({"names": "{0: 'person', 2: 'car'}"}) == ("person", "class1", "car")
    assert metadata_labels({"names": '["a", "b"]'}) == ("a", "b")
    assert metadata_labels({"names": '{"0": "a", "1": "b"}'}) == ("a", "b")
    # Never evaluated as code.
    assert metadata_labels({"names": "__import__('os').system('true')"}) is None
    assert metadata_labels({}) is None
    assert metadata_labels({"names": "{}"}) is None


# -- load errors -----------------------------------------------------------------------


def test_corrupt_onnx_is_one_line_error(onnx_model: Path, tmp_path: Path):
    data = onnx_model.read_bytes()
    bad = tmp_path / "half.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        load_detector(bad)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg and "onnx" in msg.lower()
