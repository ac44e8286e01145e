"""Label files and the class filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowfleet.agent.detections import Detections
from flowfleet.agent.labels import COCO_80, FLOW_CLASSES, ClassFilter, load_labels

AUTOML = ("sedan", "pickup_suv_van", "large_veh_bus")


def test_coco_80_matches_reference_file(data: Path):
    assert len(COCO_80) == 80
    assert load_labels(data / "models" / "coco_labels.txt") == COCO_80
    assert set(FLOW_CLASSES) <= set(COCO_80)


def test_automl_pbtxt_label_map(data: Path):
    # ids 1..3 map to class indices 0..2.
    assert load_labels(data / "models" / "automl_traffic_label_map.pbtxt") == AUTOML


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param("plain.txt", "person\ncar\n\nbus\n", ("person", "car", "bus"), id="plain"),
        pytest.param("crlf.txt", "person\r\ncar\r\n", ("person", "car"), id="crlf"),
        pytest.param(
            "idx.txt",
            "0 person\n1 traffic light\n3 bus\n",
            ("person", "traffic light", "class2", "bus"),
            id="indexed-with-gap",
        ),
        pytest.param("colon.txt", "0: person\n1: car\n", ("person", "car"), id="indexed-colon"),
        pytest.param(
            "map.pbtxt",
            'item {\n  name: "/m/01g317"\n  id: 1\n  display_name: "person"\n}\n'
            "item { name: '/m/0k4j' id: 2 display_name: 'car' }\n",
            ("person", "car"),
            id="pbtxt-display-name",
        ),
        pytest.param(
            "zero.pbtxt",
            'item { id: 0 name: "a" }\nitem { id: 2 name: "c" }',
            ("a", "class1", "c"),
            id="pbtxt-zero-based-gap",
        ),
        pytest.param("noid.pbtxt", 'item { name: "x" } item { name: "y" }', ("x", "y"), id="noid"),
    ],
)
def test_load_labels_formats(tmp_path: Path, name, text, expected):
    path = tmp_path / name
    path.write_bytes(text.encode())
    assert load_labels(path) == expected


@pytest.mark.parametrize(
    ("name", "text"),
    [("empty.txt", "\n\n"), ("bad.pbtxt", "item { id: 1 }")],
)
def test_load_labels_rejects(tmp_path: Path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=name):
        load_labels(path)


@pytest.mark.parametrize(
    ("spec", "labels", "expected"),
    [
        pytest.param(None, COCO_80, FLOW_CLASSES, id="default-flow"),
        pytest.param("all", AUTOML, AUTOML, id="all"),
        pytest.param("ALL", COCO_80[:3], COCO_80[:3], id="all-case"),
        pytest.param(["car", "person"], COCO_80, ("person", "car"), id="list-model-order"),
        pytest.param("Car, truck", COCO_80, ("car", "truck"), id="comma-string-case"),
        pytest.param(("sedan",), AUTOML, ("sedan",), id="custom-model"),
        pytest.param(None, ("person", "dog", "car"), ("person", "car"), id="default-subset"),
    ],
)
def test_class_filter_specs(spec, labels, expected):
    f = ClassFilter(spec, labels)
    assert f.names == expected
    assert f.labels == tuple(labels)
    assert f.mask.sum() == len(expected)
    assert [labels[i] for i in f.class_ids] == list(expected)


@pytest.mark.parametrize(
    ("spec", "labels", "needle"),
    [
        pytest.param(["person", "lorry"], COCO_80, "'lorry'", id="unknown-name"),
        pytest.param([], COCO_80, "no classes", id="empty-list"),
        pytest.param(" , ", COCO_80, "no classes", id="blank-string"),
        pytest.param(None, AUTOML, "none of the default flow classes", id="no-flow-classes"),
    ],
)
def test_class_filter_rejects(spec, labels, needle):
    with pytest.raises(ValueError) as err:
        ClassFilter(spec, labels)
    assert needle in str(err.value)
    if needle == "'lorry'":
        # The message lists the valid names so a config typo can be fixed in one go.
        assert "truck" in str(err.value) and "toothbrush" in str(err.value)


def _dets(class_ids, names=COCO_80) -> Detections:
    n = len(class_ids)
    boxes = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return Detections(boxes, np.linspace(0.9, 0.5, n), class_ids, np.arange(n), names)


def test_class_filter_apply():
    f = ClassFilter(None, COCO_80)
    dets = _dets([0, 62, 2, 7, 56, 5, 1])  # person tv car truck chair bus bicycle
    kept = f.apply(dets)
    assert kept.class_names() == ["person", "car", "truck", "bus", "bicycle"]
    # Rows move together: boxes, scores and track ids stay aligned.
    np.testing.assert_array_equal(kept.tracker_id, [0, 2, 3, 5, 6])
    np.testing.assert_array_equal(kept.xyxy, dets.xyxy[[0, 2, 3, 5, 6]])
    assert kept.names is COCO_80
    assert len(f.apply(Detections.empty(COCO_80))) == 0
    assert "car" in f and "tv" not in f


def test_class_filter_apply_edge_cases():
    f = ClassFilter(["car"], COCO_80)
    # Ids outside the vocabulary are dropped rather than raising IndexError.
    assert f.apply(_dets([2, 80, -1, 2], names=())).class_id.tolist() == [2, 2]
    with pytest.raises(ValueError, match="vocabulary"):
        f.apply(_dets([0, 1], names=AUTOML[:2]))
    mask = f.keep_mask(np.array([2, 2, 0]))
    assert mask.tolist() == [True, True, False]


# -- label maps ------------------------------------------------------------------------


def test_flow_label_map_for_the_automl_model():
    from flowfleet.agent.labels import LabelMap, auto_label_map, load_label_map

    lm = auto_label_map(AUTOML)
    assert lm is not None and lm.labels == ("car", "bus") and lm.merges
    assert lm.lut.tolist() == [0, 0, 1]
    dets = lm.apply(_dets([0, 1, 2, 1], names=AUTOML))
    assert dets.class_names() == ["car", "car", "bus", "car"]
    np.testing.assert_array_equal(dets.tracker_id, [0, 1, 2, 3])  # rows stay aligned
    # The default flow filter now applies to the mapped vocabulary.
    assert ClassFilter(None, lm.labels).apply(dets).class_names() == dets.class_names()
    # COCO models already speak the flow vocabulary: no automatic map.
    assert auto_label_map(COCO_80) is None
    assert auto_label_map(("cat", "dog")) is None
    # An explicit map applies to any vocabulary; unmapped labels keep their names.
    lm = LabelMap(load_label_map("flow"), ("person", "van", "dog"))
    assert lm.labels == ("person", "car", "dog") and not lm.merges
    assert LabelMap({}, COCO_80).identity
    # Ids outside the model vocabulary become -1 (dropped by any ClassFilter).
    assert lm.apply(_dets([1, 5], names=("person", "van", "dog"))).class_id.tolist() == [1, -1]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param(
            "map.txt",
            "# comment\nsedan = car\npickup_suv_van: car\nlarge_veh_bus -> bus\n\n",
            {"sedan": "car", "pickup_suv_van": "car", "large_veh_bus": "bus"},
            id="text",
        ),
        pytest.param(
            "map.toml", '[labels]\nsedan = "car"\n"large veh" = "bus"\n',
            {"sedan": "car", "large veh": "bus"}, id="toml",
        ),
    ],
)  # fmt: skip
def test_load_label_map_files(tmp_path: Path, name, text, expected):
    from flowfleet.agent.labels import load_label_map

    path = tmp_path / name
    path.write_text(text)
    assert load_label_map(path) == expected


def test_load_label_map_errors(tmp_path: Path):
    from flowfleet.agent.labels import load_label_map

    bad = tmp_path / "bad.txt"
    bad.write_text("sedan car\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        load_label_map(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no entries"):
        load_label_map(empty)
    assert load_label_map(None) is None
