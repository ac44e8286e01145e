"""Model updates end to end with real components.

A real registry (SQLite, local artifact store, its own signing key) served over real
HTTP by werkzeug on a free port, a real Mosquitto, and an in-process `AgentService`
counting a looping video with the real int8 detector. The test publishes the
retained desired state itself, as the registry's deployments will.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from werkzeug.serving import make_server

from flowfleet import signing
from flowfleet.agent.config import AgentConfig
from flowfleet.agent.service import AgentService
from flowfleet.agent.updater import ProbationDetector, installed_detector
from flowfleet.contract import Desired, ModelRef, Topics, parse_payload
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.testing import fresh_registry, temporary_database

DEVICE = "upd-cam"
DYN = "yolov8n_int8_dynamic.tflite"
FULL = "yolov8n_full_integer_quant.tflite"
TOPICS = Topics()


@contextlib.contextmanager
def served_registry(tmp_path: Path, connection=None):
    """A registry (SQLite) served over real HTTP, with an operator and a device user.

    Yields (base URL, test client, operator token, device token); ``connection`` is
    the MQTT session its command publisher sends desired states on (none:
    deployments answer 503).
    """
    with temporary_database("sqlite", tmp_path / "db") as url:
        reg = fresh_registry(url, tmp_path)
        db = reg.db
        commands = None
        if connection is not None:
            commands = CommandPublisher(db, connection, tick_s=0.2)
            commands.start()
        app = create_app(db, registry=reg, commands=commands)
        with db.connection_context():
            auth.create_user("ops", "operator", actor="test")
            auth.create_user(DEVICE, "viewer", actor="test")
            op_token, _ = auth.create_token("ops", actor="test")
            dev_token, _ = auth.create_token(DEVICE, actor="test")
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", app.test_client(), op_token, dev_token
        finally:
            server.shutdown()
            thread.join(5)
            if commands is not None:
                commands.stop()


@pytest.fixture
def registry_http(tmp_path):
    """(base URL, test client, operator token, device token) of a served registry."""
    with served_registry(tmp_path) as served:
        yield served


def upload(client, token, path: Path, name: str) -> dict:
    resp = client.post(
        f"/api/models/{name}/versions",
        data={"file": (io.BytesIO(path.read_bytes()), path.name)},
        headers={"Authorization": f"Bearer {token}"},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def ref_of(version: dict) -> ModelRef:
    """The ModelRef a registry deployment publishes for a version (API shape)."""
    sig = version["signatures"][0]
    return ModelRef(
        name=version["model"],
        version=version["version"],
        sha256=version["sha256"],
        url=version["download_url"],
        manifest=base64.b64encode(version["manifest"].encode()).decode(),
        signature=sig["signature"],
        key_id=sig["key_id"],
    )


class Watcher:
    """Collects the device's events and reported states from the broker."""

    def __init__(self, broker) -> None:
        self.events: list = []
        self.reported: list = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(TOPICS.events(DEVICE), 1)
        self.client.subscribe(TOPICS.reported(DEVICE), 1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/events"):
            self.events.append(parse_payload("events", msg.payload, device=DEVICE))
        else:
            self.reported.append(parse_payload("reported", msg.payload, device=DEVICE))

    def desire(self, version: int, ref: ModelRef) -> None:
        payload = Desired(device=DEVICE, version=version, models={"road": ref}).to_json()
        info = self.client.publish(TOPICS.desired(DEVICE), payload, qos=1, retain=True)
        info.wait_for_publish(5)

    def wait_event(self, type_: str, after: int = 0, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events[after:]:
                if ev.type == type_:
                    return ev
            if any(ev.type == "model_failed" for ev in self.events[after:]) and type_ not in (
                "model_failed",
            ):
                failed = [e for e in self.events[after:] if e.type == "model_failed"]
                pytest.fail(f"update failed instead: {failed[-1].message}")
            time.sleep(0.05)
        pytest.fail(f"no {type_} event; got {[(e.type, e.message) for e in self.events]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_config(tmp_path, broker, base_url, token, videos, model, **registry) -> AgentConfig:
    # The gate's default budget (5x the current model's median latency) compares a
    # sanity run under the moment's load with a median from quieter frames; tests run
    # several at once on two cores, so updates meant to pass get 20x. Tests about the
    # budget set gate_max_ms or their own factor.
    registry.setdefault("gate_latency_factor", 20.0)
    (tmp_path / "token").write_text(token + "\n")
    keys = tmp_path / "keys.json"
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/api/keys") as resp:  # public, as exported
        keys.write_bytes(resp.read())
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "state_dir": str(tmp_path / "state"),
            "bin_seconds": 60,
            "health_seconds": 60,
            "broker": {"host": broker.host, "port": broker.port},
            "registry": {
                "url": base_url,
                "token_file": str(tmp_path / "token"),
                "keys_file": str(keys),
                **registry,
            },
            "cameras": [
                {
                    "name": "road",
                    "source": str(videos / "traffic_frames.mp4"),
                    "model": str(model),
                    "realtime": True,
                    "loop": True,
                    "threads": 1,
                    "lines": [{"name": "gantry", "points": [[480, 280], [480, 540]]}],
                }
            ],
        }
    )


def running_file(service) -> str:
    """The file name of the detector the camera's pipeline runs now."""
    cam = service.cameras["road"]
    with cam.lock:
        det = installed_detector(cam.pipeline)
    if isinstance(det, ProbationDetector):
        det = det.inner
    return Path(det.info.path).name


def wait_frames(service, more: int, timeout: float = 20.0) -> None:
    cam = service.cameras["road"]
    target = cam.frames + more
    deadline = time.monotonic() + timeout
    while cam.frames < target and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cam.frames >= target, "the camera stopped counting"


def test_good_update_is_activated_and_bad_ones_are_refused(
    tmp_path, broker, registry_http, videos, int8_model, data, caplog
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    full = upload(client, op, data / "models" / FULL, "yolo")
    config = make_config(tmp_path, broker, base, dev, videos, int8_model)
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    try:
        wait_frames(service, 3)
        assert running_file(service) == FULL

        # A good, signed model: downloaded, verified, gated, swapped between frames.
        # Half of it is already there from a broken download: it resumes (Range).
        models = tmp_path / "state" / "models"
        blob = (data / "models" / DYN).read_bytes()
        (models / f"yolo-dyn-v1-{dyn['sha256'][:12]}.tflite.part").write_bytes(blob[:1_000_000])
        caplog.set_level("INFO", logger="flowfleet.agent.updater")
        watcher.desire(1, ref_of(dyn))
        watcher.wait_event("model_activated")
        types = [e.type for e in watcher.events]
        assert types[:3] == ["model_downloading", "model_verified", "model_activated"]
        assert running_file(service).startswith("yolo-dyn-v1-") and DYN not in running_file(service)
        assert service.cameras["road"].model_path.endswith(running_file(service))
        assert "resuming yolo-dyn v1 at byte 1000000 of 3434605" in caplog.text
        wait_frames(service, 5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
            watcher.reported and watcher.reported[-1].desired_version == 1
        ):
            time.sleep(0.05)
        road = watcher.reported[-1].cameras[0]
        assert (road.model, road.version, road.sha256, road.update) == (
            "yolo-dyn",
            1,
            dyn["sha256"],
            "activated",
        )
        assert service.health().cameras[0].model == running_file(service)

        good = ref_of(full)
        cases = [
            # the url serves another artifact: size and sha256 differ from the manifest
            ("checksum", good.model_copy(update={"url": dyn["download_url"]})),
            # the desired sha256 is not the signed manifest's: refused before download
            ("manifest", good.model_copy(update={"sha256": "0" * 64})),
            # signed by a key that is not in the device's bundle
            (
                "signature",
                good.model_copy(
                    update={
                        "signature": signing.sign(
                            signing.Ed25519PrivateKey.generate(), full["manifest"].encode()
                        )
                    }
                ),
            ),
        ]
        cases.append(("checksum", good))  # after its stored bytes are corrupted, below
        ev = None
        for version, (reason, ref) in enumerate(cases, start=2):
            if reason == "checksum" and ref is good:
                assert "bad signature" in ev.message
                stored = tmp_path / "artifacts" / "sha256" / good.sha256[:2] / good.sha256
                stored.chmod(0o644)
                with stored.open("r+b") as fh:
                    fh.seek(100_000)
                    byte = fh.read(1)
                    fh.seek(100_000)
                    fh.write(bytes([byte[0] ^ 0xFF]))
            seen = len(watcher.events)
            watcher.desire(version, ref)
            ev = watcher.wait_event("model_failed", after=seen)
            assert (ev.data["reason"], ev.camera, ev.severity) == (reason, "road", "error")
            assert ev.data["desired_version"] == version
            assert running_file(service).startswith("yolo-dyn-v1-"), "the old model keeps running"
            wait_frames(service, 3)
        assert "does not match the manifest" in ev.message
        assert service.updater.applied_version == 5
        # No signed manifest at all: never run.
        seen = len(watcher.events)
        watcher.desire(6, good.model_copy(update={"manifest": None, "signature": None}))
        ev = watcher.wait_event("model_failed", after=seen)
        assert ev.data["reason"] == "unsigned"
        assert running_file(service).startswith("yolo-dyn-v1-")
        # A desired state that is not newer than the applied one is ignored.
        seen = len(watcher.events)
        watcher.desire(5, good)
        time.sleep(1.0)
        assert [e for e in watcher.events[seen:] if e.type.startswith("model_")] == []
        assert not list((tmp_path / "state" / "models").glob("*.part"))
    finally:
        service.stop()
        watcher.close()

    # A restart runs the activated model, not the config's, and knows the version.
    again = AgentService(config)
    try:
        assert Path(again.cameras["road"].model_path).name.startswith("yolo-dyn-v1-")
        assert again.updater.applied_version == 6
        state = json.loads((tmp_path / "state" / "models" / "active.json").read_text())
        assert Path(state["cameras"]["road"]["previous"]["path"]) == int8_model
    finally:
        again.outbox.close()


def test_gate_failure_and_crash_after_activation_keep_the_old_model(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    full = upload(client, op, data / "models" / FULL, "yolo")
    config = make_config(
        tmp_path, broker, base, dev, videos, int8_model, probation_frames=10_000, max_errors=3
    )
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    try:
        wait_frames(service, 3)
        # Activated, then the new model raises on every frame: after 3 errors the
        # camera is back on its previous model without losing a frame.
        watcher.desire(1, ref_of(dyn))
        watcher.wait_event("model_activated")
        cam = service.cameras["road"]
        with cam.lock:
            probe = installed_detector(cam.pipeline)
        assert isinstance(probe, ProbationDetector)

        def crash(frame):
            raise RuntimeError("delegate failed: tensor arena exhausted")

        probe.inner.detect = crash
        frames_before, restarts = cam.frames, cam.restarts
        ev = watcher.wait_event("model_rolled_back")
        assert (ev.data["reason"], ev.severity) == ("crashed", "error")
        assert "tensor arena exhausted" in ev.message
        assert running_file(service) == FULL and Path(cam.model_path) == int8_model
        wait_frames(service, 3)
        assert cam.frames > frames_before and cam.restarts == restarts
        assert "road" not in service.updater.active

        # A model that loads but misses the latency budget is never activated.
        service.updater.cfg = service.updater.cfg.model_copy(update={"gate_max_ms": 0.001})
        seen = len(watcher.events)
        watcher.desire(2, ref_of(dyn))
        ev = watcher.wait_event("model_failed", after=seen)
        assert ev.data["reason"] == "health_gate" and "latency budget" in ev.message
        assert running_file(service) == FULL
        wait_frames(service, 3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and watcher.reported[-1].desired_version != 2:
            time.sleep(0.05)
        road = watcher.reported[-1].cameras[0]
        assert (road.model, road.file, road.update) == (None, FULL, "failed")
        assert road.reason.startswith("health_gate: ")

        # The registry is unreachable: refused for now, and not marked applied, so the
        # same desired state is tried again later.
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
        service.updater.cfg = service.updater.cfg.model_copy(
            update={"url": dead, "download_attempts": 1, "gate_max_ms": None}
        )
        seen = len(watcher.events)
        watcher.desire(3, ref_of(full))
        ev = watcher.wait_event("model_failed", after=seen)
        assert ev.data["reason"] == "download" and "gave up after 1 attempts" in ev.message
        assert service.updater.applied_version == 2
        assert running_file(service) == FULL
    finally:
        service.stop()
        watcher.close()
