"""A really worse model, rolled out to a real agent, judged and taken back.

Everything real: a Mosquitto, the registry service (`run_registry`: ingest, commands
outbox, HTTP API, drift judge, rollout job) on SQLite, and a `flowfleet agent`
process counting the person clip at 10 fps with the real int8 detector. The
registry first deploys the good model (yolo v1); a staged rollout then moves the
camera to yolo v2, the same network with broken input scaling
(flowfleet/model_variants.py): it loads, passes the agent's health gate and probation,
and finds nothing. The drift judge compares its windows with v1's baseline
windows, confirms the drift (k of n windows) and deploys v1 again; the rollout
counts the device as drifted and aborts; the agent receives the new desired state
and reports v1 active again. The judge's thresholds are the defaults; only the
sample sizes (6 s windows) and the job intervals are shortened.

The test waits on conditions with generous deadlines: on a loaded machine (several
test files at once on 2 cores) the agent may infer one frame a second, so a window
holds few frames; the judge's minimums are sized for that.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flowfleet.model_variants import broken_input_scaling
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.catalog.modelreg import RegistryConfig
from flowfleet.registry.config import DriftSection, RolloutsSection, WebhooksSection
from flowfleet.registry.http import auth
from flowfleet.registry.service import run_registry
from flowfleet.registry.store.db import AuditEntry, DriftSummary, Event, ReportedState
from flowfleet.registry.store.drift_tables import DriftVerdict
from flowfleet.registry.store.rollout_tables import Rollout, RolloutDevice
from flowfleet.registry.testing import fresh_registry, temporary_database

pytestmark = pytest.mark.slow

DEVICE = "drift-lobby"
CAMERA = "table"
GOOD = "yolov8n_full_integer_quant.tflite"
LINES = {"approach": ((768, 415), (0, 415)), "leave": ((620, 300), (620, 432))}


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    tail = f"\nagent log:\n{log.read_text()[-3000:]}" if log is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def camera_entry(device: str) -> tuple[int | None, dict | None]:
    """(applied desired version, the camera's entry) of the device's reported state."""
    row = ReportedState.get_or_none(ReportedState.device == device)
    if row is None:
        return None, None
    cams = json.loads(row.payload).get("cameras") or []
    return row.desired_version, next((c for c in cams if c.get("camera") == CAMERA), None)


def runs(device: str, version: int, applied: int = 0) -> bool:
    desired, entry = camera_entry(device)
    return (
        desired is not None
        and desired >= applied
        and entry is not None
        and (entry.get("model"), entry.get("version"), entry.get("update"))
        == ("yolo", version, "activated")
    )


def agent_toml(tmp_path: Path, broker, base_url: str, clip: Path, model: Path) -> Path:
    lines = "".join(
        f'\n[[cameras.lines]]\nname = "{n}"\npoints = [[{a[0]}, {a[1]}], [{b[0]}, {b[1]}]]\n'
        for n, (a, b) in LINES.items()
    )
    text = f"""
device_id = "{DEVICE}"
state_dir = "{tmp_path / "agent-state"}"
bin_seconds = 5
health_seconds = 1
drift_seconds = 6

[broker]
host = "{broker.host}"
port = {broker.port}

[registry]
url = "{base_url}"
token_file = "{tmp_path / "device.token"}"
keys_file = "{tmp_path / "keys.json"}"
probation_frames = 20
probation_latency_frames = 0

[[cameras]]
name = "{CAMERA}"
source = "{clip}"
model = "{model}"
fps = 10
realtime = true
loop = true
threads = 1
{lines}"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.fixture
def service(tmp_path, broker, int8_model):
    """(base URL, operator token) of a running registry service with yolo v1 (good)
    deployed to DEVICE's camera and yolo v2 (broken input scaling) uploaded."""
    with temporary_database("sqlite", tmp_path / "db") as url:
        reg = fresh_registry(url, tmp_path)
        worse = broken_input_scaling(int8_model, tmp_path / "yolov8n_broken_input.tflite")
        with reg.db.connection_context():
            reg.add_version(int8_model, name="yolo", filename=GOOD, actor="test")
            reg.add_version(worse, name="yolo", filename=worse.name, actor="test")
            auth.create_user("ops", "operator", actor="test")
            op, _ = auth.create_token("ops", actor="test")
            auth.create_user("fleet", "admin", actor="test")
            dev, _ = auth.create_token("fleet", actor="test", device=DEVICE)
            reg.deploy(DEVICE, CAMERA, "yolo", 1, actor="test", reason="the good model")
        (tmp_path / "device.token").write_text(dev + "\n")
        stop = threading.Event()
        ready: list[str] = []
        failed: list[BaseException] = []

        def serve():
            try:
                run_registry(
                    url,
                    BrokerAddress(broker.host, broker.port),
                    "127.0.0.1",
                    0,
                    stop_event=stop,
                    client_id="registry-drift-e2e",
                    on_ready=ready.append,
                    registry_config=RegistryConfig(
                        artifacts=str(tmp_path / "artifacts"), key_dir=tmp_path / "keys"
                    ),
                    raw_retention_days=None,
                    webhooks=WebhooksSection(enabled=False),
                    # Default thresholds; 6 s windows hold ~140 detections of the good
                    # model at 10 fps, but ~14 at the 1 fps of a loaded machine, so
                    # min_detections and min_frames are sized down to that. Latency is
                    # left out: on a shared test machine it follows the other processes.
                    drift=DriftSection(
                        interval_s=1.0,
                        settle_s=0.5,
                        min_detections=10,
                        min_frames=5,
                        baseline_windows=5,
                        policies=("distribution", "confidence_variance"),
                    ),
                    rollouts=RolloutsSection(tick_s=0.5),
                )
            except BaseException as exc:  # reported by the test
                failed.append(exc)

        thread = threading.Thread(target=serve, name="registry-service", daemon=True)
        thread.start()
        try:
            wait_for(lambda: ready or failed, 30, "the registry to start")
            assert not failed, failed
            base = ready[0].rstrip("/")
            with urllib.request.urlopen(f"{base}/api/keys", timeout=10) as resp:
                (tmp_path / "keys.json").write_bytes(resp.read())
            yield base, op
        finally:
            stop.set()
            thread.join(30)


def api(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.timeout(1200)
def test_a_really_worse_model_is_rolled_back_and_the_agent_runs_the_old_one_again(
    tmp_path, broker, service, person_clip, int8_model
):
    base, op = service
    config = agent_toml(tmp_path, broker, base, person_clip, int8_model)
    log_path = tmp_path / "agent.log"
    log = open(log_path, "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # The retained desired state puts the agent on yolo v1 as it starts.
        wait_for(lambda: runs(DEVICE, 1), 180, "the agent to run yolo v1", log_path)

        def v1_baseline() -> bool:
            rows = DriftSummary.select().where(
                (DriftSummary.device == DEVICE) & DriftSummary.model.startswith("yolo-v1-")
            )
            # The judge's baseline: baseline_windows (5) of v1's windows.
            return len(rows) >= 5 and sum(json.loads(r.payload)["detections"] for r in rows) >= 30

        wait_for(v1_baseline, 240, "drift windows of yolo v1", log_path)

        created = api(
            base,
            op,
            "POST",
            "/api/rollouts",
            {
                "model": "yolo",
                "version": 2,
                "camera": CAMERA,
                "targets": {"devices": [DEVICE]},
                "plan": {
                    "canary": {"devices": [DEVICE]},
                    "waves": 1,
                    "soak_s": 900,
                    "timeout_s": 300,
                    "beat_timeout_s": 120,
                },
                "reason": "e2e: a model that is really worse",
            },
        )
        rid = created["id"]
        # The rollout moves the camera; the agent activates v2 (it passes the gates).
        wait_for(lambda: runs(DEVICE, 2), 180, "the agent to activate yolo v2", log_path)

        def aborted():
            r = Rollout.get_by_id(rid)
            return r if r.state == "aborted" else None

        rollout = wait_for(aborted, 300, "the drift judge to stop the rollout", log_path)
        rollback = (
            AuditEntry.select()
            .where(
                (AuditEntry.action == "drift.rollback")
                & (AuditEntry.target == f"device:{DEVICE}/camera:{CAMERA}")
            )
            .get()
        )
        details = json.loads(rollback.details)
        # The agent receives that desired state and runs the good model again.
        wait_for(
            lambda: runs(DEVICE, 1, applied=details["desired_version"]),
            180,
            "the agent to report yolo v1 active again",
            log_path,
        )
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
        log.close()

    # The evidence: v2's windows against v1's baseline, confirmed in k of n windows.
    assert rollback.actor == "drift-judge"
    assert (details["model"], details["version"]) == ("yolo", 2)
    assert (details["previous_model"], details["previous_version"]) == ("yolo", 1)
    assert "dpf_log_ratio" in details["breaches"]
    assert details["statistics"]["dpf_log_ratio"] < -details["thresholds"]["dpf_log_ratio"]
    assert (details["k"], details["n"]) == (3, 4)
    assert 3 <= len(details["windows"]) <= 4  # the last n judged windows, k of them breaches
    assert details["baseline_windows"], "judged against the previous model's windows"
    confirming = DriftSummary.select().where(DriftSummary.id.in_(details["windows"]))
    assert all(s.model.startswith("yolo-v2-") for s in confirming)
    baseline = DriftSummary.select().where(DriftSummary.id.in_(details["baseline_windows"]))
    assert all(s.model.startswith("yolo-v1-") for s in baseline)
    verdicts = [
        v.verdict
        for v in DriftVerdict.select()
        .where(DriftVerdict.device == DEVICE)
        .order_by(DriftVerdict.id)
        if v.model.startswith("yolo-v2-")
    ]
    assert verdicts.count("model_drift") == 1 and "ok" not in verdicts, verdicts

    # The rollout: the canary drifted, the rollout aborted, nobody else was moved.
    assert rollout.reason.startswith("canary failed"), rollout.reason
    (device,) = RolloutDevice.select().where(RolloutDevice.rollout == rid)
    assert device.state == "drifted", device.reason
    assert "drift alarm by drift-judge" in device.reason
    assert (device.previous_model, device.previous_version) == ("yolo", 1)

    # What the agent itself said: v1, then v2 from the rollout, then v1 again.
    activated = [
        (json.loads(e.payload)["data"]["model"], json.loads(e.payload)["data"]["version"])
        for e in Event.select()
        .where((Event.device == DEVICE) & (Event.type == "model_activated"))
        .order_by(Event.seq)
    ]
    assert activated == [("yolo", 1), ("yolo", 2), ("yolo", 1)], activated
    assert agent.returncode == 0, log_path.read_text()[-3000:]
