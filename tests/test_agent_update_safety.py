"""Model update safety with real components: slow models, drift windows, cameras down.

Same setup as `test_agent_update`: a real registry served over HTTP, a real
Mosquitto, an `AgentService` counting a looping video with the real int8 TFLite
detector, and the real dynamic-range TFLite model as the update. A model that turns
slow after activation is the real detector with a sleep put in front of its
inference (as `test_agent_update` makes one crash), so the probation sees real,
measured latencies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flowfleet.agent.probation import ProbationDetector
from flowfleet.agent.service import AgentService
from flowfleet.agent.updater import installed_detector
from flowfleet.contract import parse_payload
from tests.test_agent_update import (
    DEVICE,
    DYN,
    FULL,
    TOPICS,
    Watcher,
    make_config,
    ref_of,
    running_file,
    served_registry,
    upload,
    wait_frames,
)


@pytest.fixture
def registry_http(tmp_path):
    """(base URL, test client, operator token, device token) of a served registry."""
    with served_registry(tmp_path) as served:
        yield served


class DriftWatcher(Watcher):
    """A `Watcher` that also collects the device's drift summaries."""

    def __init__(self, broker) -> None:
        self.drift: list = []
        super().__init__(broker)
        self.client.subscribe(TOPICS.drift(DEVICE), 1)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == TOPICS.drift(DEVICE):
            self.drift.append(parse_payload("drift", msg.payload, device=DEVICE))
        else:
            super()._on_message(client, userdata, msg)


def probation_of(service) -> ProbationDetector:
    cam = service.cameras["road"]
    with cam.lock:
        probe = installed_detector(cam.pipeline)
    assert isinstance(probe, ProbationDetector)
    return probe


def slow_down(probe: ProbationDetector, ms: float, frames: int | None = None) -> list[int]:
    """Put a ``ms`` sleep before the new model's real inference (for ``frames`` frames,
    or from now on); returns a one-item list counting the slowed frames."""
    real = probe.inner.detect
    slowed = [0]

    def detect(frame):
        if frames is None or slowed[0] < frames:
            slowed[0] += 1
            time.sleep(ms / 1000.0)
        return real(frame)

    probe.inner.detect = detect
    return slowed


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_model_that_turns_slow_in_probation_is_rolled_back(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    config = make_config(
        tmp_path,
        broker,
        base,
        dev,
        videos,
        int8_model,
        probation_frames=10_000,
        probation_latency_frames=8,
        # The dynamic-range model is ~4x slower than the int8 one by nature: a budget
        # of 8x keeps its gate from failing on a busy machine; the test is about
        # what happens after the gate.
        gate_latency_factor=8.0,
    )
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    try:
        wait_frames(service, 5)
        watcher.desire(1, ref_of(dyn))
        watcher.wait_event("model_activated")
        probe = probation_of(service)
        # The budget is the gate's: gate_latency_factor x the old model's median.
        assert probe.budget_ms is not None and probe.latency_frames == 8
        budget = probe.budget_ms

        # One very slow frame (a hiccup) is not a slow model: no rollback.
        hiccup = slow_down(probe, 4 * budget, frames=1)
        wait_frames(service, 12)
        assert hiccup[0] == 1
        assert probe.state == "probation"
        assert not [e for e in watcher.events if e.type == "model_rolled_back"]

        # From now on every inference takes longer than the budget: rolled back.
        cam = service.cameras["road"]
        frames_before, restarts = cam.frames, cam.restarts
        slow_down(probe, 1.5 * budget)
        ev = watcher.wait_event("model_rolled_back")
        assert (ev.data["reason"], ev.severity, ev.camera) == ("slow", "error", "road")
        assert "median inference" in ev.message
        assert f"over 8 probation frames exceeds the {budget:.0f} ms budget" in ev.message
        assert probe.state == "tripped" and probe.trip_reason == "slow"
        assert running_file(service) == FULL and Path(cam.model_path) == int8_model
        wait_frames(service, 3)
        assert cam.frames > frames_before and cam.restarts == restarts
        assert "road" not in service.updater.active
        wait_for(
            lambda: watcher.reported and watcher.reported[-1].cameras[0].update == "rolled_back",
            what="the rolled_back reported state",
        )
        road = watcher.reported[-1].cameras[0]
        assert (road.model, road.file) == (None, FULL)
        assert road.reason.startswith("slow: yolo-dyn v1 median inference ")
    finally:
        service.stop()
        watcher.close()


def test_drift_windows_close_at_each_model_swap(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    config = make_config(
        tmp_path,
        broker,
        base,
        dev,
        videos,
        int8_model,
        probation_frames=10_000,
        probation_latency_frames=5,
    )
    # One long window: any summary before the stop comes from a swap, not the clock.
    config = config.model_copy(update={"drift_seconds": 3600.0})
    watcher = DriftWatcher(broker)
    service = AgentService(config)
    service.start()
    cam = service.cameras["road"]
    try:
        wait_frames(service, 5)
        watcher.desire(1, ref_of(dyn))
        watcher.wait_event("model_activated")
        wait_for(lambda: len(watcher.drift) == 1, what="the drift summary closed at the swap")
        new_file = Path(cam.model_path).name
        assert new_file.startswith("yolo-dyn-v1-")
        wait_frames(service, 5)
        probe = probation_of(service)
        slow_down(probe, 1.5 * probe.budget_ms)
        watcher.wait_event("model_rolled_back")
        wait_for(lambda: len(watcher.drift) == 2, what="the drift summary closed at the rollback")
        wait_frames(service, 5)
    finally:
        service.stop()  # closes the open window: the third summary
        watcher.close()
    wait_for(lambda: len(watcher.drift) == 3, what="the last drift summary")
    before, during, after = sorted(watcher.drift, key=lambda s: s.start)
    # Each window is one model's, back to back, and together they hold every frame.
    assert [s.model for s in (before, during, after)] == [FULL, new_file, FULL]
    assert before.end == during.start and during.end == after.start
    assert all(s.frames > 0 for s in (before, during, after))
    assert before.frames + during.frames + after.frames == cam.frames
    # The slow frames are the new model's: its window shows them, the others do not.
    # (p99: on a busy machine many fast frames may come before the 5 slow ones.)
    assert during.latency_ms_p99 > probe.budget_ms
    assert after.latency_ms_p50 < probe.budget_ms and before.latency_ms_p50 < probe.budget_ms


def camera_down_config(tmp_path, broker, base, dev, videos, int8_model, **registry):
    """A config whose camera's video file does not exist yet: the camera is down."""
    config = make_config(tmp_path, broker, base, dev, videos, int8_model, **registry)
    later = tmp_path / "later.mp4"
    cams = (config.cameras[0].model_copy(update={"source": str(later)}),)
    return config.model_copy(update={"cameras": cams}), later


def test_update_for_a_camera_that_is_down_waits_for_its_gate(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    config, later = camera_down_config(tmp_path, broker, base, dev, videos, int8_model)
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    cam = service.cameras["road"]
    try:
        wait_for(lambda: cam.state == "failed", what="the camera to fail")
        watcher.desire(1, ref_of(dyn))
        ev = watcher.wait_event("model_pending")
        assert (ev.data["reason"], ev.camera) == ("pending", "road")
        assert "waits to be health-gated on its next frame" in ev.message
        # Verified and held; not activated: the camera would start on its old model.
        assert Path(cam.model_path) == int8_model
        assert "road" not in service.updater.active and "road" in service.updater.pending
        wait_for(
            lambda: watcher.reported and watcher.reported[-1].desired_version == 1,
            what="the reported state",
        )
        road = watcher.reported[-1].cameras[0]
        assert (road.update, road.model, road.file) == ("verified", None, FULL)
        assert road.reason.startswith("pending: camera road delivers no frames")
        assert not [e for e in watcher.events if e.type == "model_activated"]
    finally:
        service.stop()
        watcher.close()
    state = json.loads((tmp_path / "state" / "models" / "active.json").read_text())
    assert state["pending"]["road"]["ref"]["name"] == "yolo-dyn"

    # The agent restarts with the update still pending (the applied desired state is
    # not re-run): it starts on its old model and gates the new one on its first frame.
    watcher = Watcher(broker)
    service = AgentService(config)
    cam = service.cameras["road"]
    assert Path(cam.model_path) == int8_model
    service.start()
    try:
        wait_for(lambda: cam.state == "failed", what="the camera to fail again")
        later.symlink_to(videos / "traffic_frames.mp4")  # the camera comes back
        ev = watcher.wait_event("model_activated", timeout=40)
        assert "gate inference" in ev.message and "budget" in ev.message
        probe = probation_of(service)  # swapped in under probation, the old one as fallback
        assert Path(probe.fallback.info.path).name == FULL
        assert running_file(service).startswith("yolo-dyn-v1-")
        assert service.updater.pending == {} and service.updater.active["road"]["version"] == 1
        wait_frames(service, 3)
    finally:
        service.stop()
        watcher.close()


def test_pending_update_that_fails_its_gate_is_never_activated(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    config, later = camera_down_config(
        tmp_path, broker, base, dev, videos, int8_model, gate_max_ms=0.001
    )
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    cam = service.cameras["road"]
    try:
        wait_for(lambda: cam.state == "failed", what="the camera to fail")
        watcher.desire(1, ref_of(dyn))
        watcher.wait_event("model_pending")
        seen = len(watcher.events)
        later.symlink_to(videos / "traffic_frames.mp4")
        ev = watcher.wait_event("model_failed", after=seen, timeout=40)
        assert ev.data["reason"] == "health_gate" and "latency budget" in ev.message
        assert running_file(service) == FULL and Path(cam.model_path) == int8_model
        assert service.updater.pending == {} and "road" not in service.updater.active
        wait_frames(service, 3)
        assert not [e for e in watcher.events if e.type == "model_activated"]
    finally:
        service.stop()
        watcher.close()


@pytest.mark.parametrize(
    ("registry", "problem"),
    [
        ({"probation_latency_frames": 2}, "must be 0 (off) or at least 5"),
        (
            {"probation_frames": 20, "probation_latency_frames": 30},
            "probation_latency_frames (30) exceeds probation_frames (20)",
        ),
        ({"gate_frame_max_age_s": 0}, "greater than 0"),
    ],
)
def test_update_safety_settings_are_validated(tmp_path, registry, problem):
    from flowfleet.agent.config import ConfigError, load_agent_config

    (tmp_path / "keys.json").write_text('{"keys": [{"key_id": "k", "public_key": "x"}]}')
    lines = [f"{k} = {v}" for k, v in registry.items()]
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "d1"\n[registry]\nurl = "http://r.example"\nkeys_file = "keys.json"\n'
        + "\n".join(lines)
        + '\n[[cameras]]\nname = "road"\nsource = "v.mp4"\nmodel = "m.tflite"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert problem in str(err.value) and str(path) in str(err.value)
    # Off, or a short probation with the default window (capped at probation_frames): fine.
    for ok in ("probation_latency_frames = 0", "probation_frames = 20"):
        path.write_text(path.read_text().replace("\n".join(lines), ok))
        load_agent_config(path)
        lines = [ok]
