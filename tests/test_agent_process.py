"""Real agent processes against a real Mosquitto and the real registry ingest worker.

- the broker goes away for 30 s while the agent counts a video: nothing lost, no gaps;
- the agent is SIGKILLed mid-video and restarted: it resumes from the persisted frame,
  the registry's totals equal the agent's persisted cumulative counts exactly, the
  sequence continues without reuse;
- the outbox cap is hit during an outage: the policy drops old health beats, keeps
  every count bin, and reports it (event, health field, log);
- under systemd: READY / WATCHDOG / STOPPING on the notify socket, a Prometheus
  endpoint, and SIGTERM flushes, says offline and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowfleet.contract import Topics, parse_payload
from flowfleet.mqtt import BrokerAddress
from flowfleet.provisioning.mosquitto import free_port
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.http.web import devices, totals
from flowfleet.registry.store import db as regdb
from tests.factories import PERSON_CLIP_COUNTS, PERSON_CLIP_FRAMES

pytestmark = pytest.mark.slow

LINES = {"approach": ((768, 415), (0, 415)), "leave": ((620, 300), (620, 432))}
# The delivery tests count the person video's first 480 frames (an image folder, the
# `person_clip` fixture); CLEAN is what a clean run of the clip counts.
PERSON_FRAMES = PERSON_CLIP_FRAMES
CLEAN = PERSON_CLIP_COUNTS


def write_config(
    tmp_path: Path,
    broker,
    video: Path,
    model: Path,
    *,
    device: str,
    bin_seconds: float = 1,
    health_seconds: float = 1,
    extra: str = "",
    lines: dict = LINES,
) -> Path:
    line_text = "".join(
        f'\n[[cameras.lines]]\nname = "{n}"\npoints = [[{a[0]}, {a[1]}], [{b[0]}, {b[1]}]]\n'
        for n, (a, b) in lines.items()
    )
    text = f"""
device_id = "{device}"
state_dir = "{tmp_path / "state"}"
bin_seconds = {bin_seconds}
health_seconds = {health_seconds}
{extra}
[broker]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.5
reconnect_max_s = 2

[[cameras]]
name = "table"
source = "{video}"
model = "{model}"
realtime = false
loop = false
{line_text}
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


class Agent:
    def __init__(self, config: Path, log: Path, env: dict | None = None) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def state_db(tmp_path: Path):
    """Read-only view of the agent's outbox database (closed on exit)."""
    path = tmp_path / "state" / "outbox.sqlite"
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5))


def agent_state(tmp_path: Path) -> dict:
    try:
        return _agent_state(tmp_path)
    except sqlite3.OperationalError:  # not created yet
        return {"lines": {}, "seq": 0, "pos": 0, "depth": 0, "unsent": 0}


def _agent_state(tmp_path: Path) -> dict:
    with state_db(tmp_path) as db:
        lines = db.execute("SELECT camera, line, class, n_in, n_out FROM line_totals").fetchall()
        seq = db.execute("SELECT last FROM sequences WHERE stream='counts'").fetchone()
        pos = db.execute("SELECT pos FROM positions WHERE camera='table'").fetchone()
        depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        unsent = db.execute("SELECT COUNT(*) FROM outbox WHERE due IS NULL").fetchone()[0]
    return {
        "lines": {(r[0], r[1], r[2]): (r[3], r[4]) for r in lines},
        "seq": seq[0] if seq else 0,
        "pos": pos[0] if pos else 0,
        "depth": depth,  # not confirmed (count bins: by the registry)
        "unsent": unsent,  # not acknowledged by the broker
    }


def registry_lines(device: str) -> dict:
    return {
        (r["camera"], r["line"], r["class"]): (r["in"], r["out"]) for r in totals(device)["lines"]
    }


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def last_beat(device: str) -> dict | None:
    row = (
        regdb.HealthBeat.select()
        .where(regdb.HealthBeat.device == device)
        .order_by(regdb.HealthBeat.seq.desc())
        .first()
    )
    return None if row is None else json.loads(row.payload)


def camera_stopped(device: str) -> bool:
    beat = last_beat(device)
    return beat is not None and beat["cameras"][0]["state"] == "stopped"


def bin_seqs(device: str) -> list[int]:
    return sorted(r.seq for r in regdb.CountBin.select().where(regdb.CountBin.device == device))


def conflicts() -> list[str]:
    return [d.reason for d in regdb.DeadLetter.select() if "different content" in d.reason]


@pytest.fixture
def registry(tmp_path, broker):
    worker = IngestWorker(
        tmp_path / "registry.sqlite", BrokerAddress(broker.host, broker.port), Topics()
    )
    assert worker.start(wait=10), "registry did not connect to the broker"
    yield worker
    worker.stop()


def test_broker_down_30s_while_counting_loses_nothing(
    tmp_path, broker, registry, person_clip, int8_model
):
    device = "outage-cam"
    config = write_config(tmp_path, broker, person_clip, int8_model, device=device)
    agent = Agent(config, tmp_path / "agent.log")
    try:
        wait_for(lambda: len(bin_seqs(device)) >= 1, 60, "the first bin")
        broker.stop()
        down_at = time.monotonic()
        # The agent keeps counting into its outbox while the broker is away.
        wait_for(lambda: agent_state(tmp_path)["depth"] >= 10, 30, "a backlog to build")
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        backlog = agent_state(tmp_path)["depth"]
        broker.start()
        wait_for(lambda: camera_stopped(device), 180, "the agent to finish the video")
        assert agent.terminate() == 0, agent.log()[-3000:]
    finally:
        agent.close()
    state = agent_state(tmp_path)
    assert state["depth"] == 0, "unacknowledged messages left in the outbox"
    assert backlog >= 10
    counted = {k: v for k, v in state["lines"].items() if v != (0, 0)}
    assert counted == CLEAN  # the whole video was counted, exactly like a clean run
    wait_for(lambda: registry_lines(device) == state["lines"], 30, "registry totals")
    assert bin_seqs(device) == list(range(1, state["seq"] + 1))  # no gaps, each once
    assert conflicts() == []
    dev = next(d for d in devices() if d["device"] == device)
    assert dev["gaps"] == 0 and dev["state"] == "offline"


def test_sigkill_resumes_from_the_persisted_frame(
    tmp_path, broker, registry, person_clip, int8_model
):
    device = "kill-cam"
    config = write_config(tmp_path, broker, person_clip, int8_model, device=device)
    first = Agent(config, tmp_path / "agent-1.log")
    try:
        # Frame 200 lies after the first person's crossings, before the second's.
        wait_for(lambda: agent_state(tmp_path)["pos"] >= 200, 120, "a part of the clip counted")
        first.kill()
    finally:
        first.close()
    at_kill = agent_state(tmp_path)
    assert 0 < at_kill["pos"] < PERSON_FRAMES

    second = Agent(config, tmp_path / "agent-2.log")
    try:
        wait_for(lambda: camera_stopped(device), 180, "the restarted agent to finish")
        assert second.terminate() == 0, second.log()[-3000:]
    finally:
        second.close()
    assert f"at frame {at_kill['pos']} of {PERSON_FRAMES}" in second.log()
    beat = last_beat(device)
    # The restarted agent read only the rest of the file.
    assert beat["cameras"][0]["frames"] == PERSON_FRAMES - at_kill["pos"]

    final = agent_state(tmp_path)
    assert final["depth"] == 0 and final["seq"] > at_kill["seq"]
    wait_for(lambda: registry_lines(device) == final["lines"], 30, "registry totals")
    assert bin_seqs(device) == list(range(1, final["seq"] + 1))  # seq continued, no reuse
    assert conflicts() == []  # no seq was ever sent with two different contents
    # Objects mid-crossing at the kill may be missed, nothing else.
    for key, (n_in, n_out) in CLEAN.items():
        got_in, got_out = final["lines"][key]
        assert 0 <= n_in - got_in <= 1 and 0 <= n_out - got_out <= 1, final["lines"]


class Subscriber:
    """A persistent-session MQTT client: keeps what arrives while the broker restarts."""

    def __init__(self, broker, topic: str, client_id: str = "sub") -> None:
        self.got: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{client_id}-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_outbox_cap_during_an_outage_keeps_counts_and_reports_drops(
    tmp_path, broker, registry, videos, int8_model
):
    device = "cap-cam"
    config = write_config(
        tmp_path,
        broker,
        videos / "traffic_frames.mp4",
        int8_model,
        device=device,
        health_seconds=0.2,
        lines={"gantry": ((480, 280), (480, 540))},
        extra="[outbox]\nmax_messages = 12\n",
    )
    events = Subscriber(broker, Topics().events(device))
    agent = Agent(config, tmp_path / "agent.log")
    try:
        wait_for(lambda: last_beat(device) is not None, 60, "the first beat")
        broker.stop()
        # ~5 beats and ~1 bin a second pile up; the cap keeps 12 messages.
        time.sleep(8)
        with state_db(tmp_path) as db:
            kinds = dict(db.execute("SELECT stream, COUNT(*) FROM outbox GROUP BY stream"))
            dropped = dict(db.execute("SELECT name, value FROM counters"))
        # The cap is applied once a second: at most a second of beats (5) and a bin over.
        assert sum(kinds.values()) <= 12 + 6, kinds
        assert dropped.get("dropped.health", 0) >= 10
        broker.start()
        wait_for(lambda: any(b"outbox_dropped" in p for _, p in events.got), 30, "the event")
        wait_for(
            lambda: (last_beat(device) or {}).get("outbox_dropped", 0) >= 10, 30, "health field"
        )
        assert agent.terminate() == 0, agent.log()[-3000:]
    finally:
        agent.close()
        events.close()
    state = agent_state(tmp_path)
    # Every count bin survived the cap and arrived exactly once.
    wait_for(lambda: bin_seqs(device) == list(range(1, state["seq"] + 1)), 20, "all bins")
    assert registry_lines(device) == state["lines"]
    event = next(parse_payload("events", p) for _, p in events.got if b"outbox_dropped" in p)
    assert event.severity == "warning" and event.data["stream"] == "health"
    assert event.data["n"] >= 1 and event.data["policy"] == "keep_counts"
    assert "outbox max_messages: dropped" in agent.log()


def test_systemd_notify_metrics_and_clean_sigterm(tmp_path, broker, videos, int8_model):
    device = "svc-cam"
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(1)
    metrics_port = free_port()
    config = write_config(
        tmp_path,
        broker,
        videos / "traffic_frames.mp4",
        int8_model,
        device=device,
        lines={"gantry": ((480, 280), (480, 540))},
        extra=f"drift_seconds = 1\n[metrics]\nport = {metrics_port}\n",
    )
    # A looping "camera" paced to the file's frame rate, like the demo's.
    text = config.read_text().replace("loop = false", "loop = true")
    config.write_text(text.replace("realtime = false", "realtime = true"))
    status = Subscriber(broker, Topics().status(device))
    drift = Subscriber(broker, Topics().drift(device), client_id="drift-sub")
    agent = Agent(
        config,
        tmp_path / "agent.log",
        env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1500000"},
    )
    got: list[str] = []

    def receive_until(text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(notify.recv(4096).decode())
            except TimeoutError:
                continue
            if any(text in m for m in got):
                return
        raise AssertionError(f"no {text} on the notify socket; got {got}")

    try:
        started = time.monotonic()
        receive_until("READY=1", 60)
        ready_s = time.monotonic() - started
        n_before = sum(m == "WATCHDOG=1" for m in got)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append(notify.recv(4096).decode())
        # WATCHDOG_USEC=1.5 s: a ping about every 0.5 s
        assert sum(m == "WATCHDOG=1" for m in got) >= n_before + 3, got

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read().decode()

        wait_for(lambda: 'flowfleet_agent_frames_total{camera="table"}' in scrape(), 30, "frames")
        wait_for(lambda: "flowfleet_agent_mqtt_connected 1.0" in scrape(), 30, "connected")
        wait_for(lambda: "flowfleet_agent_line_crossings_total{" in scrape(), 30, "line counter")
        text = scrape()
        for name in (
            "flowfleet_agent_uptime_seconds",
            "flowfleet_agent_build_info{",
            "flowfleet_agent_inference_seconds{",
            'flowfleet_agent_outbox_messages{stream="counts"}',
            "flowfleet_agent_mqtt_acknowledged_total",
            "flowfleet_agent_count_bins_total",
            'class="car",direction="in",line="gantry"',
            "flowfleet_agent_disk_free_bytes",
        ):
            assert name in text, name
        # Drift summaries: one per camera and window, fixed bins, no images.
        wait_for(lambda: drift.got, 10, "a drift summary")
        summary = parse_payload("drift", drift.got[0][1])
        assert summary.camera == "table" and summary.frames > 0
        assert sum(summary.confidence_hist) == summary.detections > 0
        assert sum(summary.detections_hist) == summary.frames
        assert summary.class_mix.get("car", 0) > 0 and summary.latency_ms_p50 > 0

        assert agent.terminate(timeout=20) == 0, agent.log()[-3000:]
        receive_until("STOPPING=1", 2)
    finally:
        agent.close()
        notify.close()
        drift.close()
    wait_for(lambda: any(b'"offline"' in p for _, p in status.got), 10, "offline status")
    offline = parse_payload("status", [p for _, p in status.got if b'"offline"' in p][-1])
    status.close()
    assert offline.ts is not None  # published by the agent itself, not the Last Will
    assert offline.hardware is None and offline.cameras is None
    # The online status says what the device is and what it counts (flowfleet.contract_device).
    online = parse_payload("status", next(p for _, p in status.got if b'"online"' in p))
    assert online.hardware.arch and online.hardware.python and online.hardware.runtimes
    assert "tflite" in online.hardware.runtimes
    (camera,) = online.cameras
    assert [(ln.name, ln.points) for ln in camera.lines] == [
        ("gantry", ((480.0, 280.0), (480.0, 540.0)))
    ]
    assert ready_s < 30
    # The open bin was flushed and the broker took it (no registry runs here to
    # confirm the count bins, so they stay in the outbox awaiting its ack).
    assert agent_state(tmp_path)["unsent"] == 0
