"""The demo's scenes count where people and vehicles really move (no detector: fast).

Every scene's lines and zones lie inside its video's frame, and the plaza's lines,
fed the MOT15 ground-truth tracks of the same frames through the agent's own line
counter, count people both ways, as many as cross each line in the ground truth.
"""

from __future__ import annotations

import collections
import json

import cv2
import numpy as np

from flowfleet.agent.counting import LineCounter
from flowfleet.agent.detections import Detections
from flowfleet.cli import main
from flowfleet.demo import CAMERA, CANARY, SCENES
from flowfleet.models.catalog import default_entry

PLAZA = "pets09-s2l1.avi"
MOT_FPS = 7.0  # MOT15's frame rate for PETS09-S2L1


def frame_size(path) -> tuple[int, int]:
    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read()
        assert ok, f"cannot read {path}"
        return frame.shape[1], frame.shape[0]
    finally:
        cap.release()


def test_every_scene_draws_inside_its_video_and_the_models_exist(data):
    assert "traffic_frames.mp4" not in SCENES  # the 20-frame loop is gone
    assert len({s.device for s in SCENES.values()}) == len(SCENES)
    assert CAMERA and {s.group for s in SCENES.values()} == {"indoor", "outdoor"}
    for name, scene in SCENES.items():
        w, h = frame_size(data / "videos" / name)
        points = [p for _, seg in scene.lines for p in seg]
        points += [p for _, poly in scene.zones for p in poly]
        assert all(0 <= x <= w and 0 <= y <= h for x, y in points), (name, w, h)
        assert 51 < scene.latitude < 52 and -1.1 < scene.longitude < -0.8, name
    assert (data / "models" / default_entry().file).is_file()
    # The canary is the busy plaza: its drift windows hold enough detections.
    assert SCENES[PLAZA].device == CANARY


def ground_truth(data) -> dict[int, list[tuple[float, float, float, float, int]]]:
    """MOT15 PETS09-S2L1 ground truth: frame -> [(x1, y1, x2, y2, person id)]."""
    frames: dict[int, list] = collections.defaultdict(list)
    with open(data / "mot15" / "PETS09-S2L1" / "gt.txt") as fh:
        for row in fh:
            f, pid, x, y, w, h = (float(v) for v in row.split(",")[:6])
            frames[int(f)].append((x, y, x + w, y + h, int(pid)))
    assert len(frames) == 795, len(frames)
    return frames


def crossings_in_truth(frames, a, b) -> dict[str, set[int]]:
    """Who crosses segment a-b in each direction (feet points, consecutive frames)."""

    def side(p):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])

    last: dict[int, tuple[float, float]] = {}
    out: dict[str, set[int]] = {"in": set(), "out": set()}
    for f in sorted(frames):
        for x1, _, x2, y2, pid in frames[f]:
            p = ((x1 + x2) / 2, y2)
            q = last.get(pid)
            last[pid] = p
            if q is None or side(q) * side(p) >= 0:
                continue
            # The step must cross the segment itself, not its extension.
            if ((q[0] - a[0]) * (p[1] - q[1]) - (q[1] - a[1]) * (p[0] - q[0])) * (
                (q[0] - b[0]) * (p[1] - q[1]) - (q[1] - b[1]) * (p[0] - q[0])
            ) < 0:
                out["in" if side(p) > 0 else "out"].add(pid)
    return out


def test_the_plaza_lines_count_the_people_who_cross_them(data):
    frames = ground_truth(data)
    scene = SCENES[PLAZA]
    counters = [LineCounter(name, a, b) for name, (a, b) in scene.lines]
    counted: collections.Counter = collections.Counter()
    for f in sorted(frames):
        rows = frames[f]
        dets = Detections(
            np.array([r[:4] for r in rows]),
            np.ones(len(rows)),
            np.zeros(len(rows)),
            np.array([r[4] for r in rows]),
            names=("person",),
        )
        for line in counters:
            for c in line.update(dets, f / MOT_FPS):
                counted[(c.line, c.direction)] += 1
    for name, (a, b) in scene.lines:
        truth = crossings_in_truth(frames, a, b)
        for direction in ("in", "out"):
            n = counted[(name, direction)]
            # Both ways, and (within one person, the counter's 8 px dead band) as
            # many as cross in the ground truth.
            assert n >= 4, (name, direction, n)
            assert abs(n - len(truth[direction])) <= 1, (name, direction, n, truth)


def test_demo_refuses_bad_options_before_it_starts_anything(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--bin-seconds", "10", "--soak", "8"]) == 2
    err = capsys.readouterr().err
    assert "--soak 8: must be longer than the agents' health beat interval (10 s" in err
    assert main(["demo", "--workdir", str(work), "--rollout-delay", "-1"]) == 2
    assert "--rollout-delay -1: must be 0 or more" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(work), "--broker", "localhost"]) == 2
    assert "--broker 'localhost': expected HOST:PORT" in capsys.readouterr().err
    assert not work.exists()  # nothing was created
    assert main(["demo", "--rollout", "--workdir", str(work)]) == 1
    assert f"no demo in {work}" in capsys.readouterr().err


def test_the_demo_configs_load_with_drift_windows_and_the_judge_sized_for_them(tmp_path, data):
    """The registry.toml and agent TOML the demo writes pass the real typed loaders:
    the agents send drift windows, the judge's sample sizes are the demo's."""
    from flowfleet.agent.config import load_agent_config
    from flowfleet.demo import (
        BASELINE_WINDOWS,
        DRIFT_SECONDS,
        MIN_DETECTIONS,
        MIN_FRAMES,
        _agent_toml,
        _registry_toml,
    )
    from flowfleet.registry.config import load_registry_config

    reg = tmp_path / "registry.toml"
    reg.write_text(_registry_toml(tmp_path / "registry.sqlite", "127.0.0.1", 1883, 8080))
    drift = load_registry_config(reg, check=False).drift
    assert drift.enabled and "latency" not in drift.policies
    assert (drift.min_detections, drift.min_frames) == (MIN_DETECTIONS, MIN_FRAMES)
    assert drift.baseline_windows == BASELINE_WINDOWS and drift.interval_s < DRIFT_SECONDS

    (tmp_path / "device.token").write_text("t\n")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flowfleet.signing import b64, key_id, raw_public_key

    public = Ed25519PrivateKey.generate().public_key()  # a real key's public bundle
    entry = {"key_id": key_id(public), "public_key": b64(raw_public_key(public))}
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{**entry, "not_after": None}]}))
    scene = SCENES[PLAZA]
    text = _agent_toml(
        scene,
        data / "videos" / PLAZA,
        data / "models" / default_entry().file,
        tmp_path / "state",
        "127.0.0.1",
        1883,
        2.0,
        "http://127.0.0.1:8080",
        tmp_path / "device.token",
        keys,
    )
    (tmp_path / "agent.toml").write_text(text)
    agent = load_agent_config(tmp_path / "agent.toml")
    assert agent.drift_seconds == DRIFT_SECONDS
    assert agent.registry is not None and agent.registry.probation_frames == 30


def test_each_play_of_the_story_gets_a_bad_release_of_its_own(tmp_path, data):
    """The judge never judges a camera's move back to the model it rolled back from,
    so each play uploads new bytes: a new version, judged afresh."""
    from flowfleet.demo import BAD_MODEL, new_bad_model

    model = data / "models" / default_entry().file
    first, second = new_bad_model(model, tmp_path), new_bad_model(model, tmp_path)
    assert (first.name, second.name) == (BAD_MODEL, "yolov8n_broken_input-2.tflite")
    blobs = {model.read_bytes(), first.read_bytes(), second.read_bytes()}
    assert len(blobs) == 3  # three different files, so three registry versions
    assert abs(first.stat().st_size - model.stat().st_size) < 4096  # same network
