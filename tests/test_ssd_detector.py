"""SSD ``TFLite_Detection_PostProcess`` decoding, LSTM state feedback, and the real
AutoML Video traffic model (``automl_traffic_lstm.tflite``) on traffic_frames.mp4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowfleet.agent.detectors import ModelError, load_detector
from flowfleet.agent.detectors.mapped import MappedDetector
from flowfleet.agent.detectors.ssd import (
    decode_ssd,
    find_label_map,
    pair_state_tensors,
    postprocess_options,
    ssd_output_indices,
)
from flowfleet.agent.detectors.tflite import TFLiteDetector
from flowfleet.agent.detectors.yolo import OutputShapeError
from flowfleet.agent.labels import ClassFilter

from .test_detector_real import assert_inside, read_frames

AUTOML = ("sedan", "pickup_suv_van", "large_veh_bus")

# -- decoder ----------------------------------------------------------------------------


def test_decode_ssd_units_count_threshold():
    boxes = np.array(
        [
            [0.10, 0.20, 0.50, 0.60],  # ymin, xmin, ymax, xmax
            [0.00, 0.00, 1.20, 0.50],  # overhangs: clipped to the frame
            [0.30, 0.30, 0.40, 0.40],  # below threshold
            [0.50, 0.50, 0.90, 0.90],  # beyond count: padding row
        ],
        np.float32,
    )[None]
    classes = np.array([[1.0, 0.0, 2.0, 0.0]], np.float32)
    scores = np.array([[0.6, 0.9, 0.1, 0.99]], np.float32)
    dec = decode_ssd(boxes, classes, scores, np.array([3.0]), size=(540, 960), conf_threshold=0.3)
    assert dec.class_ids.tolist() == [0, 1]  # by descending score
    np.testing.assert_allclose(dec.scores, [0.9, 0.6])
    np.testing.assert_allclose(dec.boxes[0], [0, 0, 480, 540], atol=1e-3)
    np.testing.assert_allclose(dec.boxes[1], [192, 54, 576, 270], atol=1e-3)
    assert dec.boxes.dtype == np.float32 and dec.class_ids.dtype == np.int32
    # count 0 -> nothing; None -> all rows; num_classes drops out-of-range ids.
    assert len(decode_ssd(boxes, classes, scores, [0], size=(10, 10)).boxes) == 0
    assert len(decode_ssd(boxes, classes, scores, None, size=(10, 10), conf_threshold=0.3)) == 3
    only0 = decode_ssd(boxes, classes, scores, None, size=(10, 10), num_classes=1)
    assert set(only0.class_ids.tolist()) == {0}


def _detail(name, shape, index=0):
    return {"name": name, "shape": np.array(shape), "index": index}


def test_output_indices_by_name_and_by_shape():
    named = [
        _detail("TFLite_Detection_PostProcess:3", [1]),
        _detail("TFLite_Detection_PostProcess", [1, 10, 4]),
        _detail("TFLite_Detection_PostProcess:2", [1, 10]),
        _detail("TFLite_Detection_PostProcess:1", [1, 10]),
        _detail("raw_outputs/lstm_c", [1, 8, 8, 320]),
    ]
    assert tuple(ssd_output_indices(named)) == (1, 3, 2, 0)
    unnamed = [
        _detail("TFLite_Detection_PostProcess_a", [1, 10, 4]),
        _detail("TFLite_Detection_PostProcess_b", [1, 10]),
        _detail("TFLite_Detection_PostProcess_c", [1, 10]),
        _detail("TFLite_Detection_PostProcess_d", [1]),
    ]
    assert tuple(ssd_output_indices(unnamed)) == (0, 1, 2, 3)
    with pytest.raises(OutputShapeError, match=r"\[1, 10, 5\]"):
        ssd_output_indices([_detail("TFLite_Detection_PostProcess", [1, 10, 5])])


def test_pair_state_tensors():
    ins = [
        _detail("raw_inputs/init_lstm_c", [1, 8, 8, 320]),
        _detail("raw_inputs/init_lstm_h", [1, 8, 8, 320]),
    ]
    outs = [
        _detail("raw_outputs/lstm_h", [1, 8, 8, 320]),
        _detail("raw_outputs/lstm_c", [1, 8, 8, 320]),
    ]
    pairs = pair_state_tensors(ins, outs)
    assert [(a["name"], b["name"]) for a, b in pairs] == [
        ("raw_inputs/init_lstm_c", "raw_outputs/lstm_c"),
        ("raw_inputs/init_lstm_h", "raw_outputs/lstm_h"),
    ]
    # Unrelated names, but a unique shape each: paired by shape.
    pairs = pair_state_tensors([_detail("a", [1, 4])], [_detail("b", [1, 4])])
    assert pairs[0][1]["name"] == "b"
    # Two same-shaped states with unrelated names: ambiguous, refused.
    with pytest.raises(OutputShapeError, match="no matching state output"):
        pair_state_tensors(
            [_detail("x", [1, 4]), _detail("y", [1, 4])],
            [_detail("p", [1, 4]), _detail("q", [1, 4])],
        )
    with pytest.raises(OutputShapeError):
        pair_state_tensors([_detail("x", [1, 4])], [])


# -- the real AutoML traffic model -------------------------------------------------------


@pytest.fixture(scope="module")
def automl(data: Path) -> Path:
    return data / "models" / "automl_traffic_lstm.tflite"


@pytest.fixture(scope="module")
def traffic_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "traffic_frames.mp4")


def test_model_facts(automl: Path, data: Path):
    opts = postprocess_options(automl)
    assert opts is not None and opts["num_classes"] == 3 and opts["max_detections"] == 40
    assert find_label_map(automl) == data / "models" / "automl_traffic_label_map.pbtxt"


def test_traffic_model_finds_vehicles_as_flow_classes(automl: Path, traffic_frames):
    det = load_detector(automl, conf_threshold=0.3)
    try:
        # The label map beside the model is found, and mapped to flow classes.
        assert isinstance(det, MappedDetector)
        assert det.model_labels == AUTOML
        assert det.labels == ("car", "bus")
        assert det.decoder == "ssd" and det.runtime == "tflite"
        assert det.info.input_shape == (1, 256, 256, 3)
        flow = ClassFilter(None, det.labels)  # the default flow classes now apply
        cars_per_frame = []
        for i, frame in traffic_frames.items():
            dets = det.detect(frame)
            assert dets.names == ("car", "bus")
            assert_inside(dets, frame)
            kept = flow.apply(dets)
            assert len(kept) >= 1, f"frame {i}: no vehicle above 0.3"
            cars_per_frame.append(int((kept.class_id == 0).sum()))
            # Vehicles are on the road: the band between y 250 and 500 of 540.
            cy = (kept.xyxy[:, 1] + kept.xyxy[:, 3]) / 2
            assert ((cy > 250) & (cy < 500)).all(), f"frame {i}: {kept.xyxy}"
        assert max(cars_per_frame) >= 3  # several cars at once in the clip
    finally:
        det.close()


def test_lstm_state_is_fed_back(automl: Path, traffic_frames):
    det = load_detector(automl, label_map=None)
    assert isinstance(det, TFLiteDetector)
    assert det.labels == AUTOML
    assert [a for a, _ in det.state_names] == ["raw_inputs/init_lstm_c", "raw_inputs/init_lstm_h"]
    interp = det._interp
    # Zeros (the quantised encoding of 0.0: the zero point) at the start.
    for in_index, _, zero in det._state_pairs:
        np.testing.assert_array_equal(interp.get_tensor(in_index), zero)
    det.detect(traffic_frames[0])
    # After each frame, this frame's state outputs are the next frame's state inputs.
    for in_index, out_index, _ in det._state_pairs:
        np.testing.assert_array_equal(interp.get_tensor(in_index), interp.get_tensor(out_index))
    # reset_state starts a new stream.
    for in_index, _, _ in det._state_pairs:
        interp.set_tensor(in_index, np.full(interp.get_tensor(in_index).shape, 7, np.uint8))
    det.reset_state()
    for in_index, _, zero in det._state_pairs:
        np.testing.assert_array_equal(interp.get_tensor(in_index), zero)
    det.close()


def test_explicit_pbtxt_labels_and_bad_label_file(automl: Path, data: Path, tmp_path: Path):
    det = load_detector(
        automl, labels=data / "models" / "automl_traffic_label_map.pbtxt", label_map=None
    )
    assert det.labels == AUTOML and det.label_source == "file"
    det.close()
    bad = tmp_path / "two.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ModelError, match="2 names but model"):
        load_detector(automl, labels=bad)


def test_custom_label_map_file(automl: Path, tmp_path: Path):
    lm = tmp_path / "map.txt"
    lm.write_text(
        "# merge everything into vehicle\n"
        "sedan = vehicle\npickup_suv_van = vehicle\nlarge_veh_bus -> vehicle\n"
    )
    det = load_detector(automl, label_map=lm)
    assert det.labels == ("vehicle",)
    det.close()
    broken = tmp_path / "broken.txt"
    broken.write_text("sedan car\n")
    with pytest.raises(ModelError, match=r"broken\.txt:1"):
        load_detector(automl, label_map=broken)
