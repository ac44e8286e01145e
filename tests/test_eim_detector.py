"""The Edge Impulse ``.eim`` backend, through the real edge-impulse-linux SDK.

No real ``.eim`` can be downloaded here, so these tests use
``tests/fixtures/fake_eim.py``: a small executable that STANDS IN for a real .eim. It
speaks the documented .eim protocol (unix socket given as its argument, JSON
``hello`` / ``classify`` messages with ids, NUL-terminated answers, optional shared
memory features) and answers with detections from a REAL model,
``yolov8n_full_integer_quant.tflite`` from ``../shared/data/models``. What is tested is
the SDK path and our mapping of its results, not Edge Impulse's own inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowfleet.agent.detectors import ModelError, load_detector
from flowfleet.agent.detectors.eim import EIMDetector, Geometry, pack_features
from flowfleet.agent.labels import COCO_80

from .fixtures.fake_eim import make_fake_eim
from .test_detector_real import assert_inside, assert_person_found, read_frames

PERSON = 0
PERSON_FRAMES = (150, 300, 600)
EMPTY_FRAMES = (0, 500)


@pytest.fixture(scope="module")
def person_frames(videos: Path) -> dict[int, np.ndarray]:
    return read_frames(videos / "one-by-one-person-detection.mp4", PERSON_FRAMES + EMPTY_FRAMES)


@pytest.fixture(scope="module")
def eim_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eim")


@pytest.fixture(scope="module")
def od_model(eim_dir: Path, int8_model: Path) -> Path:
    return make_fake_eim(eim_dir, int8_model, name="people-od.eim", resize_mode="fit-longest")


def test_object_detection_through_the_runner(od_model: Path, person_frames, int8_model: Path):
    det = load_detector(od_model)
    try:
        assert isinstance(det, EIMDetector)
        assert det.runtime == "eim" and det.decoder == "edge-impulse"
        # Labels and input size come from the runner's hello.
        assert det.labels == COCO_80 and det.label_source == "hello"
        assert det.input_size == (640, 640) and det.info.input_shape == (1, 640, 640, 3)
        assert det.hello["project"]["name"] == "flowfleet fake eim"
        assert det._runner._input_shm is not None  # the shared-memory fast path
        direct = load_detector(int8_model)
        for i in PERSON_FRAMES:
            frame = person_frames[i]
            best = assert_person_found(det.detect(frame), frame, i)
            # Same model run directly: the box maps back to the same place (the .eim
            # letterboxes with black, not grey, and rounds boxes to whole pixels).
            ref = direct.detect(frame)
            ref_best = ref.xyxy[np.argmax(np.where(ref.class_id == PERSON, ref.confidence, 0))]
            assert np.abs(best - ref_best).max() < 12, (best, ref_best)
        for i in EMPTY_FRAMES:
            dets = det.detect(person_frames[i])
            assert not ((dets.class_id == PERSON) & (dets.confidence > 0.5)).any()
        direct.close()
    finally:
        det.close()
    proc = det._proc
    assert proc is None or proc.poll() is not None  # the .eim process is gone


def test_fomo_centroids_become_small_boxes(eim_dir: Path, int8_model: Path, person_frames):
    path = make_fake_eim(
        eim_dir, int8_model, name="people-fomo.eim", mode="fomo", resize_mode="squash",
        labels=["person"],
    )  # fmt: skip
    # Squashing 16:9 into a square input costs the model some confidence: 0.3.
    det = load_detector(path, conf_threshold=0.3)
    od = load_detector(
        make_fake_eim(eim_dir, int8_model, name="od-squash.eim", resize_mode="squash")
    )
    try:
        assert det.decoder == "fomo" and det.labels == ("person",)
        for i in PERSON_FRAMES:
            frame = person_frames[i]
            dets = det.detect(frame)
            assert len(dets) >= 1 and dets.names == ("person",)
            assert_inside(dets, frame)
            w = dets.xyxy[:, 2] - dets.xyxy[:, 0]
            h = dets.xyxy[:, 3] - dets.xyxy[:, 1]
            # An 8x8 cell of the 640x640 input, squashed back to 768x432.
            assert (w <= 8 * 768 / 640 + 0.5).all() and (h <= 8 * 432 / 640 + 0.5).all()
            # Its centre lies inside the person box the detection model finds.
            ref = od.detect(frame)
            ref = ref[(ref.class_id == PERSON) & (ref.confidence > 0.3)]
            c = dets.anchors("center")[np.argmax(dets.confidence)]
            inside = (
                (ref.xyxy[:, 0] <= c[0]) & (c[0] <= ref.xyxy[:, 2])
                & (ref.xyxy[:, 1] <= c[1]) & (c[1] <= ref.xyxy[:, 3])
            )  # fmt: skip
            assert inside.any(), (c, ref.xyxy)
    finally:
        det.close()
        od.close()


def test_json_path_without_shared_memory(eim_dir: Path, int8_model: Path, person_frames):
    path = make_fake_eim(
        eim_dir, int8_model, name="no-shm.eim", resize_mode="fit-shortest", shm=False
    )
    det = load_detector(path, warmup=1)
    try:
        assert det._runner._input_shm is None
        dets = det.detect(person_frames[300])
        people = dets[(dets.class_id == PERSON) & (dets.confidence > 0.5)]
        assert len(people) == 1
        assert_inside(dets, person_frames[300])
    finally:
        det.close()


def test_geometry_round_trip():
    # A box drawn in frame pixels, mapped into the input by each mode and back.
    frame_box = np.array([[300.0, 100.0, 460.0, 400.0]], np.float32)
    for mode in ("squash", "fit-shortest", "fit-longest"):
        g = Geometry((432, 768), (320, 320), mode)
        x1, y1, x2, y2 = frame_box[0]
        in_box = np.array(
            [[x1 * g.sx + g.ox, y1 * g.sy + g.oy, x2 * g.sx + g.ox, y2 * g.sy + g.oy]]
        )
        np.testing.assert_allclose(g.to_frame(in_box), frame_box, atol=1e-3)
        img = g.to_input(np.zeros((432, 768, 3), np.uint8))
        assert img.shape == (320, 320, 3), mode


def test_pack_features():
    rgb = np.array([[[1, 2, 3], [255, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(pack_features(rgb, False), [0x010203, 0xFF0080])
    grey = pack_features(np.full((1, 1, 3), 7, np.uint8), True)
    np.testing.assert_array_equal(grey, [0x070707])


# -- errors ------------------------------------------------------------------------------


def test_executable_that_exits_is_a_one_line_error(eim_dir: Path, int8_model: Path):
    path = make_fake_eim(eim_dir, int8_model, name="broken.eim", exit_code=3)
    with pytest.raises(ModelError) as err:
        load_detector(path)
    msg = str(err.value)
    assert str(path) in msg and "exited with code 3" in msg and "\n" not in msg


def test_executable_that_never_answers_times_out(eim_dir: Path, int8_model: Path):
    path = make_fake_eim(eim_dir, int8_model, name="hung.eim", hang=True)
    with pytest.raises(ModelError) as err:
        EIMDetector(path, start_timeout=3)
    assert str(path) in str(err.value) and "did not answer hello within 3 s" in str(err.value)


def test_not_executable_and_not_a_detector(eim_dir: Path, int8_model: Path, tmp_path: Path):
    path = make_fake_eim(tmp_path, int8_model, name="noexec.eim")
    path.chmod(0o644)
    with pytest.raises(ModelError, match="not executable"):
        load_detector(path)
    cls = make_fake_eim(eim_dir, int8_model, name="classifier.eim", mode="classification")
    with pytest.raises(ModelError, match="not an object detector"):
        load_detector(cls)


def test_labels_file_must_match_the_hello(od_model: Path, tmp_path: Path):
    short = tmp_path / "labels.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ModelError, match="reports 80 labels"):
        load_detector(od_model, labels=short)
