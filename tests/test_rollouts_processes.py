"""Two registry processes on one database step one rollout: each device moves once.

Two `flowfleet registry` processes (the service, as systemd runs it) share one
database, SQLite and then PostgreSQL, and a real Mosquitto; both run the rollout job.
Eight simulated devices (tests/simdevices.py: the agent's MQTT client code and the
contract's payloads) report their activations and beat. A rollout moves them in a
canary and three waves. The lease `rollouts` lets one process step it; once the first
wave is under way the test kills the holder (SIGKILL: no clean stop, the lease is
not given up), and the other process takes the lease over when it expires and
finishes the rollout. Every device is moved exactly once: one `rollout.move`, one
desired state naming the new version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flowfleet.mqtt import BrokerAddress
from flowfleet.provisioning.mosquitto import free_port
from flowfleet.registry.fleet.rollout_job import LEASE, holder_pid
from flowfleet.registry.fleet.rollouts import create_rollout
from flowfleet.registry.store import leases
from flowfleet.registry.store.db import AuditEntry, Deployment
from flowfleet.registry.store.rollout_tables import Rollout
from tests.simdevices import start_fleet, stop_fleet

pytestmark = pytest.mark.slow

MODEL = "yolo"
FILES = ("yolov8n_full_integer_quant.tflite", "yolov8n_int8_dynamic.tflite")  # v1, v2
CAMERA = "front"
DEVICES = [f"proc-{i:02d}" for i in range(8)]
LEASE_S = 2.0


def wait_for(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    tails = "".join(f"\n{p.name}:\n{p.read_text()[-2000:]}" for p in logs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tails}")


def registry_toml(tmp_path: Path, name: str, db_url: str, broker) -> Path:
    text = f"""
[database]
url = "{db_url}"

[storage]
artifacts = "{tmp_path / "artifacts"}"
key_dir = "{tmp_path / "keys"}"

[broker]
host = "{broker.host}"
port = {broker.port}
client_id = "registry-{name}"

[http]
port = {free_port()}
threads = 2

[counts]
raw_retention_days = 0

[drift]
enabled = false

[webhooks]
enabled = false

[rollouts]
tick_s = 0.3
lease_s = {LEASE_S}
"""
    path = tmp_path / f"registry-{name}.toml"
    path.write_text(text)
    return path


def start_registry(tmp_path: Path, name: str, config: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"registry-{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "FLOWFLEET_DATABASE_URL"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowfleet.cli", "registry", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return proc, log


def test_two_registry_processes_move_each_device_once_and_the_survivor_takes_over(
    tmp_path, broker, db_url, registry, data
):
    for f in FILES:
        registry.add_version(data / "models" / f, name=MODEL, filename=f, actor="test")
    for device in DEVICES:  # every camera runs v1 from the registry first
        registry.deploy(device, CAMERA, MODEL, 1, actor="test")
    fleet = start_fleet(BrokerAddress(broker.host, broker.port), DEVICES)
    procs: dict[int, tuple[subprocess.Popen, Path]] = {}
    try:
        for name in ("a", "b"):
            proc, log = start_registry(
                tmp_path, name, registry_toml(tmp_path, name, db_url, broker)
            )
            procs[proc.pid] = (proc, log)
        logs = [log for _, log in procs.values()]
        wait_for(
            lambda: all("registry web UI at" in log.read_text() for log in logs),
            40,
            "both registries to start",
            logs,
        )
        wait_for(
            lambda: all(sim.running == (MODEL, 1) for sim in fleet),
            20,
            "the devices to run v1",
            logs,
        )
        rid = create_rollout(
            registry,
            model=MODEL,
            ref=2,
            camera=CAMERA,
            targets={"devices": DEVICES},
            plan={
                "canary": {"count": 1},
                "waves": 3,
                "soak_s": 0.8,
                "timeout_s": 20.0,
                "beat_timeout_s": 5.0,
                "seed": 16,
            },
            actor="test",
        )["id"]

        def holder() -> int | None:
            held = leases.holder_of(LEASE)
            return holder_pid(held["holder"]) if held and held["held"] else None

        first = wait_for(holder, 20, "a registry to take the lease", logs)
        assert first in procs, f"the lease names pid {first}, not one of {sorted(procs)}"
        wait_for(
            lambda: Rollout.get_by_id(rid).wave >= 1,
            30,
            "the rollout to open its first wave",
            logs,
        )
        # Kill the holder mid-rollout, as a crash would: the lease is not given up.
        os.kill(first, signal.SIGKILL)
        procs[first][0].wait(10)
        killed_ts = time.time()
        (survivor,) = [pid for pid in procs if pid != first]
        killed_at = time.monotonic()
        assert wait_for(lambda: holder() == survivor, 20, "the survivor to take over", logs)
        took_over_s = time.monotonic() - killed_at
        done = wait_for(
            lambda: Rollout.get_by_id(rid).state in ("succeeded", "aborted"),
            40,
            "the rollout to finish",
            logs,
        )
        assert done
        r = Rollout.get_by_id(rid)
        assert r.state == "succeeded", r.reason
        # The survivor waited for the dead holder's lease to expire, no longer.
        assert took_over_s <= LEASE_S + 5.0, took_over_s

        moves = Counter(
            e.target
            for e in AuditEntry.select().where(
                (AuditEntry.action == "rollout.move") & AuditEntry.target.startswith("device:")
            )
        )
        assert moves == {f"device:{d}/camera:{CAMERA}": 1 for d in DEVICES}
        times = [e.ts for e in AuditEntry.select().where(AuditEntry.action == "rollout.move")]
        after = sum(1 for ts in times if ts > killed_ts)
        assert 0 < after < len(DEVICES), "the survivor moved the waves left, and only those"
        for sim in fleet:  # one desired state for v1, one for v2: never moved twice
            assert sim.versions_sent(MODEL) == [1, 2], (sim.device, sim.versions_sent(MODEL))
            assert sim.running == (MODEL, 2)
        assert {d.version for d in Deployment.select()} == {2}
        survivor_proc, survivor_log = procs[survivor]
        survivor_proc.send_signal(signal.SIGTERM)
        assert survivor_proc.wait(30) == 0, survivor_log.read_text()[-3000:]
        assert leases.holder_of(LEASE)["held"] is False  # a clean stop gives it up
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stop_fleet(fleet)
