"""End to end: a real agent process counts a video; the registry stores what it sent.

Real Mosquitto (generated config, free port), a real `flowfleet agent` process with
the real int8 detector, the real registry ingest worker on a real SQLite file.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.http.web import devices, totals
from flowfleet.registry.store import db as regdb
from tests.factories import PERSON_CLIP_COUNTS, PERSON_CLIP_FRAMES

pytestmark = pytest.mark.slow

DEVICE = "e2e-lobby"
LINES = {"approach": ((768, 415), (0, 415)), "leave": ((620, 300), (620, 432))}


def agent_config(tmp_path: Path, broker, video: Path, model: Path) -> Path:
    lines = "".join(
        f'\n[[cameras.lines]]\nname = "{n}"\npoints = [[{a[0]}, {a[1]}], [{b[0]}, {b[1]}]]\n'
        for n, (a, b) in LINES.items()
    )
    text = f"""
device_id = "{DEVICE}"
state_dir = "{tmp_path / "agent-state"}"
bin_seconds = 2
health_seconds = 2

[broker]
host = "{broker.host}"
port = {broker.port}

[[cameras]]
name = "table"
source = "{video}"
model = "{model}"
realtime = false
loop = false
{lines}
[[cameras.zones]]
name = "table"
points = [[300, 300], [640, 300], [640, 432], [300, 432]]
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def agent_line_totals(state_dir: Path) -> dict[tuple[str, str, str], tuple[int, int]]:
    with sqlite3.connect(state_dir / "outbox.sqlite") as db:
        rows = db.execute("SELECT camera, line, class, n_in, n_out FROM line_totals").fetchall()
        depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert depth == 0, "the agent stopped with unacknowledged messages"
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}


def registry_line_totals(device: str) -> dict[tuple[str, str, str], tuple[int, int]]:
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


def test_agent_counts_land_in_the_registry_exactly(tmp_path, broker, person_clip, int8_model):
    worker = IngestWorker(
        tmp_path / "registry.sqlite", BrokerAddress(broker.host, broker.port), Topics()
    )
    assert worker.start(wait=10), "registry did not connect to the broker"
    try:
        config = agent_config(tmp_path, broker, person_clip, int8_model)
        log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen(
            [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # The camera reads the file once at full speed; wait until its health beat
            # says it stopped, then stop the agent (SIGTERM flushes the open bin).
            def camera_done() -> bool:
                row = regdb.HealthBeat.select().order_by(regdb.HealthBeat.seq.desc()).first()
                return row is not None and '"state":"stopped"' in row.payload.replace(" ", "")

            wait_for(camera_done, 180, "the agent to finish the video")
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        finally:
            if agent.poll() is None:
                agent.kill()
            log.close()

        expected = agent_line_totals(tmp_path / "agent-state")
        # The clip has two people walking up to the table and leaving to the right.
        assert {k: v for k, v in expected.items() if v != (0, 0)} == PERSON_CLIP_COUNTS

        wait_for(lambda: registry_line_totals(DEVICE) == expected, 20, "registry totals")
        dev = next(d for d in devices() if d["device"] == DEVICE)
        assert dev["gaps"] == 0 and dev["bins"] == dev["highest_seq"] >= 2
        assert dev["state"] == "offline"  # clean shutdown publishes offline
        zone = next(z for z in totals(DEVICE)["zones"] if z["class"] == "person")
        assert zone["entries"] == 2 and zone["exits"] == 2 and zone["peak_occupancy"] == 1

        # Redeliver every stored bin (as a reconnecting agent would): stored once.
        before = worker.outcomes["stored"]
        payloads = [row.payload for row in regdb.CountBin.select()]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect(broker.host, broker.port)
        client.loop_start()
        for p in payloads:
            client.publish(Topics().counts(DEVICE), p, qos=1).wait_for_publish(5)
        client.publish(Topics().counts(DEVICE), b"{not json", qos=1).wait_for_publish(5)
        wait_for(
            lambda: (
                worker.outcomes["duplicate"] >= len(payloads)
                and worker.outcomes["dead-letter"] >= 1
            ),
            20,
            "duplicates and the dead letter",
        )
        client.loop_stop()
        client.disconnect()
        assert worker.outcomes["stored"] == before
        assert registry_line_totals(DEVICE) == expected
        assert (
            "not JSON"
            in regdb.DeadLetter.select().order_by(regdb.DeadLetter.id.desc()).first().reason
        )
    finally:
        worker.stop()


def count_json(source: Path, model: Path) -> dict:
    """`flowfleet count --json` of ``source`` with the demo's lines and table zone."""
    args = [sys.executable, "-m", "flowfleet.cli", "count", str(source), "--model", str(model)]
    args += ["--json", "--zone", "table:300,300;640,300;640,432;300,432"]
    for name, (a, b) in LINES.items():
        args += ["--line", f"{name}:{a[0]},{a[1]},{b[0]},{b[1]}"]
    return json.loads(subprocess.run(args, capture_output=True, check=True).stdout)


def test_count_json_matches_the_agent_pipeline(videos, person_clip, int8_model):
    """`flowfleet count --json` is sane on the whole person video, and on the clip's
    frames it counts exactly what the agent processes count (the other tests here and
    in test_agent_process), so the offline count and the agent run one pipeline."""
    report = count_json(videos / "one-by-one-person-detection.mp4", int8_model)
    assert report["frames"] == 1394
    assert report["lines"]["approach"]["total"] == {"in": 6, "out": 0}
    assert report["lines"]["leave"]["total"] == {"in": 0, "out": 6}
    table = report["zones"]["table"]["classes"]["person"]
    assert table["entries"] == 6 and table["peak_occupancy"] == 1
    assert 5 < table["mean_dwell_s"] < 30
    # People in this video score high; the tracker keeps a subset of the detections.
    scores = report["scores"]
    assert 0 < scores["tracked"]["n"] <= scores["detections"]["n"]
    for s in scores.values():
        assert 0.1 <= s["p10"] <= s["p50"] <= s["p90"] <= 1.0
    assert scores["tracked"]["p50"] >= 0.6

    clip = count_json(person_clip, int8_model)
    assert clip["frames"] == PERSON_CLIP_FRAMES
    counted = {
        ("table", line, "person"): (c["total"]["in"], c["total"]["out"])
        for line, c in clip["lines"].items()
        if (c["total"]["in"], c["total"]["out"]) != (0, 0)
    }
    assert counted == PERSON_CLIP_COUNTS
