"""`flowfleet demo` brings up broker, registry and agents; counts rise; it stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from flowfleet.provisioning.mosquitto import free_port

pytestmark = pytest.mark.slow


def get(url: str):
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def test_demo_counts_rise_and_ctrl_c_stops_everything(tmp_path, data):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowfleet.cli",
            "demo",
            "--workdir",
            str(tmp_path),
            "--http-port",
            str(port),
            "--bin-seconds",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        seen: list[int] = []
        devices = []
        while time.monotonic() < deadline:
            try:
                lines = get(base + "/api/totals")["lines"]
                devices = get(base + "/api/devices")["devices"]
            except OSError:
                time.sleep(0.5)
                continue
            total = sum(r["in"] + r["out"] for r in lines)
            if total:
                seen.append(total)
            if len(seen) >= 2 and seen[-1] > seen[0] and len(devices) == 3:
                break
            time.sleep(1)
        assert {d["device"] for d in devices} == {"demo-parking", "demo-lobby", "demo-highway"}
        assert all(d["state"] == "online" and d["gaps"] == 0 for d in devices)
        assert len(seen) >= 2 and seen[-1] > seen[0], f"counts did not rise: {seen}"
        with urllib.request.urlopen(base + "/", timeout=2) as resp:
            assert "demo-lobby" in resp.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"open http://127.0.0.1:{port}/" in out
    assert "demo stopped" in out
    # Everything it started is gone: nothing answers on the registry port any more.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
