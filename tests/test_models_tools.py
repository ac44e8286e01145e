"""`flowfleet models inspect | bench | quantize` on the real reference models.

The commands run in-process through ``flowfleet.cli.main`` (the same parser and error
handling as the console script, without paying a Python start-up per case).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from flowfleet.cli import main
from flowfleet.models import catalog
from flowfleet.models.quantize import agreement, quantize_onnx

from .fixtures.fake_eim import make_fake_eim
from .fixtures.float_onnx import make_float_yolov8n


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln]


@pytest.fixture(scope="module")
def models(data: Path) -> Path:
    return data / "models"


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, models: Path) -> Path:
    return make_float_yolov8n(
        models / "yolov8n_int8.onnx", tmp_path_factory.mktemp("float") / "yolov8n_float.onnx"
    )


# -- inspect ------------------------------------------------------------------------------


def test_inspect_tflite_int8(capsys, models: Path):
    path = models / "yolov8n_full_integer_quant.tflite"
    code, out, _ = run(capsys, "models", "inspect", str(path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["runtime"] == "tflite" and info["decoder"] == "yolov8"
    assert info["sha256"] == catalog.load_catalog()["yolov8n-int8-tflite"].sha256
    (inp,) = info["inputs"]
    assert inp["shape"] == [1, 640, 640, 3] and inp["dtype"] == "int8"
    assert inp["quantization"]["scale"] == pytest.approx(0.018658, abs=1e-5)
    assert inp["quantization"]["zero_point"] == -14
    assert info["outputs"][0]["shape"] == [1, 84, 8400]
    assert len(info["labels"]) == 80 and info["labels"][0] == "person"
    # The text form names the same facts.
    code, out, _ = run(capsys, "models", "inspect", str(path))
    assert code == 0 and "int8" in out and "zero_point -14" in out and info["sha256"] in out


def test_inspect_onnx_and_ssd(capsys, models: Path):
    code, out, _ = run(capsys, "models", "inspect", str(models / "yolov8n_int8.onnx"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["runtime"] == "onnx" and info["label_source"] == "metadata"
    assert info["inputs"][0]["shape"] == [1, 3, 640, 640]
    assert info["quantization"]["scheme"].startswith("dynamic int8")
    assert info["quantization"]["quant_ops"]["ConvInteger"] == 64
    assert "names" not in info["metadata"] and info["metadata"]["task"] == "detect"

    ssd = models / "automl_traffic_lstm.tflite"
    code, out, _ = run(capsys, "models", "inspect", str(ssd), "--json")
    info = json.loads(out)
    assert info["decoder"] == "ssd"
    assert info["labels"] == ["sedan", "pickup_suv_van", "large_veh_bus"]
    assert info["label_map"] == {"sedan": "car", "pickup_suv_van": "car", "large_veh_bus": "bus"}
    assert info["postprocess"]["num_classes"] == 3
    assert len(info["inputs"]) == 3 and len(info["state_feedback"]) == 2


def test_inspect_eim_stand_in(capsys, tmp_path: Path, int8_model: Path):
    path = make_fake_eim(tmp_path, int8_model, name="people.eim", mode="fomo", labels=["person"])
    code, out, _ = run(capsys, "models", "inspect", str(path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["runtime"] == "eim" and info["decoder"] == "fomo"
    assert info["labels"] == ["person"]
    assert info["model_parameters"]["model_type"] == "constrained_object_detection"
    assert info["inputs"][0]["shape"] == [1, 640, 640, 3]


@pytest.mark.parametrize(
    ("make", "code", "must_say"),
    [
        pytest.param(lambda d: d / "absent.tflite", 1, "not found", id="missing"),
        pytest.param(
            lambda d: (d / "notes.tflite").write_text("just text\n") and d / "notes.tflite",
            1,
            "not a tflite, onnx",
            id="text-file",
        ),
        pytest.param(
            lambda d: (d / "empty.onnx").write_bytes(b"") or d / "empty.onnx",
            1,
            "empty",
            id="empty",
        ),
    ],
)
def test_inspect_and_bench_bad_files(capsys, tmp_path: Path, make, code, must_say):
    path = make(tmp_path)
    for action in ("inspect", "bench"):
        got, _, err = run(capsys, "models", action, str(path))
        assert got == code, err
        (line,) = error_lines(err)
        assert str(path) in line and must_say in line.lower()
        assert "Traceback" not in err


def test_corrupt_onnx_inspect(capsys, tmp_path: Path, models: Path):
    data = (models / "yolov8n_int8.onnx").read_bytes()
    bad = tmp_path / "half.onnx"
    bad.write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "models", "inspect", str(bad))
    assert code == 1
    (line,) = error_lines(err)
    assert str(bad) in line and "cannot load onnx model" in line.lower()


def test_usage_errors_and_help(capsys):
    assert run(capsys, "models", "inspect")[0] == 2
    assert run(capsys, "models", "bench", "x.tflite", "--threads", "0")[0] == 2
    assert run(capsys, "models", "bench", "x.tflite", "--seconds", "-1")[0] == 2
    assert run(capsys, "models", "quantize", "x.onnx")[0] == 2  # --calib, -o required
    assert run(capsys, "models", "frobnicate")[0] == 2
    for action in ("inspect", "bench", "quantize", "list", "fetch"):
        code, out, _ = run(capsys, "models", action, "--help")
        assert code == 0 and "usage" in out
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} >= {"yolov8n-int8-tflite"}


# -- bench ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["yolov8n_full_integer_quant.tflite", "yolov8n_int8.onnx", "automl_traffic_lstm.tflite"]
)
def test_bench(capsys, models: Path, name: str):
    code, out, _ = run(
        capsys, "models", "bench", str(models / name), "--seconds", "0.3", "--warmup", "1",
        "--threads", "2", "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0
    r = json.loads(out)
    assert r["runs"] >= 3 and r["invokes_per_s"] > 0 and r["threads"] == 2
    assert r["ms_min"] <= r["ms_median"] <= r["ms_p90"]
    code, out, _ = run(capsys, "models", "bench", str(models / name), "--seconds", "0.1")
    assert code == 0 and "invokes/s" in out


# -- quantize -------------------------------------------------------------------------------


def test_float_fixture_is_the_real_network(float_model: Path):
    """The de-quantised model is float and detects what the int8 model detects."""
    ops = {n.op_type for n in onnx.load(str(float_model)).graph.node}
    assert "Conv" in ops and not ops & {"ConvInteger", "DynamicQuantizeLinear"}


def test_quantize_static_qdq_and_agreement(capsys, float_model: Path, videos: Path, tmp_path):
    out_path = tmp_path / "yolov8n_qdq.onnx"
    code, out, err = run(
        capsys, "models", "quantize", str(float_model),
        "--calib", str(videos / "traffic_frames.mp4"), "-o", str(out_path),
        "--frames", "4", "--holdout", "4", "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["calibration_frames"] == 4 and r["holdout_frames"] == 4
    assert r["size_bytes"]["int8"] < r["size_bytes"]["float"] / 2
    a = r["agreement"]
    assert a["reference_detections"] >= 8  # several cars per held-out frame
    assert a["recall"] >= 0.8 and a["precision"] >= 0.8, a
    assert r["labels_kept"] is True
    model = onnx.load(str(out_path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The quantised file is a model the agent runs and inspect recognises.
    code, out, _ = run(capsys, "models", "inspect", str(out_path), "--json")
    info = json.loads(out)
    assert info["quantization"]["scheme"] == "static int8 QDQ"
    assert info["label_source"] == "metadata"
    # An existing output is not overwritten without --force (usage error, exit 2).
    code, _, err = run(
        capsys, "models", "quantize", str(float_model), "--calib",
        str(videos / "traffic_frames.mp4"), "-o", str(out_path),
    )  # fmt: skip
    assert code == 2 and str(out_path) in error_lines(err)[0]


def test_quantize_refuses_bad_inputs(capsys, models: Path, float_model: Path, videos, tmp_path):
    calib = str(videos / "traffic_frames.mp4")
    int8 = models / "yolov8n_int8.onnx"
    code, _, err = run(
        capsys, "models", "quantize", str(int8), "--calib", calib, "-o", str(tmp_path / "o.onnx")
    )
    assert code == 1 and "already quantised" in err and str(int8) in err
    missing = tmp_path / "nothing.mp4"
    code, _, err = run(
        capsys, "models", "quantize", str(float_model), "--calib", str(missing), "-o",
        str(tmp_path / "o.onnx"),
    )  # fmt: skip
    assert code == 1 and str(missing) in err
    code, _, err = run(
        capsys, "models", "quantize", str(float_model), "--calib", calib, "--frames", "30",
        "-o", str(tmp_path / "o.onnx"),
    )  # fmt: skip
    assert code == 1 and "20 frames" in err  # the clip is too short for 30 + 8 samples
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_from_image_folder(float_model: Path, videos: Path, tmp_path: Path):
    import cv2

    from .test_detector_real import read_frames

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in read_frames(videos / "traffic_frames.mp4", (0, 5, 10, 15, 19)).items():
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), f)
    ticks = []
    r = quantize_onnx(
        float_model, tmp_path / "q.onnx", calib=folder, frames=3, holdout=2,
        progress=lambda n=1: ticks.append(n),
    )  # fmt: skip
    assert len(ticks) == 3  # one progress step per calibration frame
    assert r["agreement"]["recall"] >= 0.7


def test_agreement_counts():
    import numpy as np

    from flowfleet.agent.detections import Detections

    a = Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), [0.9, 0.8], [0, 2])
    b = Detections(np.array([[1, 0, 10, 10], [20, 20, 30, 30]]), [0.9, 0.8], [0, 7])
    r = agreement([a], [b])
    assert r["matched"] == 1 and r["recall"] == 0.5 and r["precision"] == 0.5
    assert agreement([Detections.empty()], [Detections.empty()])["recall"] is None
