"""Shadow comparison on the device, with the real models on the real sample videos.

`traffic_frames.mp4` (20 frames, two cars cross the gantry line) keeps each run to a
few seconds: the active int8 model on every frame, the candidate beside it.
"""

from __future__ import annotations

import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.agent.config import AgentConfig, CameraConfig
from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors import load_detector
from flowfleet.agent.service import AgentService
from flowfleet.agent.shadow import ShadowRunner, candidate_pipeline, match_boxes, stride_for
from flowfleet.agent.shadow_offline import compare_video
from flowfleet.contract import Topics, parse_payload
from flowfleet.contract_shadow import ShadowModel

FULL = "yolov8n_full_integer_quant.tflite"
DYN = "yolov8n_int8_dynamic.tflite"
GANTRY = {"name": "gantry", "points": [[480, 280], [480, 540]]}
ROAD = {"name": "road", "points": [[250, 250], [750, 250], [750, 620], [250, 620]]}
NAMES = ("person", "car", "truck")


def dets(*boxes) -> Detections:
    """Detections from (x1, y1, x2, y2, class name) tuples."""
    if not boxes:
        return Detections.empty(NAMES)
    return Detections(
        xyxy=np.array([b[:4] for b in boxes], dtype=np.float32),
        confidence=np.full(len(boxes), 0.9, dtype=np.float32),
        class_id=np.array([NAMES.index(b[4]) for b in boxes], dtype=np.int32),
        names=NAMES,
    )


@pytest.mark.parametrize(
    ("a", "b", "matched"),
    [
        ([], [], 0),
        ([(0, 0, 10, 10, "car")], [], 0),
        ([(0, 0, 10, 10, "car")], [(0, 0, 10, 10, "car")], 1),
        # IoU 0.9: a match; IoU exactly 0.5 is not above the threshold
        ([(0, 0, 10, 10, "car")], [(0, 0, 10, 9, "car")], 1),
        ([(0, 0, 10, 10, "car")], [(0, 0, 10, 5, "car")], 0),
        # the same box labelled differently is a disagreement
        ([(0, 0, 10, 10, "car")], [(0, 0, 10, 10, "truck")], 0),
        # one to one: two candidate boxes on one active box match once
        ([(0, 0, 10, 10, "car")], [(0, 0, 10, 10, "car"), (0, 0, 10, 9, "car")], 1),
        # greedy from the highest IoU: each active box gets its own twin
        (
            [(0, 0, 10, 10, "car"), (20, 0, 30, 10, "person")],
            [(21, 0, 30, 10, "person"), (0, 0, 10, 10, "car"), (50, 50, 60, 60, "car")],
            2,
        ),
    ],
)
def test_match_boxes(a, b, matched):
    assert match_boxes(dets(*a), dets(*b)) == matched
    assert match_boxes(dets(*b), dets(*a)) == matched  # symmetric


@pytest.mark.parametrize(
    ("share", "stride"), [(1.0, 1), (0.5, 2), (0.3, 3), (0.25, 4), (0.01, 100)]
)
def test_stride_for_share(share, stride):
    assert stride_for(share) == stride


def road_camera(data, model=FULL, **extra) -> CameraConfig:
    return CameraConfig(
        name="road",
        source=str(data / "videos" / "traffic_frames.mp4"),
        model=str(data / "models" / model),
        lines=[GANTRY],
        threads=1,
        **extra,
    )


@pytest.fixture(scope="module")
def comparisons(data):
    """share -> candidate file -> the window of one pass over the clip."""
    cam = road_camera(data, zones=[ROAD])
    return {
        (name, share): compare_video(cam, data / "models" / name, share=share).window
        for name, share in ((FULL, 1.0), (DYN, 1.0), (DYN, 0.25))
    }


def test_the_same_model_as_candidate_agrees_fully_and_counts_the_same(comparisons):
    w = comparisons[(FULL, 1.0)]
    assert (w.frames, w.frames_compared) == (20, 20)
    assert w.boxes_active == w.boxes_candidate == w.matched > 20
    assert w.agreement == 1.0
    assert w.detections_per_frame_active == w.detections_per_frame_candidate
    rows = {(r.line, r.class_): r for r in w.lines}
    car = rows[("gantry", "car")]
    assert (car.active_in, car.active_out) == (2, 0), "the clip's two cars"
    for r in w.lines:  # every line and class: equal counts
        assert (r.candidate_in, r.candidate_out) == (r.active_in, r.active_out)
    assert {r.class_ for r in w.lines} >= {"person", "car", "truck"}, "zeros are declared"


def test_a_different_model_agrees_less_and_both_counts_are_reported(comparisons):
    same, other = comparisons[(FULL, 1.0)], comparisons[(DYN, 1.0)]
    assert other.candidate.file == DYN
    assert 0.5 < other.agreement < 0.95 < same.agreement
    assert other.boxes_active == same.boxes_active  # the active side is untouched
    assert other.boxes_candidate != other.boxes_active
    assert other.matched < min(other.boxes_active, other.boxes_candidate)
    car = {(r.line, r.class_): r for r in other.lines}[("gantry", "car")]
    assert (car.active_in, car.candidate_in) == (2, 2)
    assert other.latency_ms_candidate > 0 and other.latency_ms_active > 0


def test_a_share_of_frames_runs_the_candidate_on_every_kth_frame(comparisons):
    w = comparisons[(DYN, 0.25)]
    assert (w.share, w.frames, w.frames_compared) == (0.25, 20, 5)
    assert w.boxes_active < comparisons[(DYN, 1.0)].boxes_active  # compared frames only
    car = {(r.line, r.class_): r for r in w.lines}[("gantry", "car")]
    assert car.active_in == 2, "the active model counts every frame"


def test_the_candidates_raw_output_is_binned_like_a_drift_summary(comparisons):
    """The registry judges the candidate (normally the previous model) against its
    own drift baseline with this: its raw detections on the compared frames."""
    for key, compared in (((FULL, 1.0), 20), ((DYN, 0.25), 5)):
        w = comparisons[key]
        d = w.candidate_drift
        assert d is not None and d.frames == w.frames_compared == compared
        assert sum(d.confidence_hist) == d.detections == sum(d.class_mix.values())
        # Raw output, before the camera's class filter: at least the counted boxes.
        assert d.detections >= w.boxes_candidate > 0
    same = comparisons[(FULL, 1.0)].candidate_drift
    assert same.class_mix.get("car", 0) > 0


def test_zones_are_compared_entries_and_occupancy(comparisons):
    same, other = comparisons[(FULL, 1.0)], comparisons[(DYN, 0.25)]
    rows = {(z.zone, z.class_): z for z in same.zones}
    assert {c for _, c in rows} >= {"person", "car", "truck"}, "zeros are declared"
    car = rows[("road", "car")]
    assert car.active_entries == car.candidate_entries > 0
    assert car.active_occupancy == car.candidate_occupancy > 0
    for z in same.zones:  # the same model on the same frames: the same zone figures
        assert (z.candidate_entries, z.candidate_occupancy) == (
            z.active_entries,
            z.active_occupancy,
        )
    car = {(z.zone, z.class_): z for z in other.zones}[("road", "car")]
    assert car.active_entries > 0 and car.active_occupancy > 0


class Listener:
    """Everything the device publishes, from the real broker."""

    def __init__(self, broker, device: str) -> None:
        self.messages: list[tuple[str, object]] = []
        self.device = device
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{Topics().root}/devices/{device}/+", 1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        _, kind = Topics().parse_device_topic(msg.topic)
        self.messages.append((kind, parse_payload(kind, msg.payload, device=self.device)))

    def of(self, kind: str) -> list:
        return [m for k, m in self.messages if k == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_only_the_active_models_counts_are_published_as_counts(tmp_path, broker, data):
    """The agent with a candidate that counts differently (a quarter of the frames):
    its count bins carry the active model's counts, the shadow window both."""
    config = AgentConfig.model_validate(
        {
            "device_id": "shadow-cam",
            "state_dir": str(tmp_path / "state"),
            "bin_seconds": 3600,
            "health_seconds": 3600,
            "drift_seconds": 0,
            "broker": {"host": broker.host, "port": broker.port},
            "outbox": {"confirm": "broker"},
            "cameras": [road_camera(data, realtime=False).model_dump()],
        }
    )
    listener = Listener(broker, "shadow-cam")
    service = AgentService(config)
    cam = service.cameras["road"]
    detector = load_detector(data / "models" / DYN, threads=1)
    runner = ShadowRunner(
        "road",
        candidate_pipeline(cam.config, detector, 30.0, stride_for(0.25)),
        share=0.25,
        active=ShadowModel(file=FULL),
        candidate=ShadowModel(file=DYN),
    )
    service.shadows.attach(runner)  # before the first frame
    service.start()
    try:
        deadline = time.monotonic() + 120
        while cam.state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cam.frames == 20
    finally:
        service.stop()
    deadline = time.monotonic() + 10
    while not (listener.of("counts") and listener.of("shadow")) and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.close()
    (window,) = listener.of("shadow")
    assert (window.frames, window.frames_compared, window.candidate.file) == (20, 5, DYN)
    shadow_rows = {(r.line, r.class_): r for r in window.lines}
    counted: dict[tuple[str, str], list[int]] = {}
    for count_bin in listener.of("counts"):
        for row in count_bin.lines:
            got = counted.setdefault((row.line, row.class_), [0, 0])
            got[0] += row.in_
            got[1] += row.out
    assert counted[("gantry", "car")] == [2, 0]
    for key, (n_in, n_out) in counted.items():
        assert (shadow_rows[key].active_in, shadow_rows[key].active_out) == (n_in, n_out)
    car = shadow_rows[("gantry", "car")]
    assert (car.candidate_in, car.candidate_out) != (2, 0), "the candidate counted otherwise"
