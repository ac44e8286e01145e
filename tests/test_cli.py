"""`flowfleet` CLI: exit codes and one-line errors that name the bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.onnx_models import make_head_model


def flowfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowfleet.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.tflite").write_text("this is a text file, not a model\n")
    good = (data / "models" / "yolov8n_full_integer_quant.tflite").read_bytes()
    (d / "half.tflite").write_bytes(good[: len(good) // 2])
    (d / "video.mp4").write_text("not a video")
    # A real, runnable ONNX model with a YOLOv10-style end-to-end head [1, 300, 6]:
    # no decoder of ours understands that output.
    make_head_model(d / "yolov10.onnx", (1, 300, 6), input_shape=(1, 3, 640, 640))
    return d


@pytest.mark.parametrize(
    ("case", "argv", "code", "must_name"),
    [
        ("missing model", ["{video}", "--model", "{tmp}/absent.tflite"], 1, "absent.tflite"),
        ("text renamed .tflite", ["{video}", "--model", "{tmp}/notes.tflite"], 1, "notes.tflite"),
        ("truncated model", ["{video}", "--model", "{tmp}/half.tflite"], 1, "half.tflite"),
        (
            "output no decoder knows",
            ["{video}", "--model", "{tmp}/yolov10.onnx"],
            1,
            "yolov10.onnx",
        ),
        ("missing video", ["{tmp}/absent.mp4", "--model", "{model}"], 1, "absent.mp4"),
        ("unreadable video", ["{tmp}/video.mp4", "--model", "{model}"], 1, "video.mp4"),
        (
            "line with one point",
            ["{video}", "--model", "{model}", "--line", "door:10,10"],
            2,
            "--line",
        ),
        (
            "zone with two points",
            ["{video}", "--model", "{model}", "--zone", "z:1,1;2,2"],
            2,
            "--zone",
        ),
        (
            "unknown tracker setting",
            ["{video}", "--model", "{model}", "--tracker", "lost=5"],
            2,
            "--tracker lost: unknown setting",
        ),
        (
            "tracker setting out of range",
            ["{video}", "--model", "{model}", "--tracker", "lost_s=-1"],
            2,
            "--tracker lost_s",
        ),
        (
            "tracker settings that contradict",
            ["{video}", "--model", "{model}", "--tracker", "new_track_thresh=0.5"],
            2,
            "new_track_thresh 0.5 is below high_thresh 0.6",
        ),
        (
            "tracker setting without a value",
            ["{video}", "--model", "{model}", "--tracker", "lost_s"],
            2,
            "expected KEY=VALUE",
        ),
        (
            "tracker setting given twice",
            ["{video}", "--model", "{model}", "--tracker", "lost_s=1", "--tracker", "lost_s=2"],
            2,
            "--tracker lost_s: given twice",
        ),
        (
            "unknown class",
            ["{video}", "--model", "{model}", "--classes", "person,unicorn"],
            2,
            "unicorn",
        ),
    ],
)
def test_bad_input_gives_one_line_error(case, argv, code, must_name, bad_files, data):
    subst = {
        "video": str(data / "videos" / "traffic_frames.mp4"),
        "model": str(data / "models" / "yolov8n_full_integer_quant.tflite"),
        "models": str(data / "models"),
        "tmp": str(bad_files),
    }
    result = flowfleet("count", *[a.format(**subst) for a in argv])
    assert result.returncode == code, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1, result.stderr
    assert must_name in errors[0]
    assert "Traceback" not in result.stderr


def test_help_and_version():
    assert flowfleet("--help").returncode == 0
    assert "count" in flowfleet("--help").stdout
    assert flowfleet("count", "--help").returncode == 0
    assert flowfleet("--version").stdout.startswith("flowfleet ")


def test_count_traffic_vehicles(data):
    result = flowfleet(
        "count",
        str(data / "videos" / "traffic_frames.mp4"),
        "--line",
        "gantry:480,280,480,540",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    # LiteRT's C++ start-up line stays out of the user's way without -v (issue 20).
    assert "XNNPACK" not in result.stderr and "XNNPACK" not in result.stdout
    report = json.loads(result.stdout)
    assert report["frames"] == 20
    gantry = report["lines"]["gantry"]
    vehicles = sum(gantry["classes"][c]["in"] for c in ("car", "truck", "bus"))
    assert vehicles >= 2 and gantry["total"]["out"] == 0
    assert gantry["classes"]["person"] == {"in": 0, "out": 0}


def test_count_verbose_shows_runtime_lines(data):
    result = flowfleet(
        "count", str(data / "videos" / "traffic_frames.mp4"), "--line", "g:480,280,480,540", "-v"
    )
    assert result.returncode == 0, result.stderr
    assert "Created TensorFlow Lite XNNPACK delegate" in result.stderr
    assert "line g: in 2, out 0" in result.stdout


def test_native_stderr_keeps_what_is_not_chatter(capfd):
    """Runtime chatter written to fd 2 is held back; anything else reaches stderr."""
    import os

    from flowfleet.agent.detectors.native_stderr import captured_stderr

    with captured_stderr():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"ERROR: something the user must see\n")
    assert capfd.readouterr().err == "ERROR: something the user must see\n"


def test_count_with_tracker_settings(data):
    """Settings reach the tracker: with ``min_hits`` longer than the 20-frame clip no
    car gets an id, so nothing is counted; lowering both score thresholds keeps the
    two cars."""
    counts = {}
    for name, settings in [
        ("strict", ["min_hits=30"]),
        ("lenient", ["high_thresh=0.4", "new_track_thresh=0.5", "lost_s=5"]),
    ]:
        result = flowfleet(
            "count",
            str(data / "videos" / "traffic_frames.mp4"),
            "--line",
            "gantry:480,280,480,540",
            "--classes",
            "car",
            "--json",
            *[arg for s in settings for arg in ("--tracker", s)],
        )
        assert result.returncode == 0, result.stderr
        counts[name] = json.loads(result.stdout)["lines"]["gantry"]["total"]
    assert counts == {"strict": {"in": 0, "out": 0}, "lenient": {"in": 2, "out": 0}}


def test_count_all_classes_accepts_any_label(data):
    result = flowfleet(
        "count",
        str(data / "videos" / "traffic_frames.mp4"),
        "--line",
        "gantry:480,280,480,540",
        "--classes",
        "all",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert "toothbrush" in json.loads(result.stdout)["lines"]["gantry"]["classes"]


def test_agent_check_config_names_file_and_key(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "x"\nwrong_key = 1\n')
    result = flowfleet("agent", "check-config", "--config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "wrong_key" in result.stderr
