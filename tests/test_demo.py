"""`flowfleet demo` shows the whole loop, with real processes.

One demo run (broker, registry, three agents on the sample videos) is checked for:
counts rise on every camera; the devices are on the map (locations) and in groups;
the sign-in it prints works; its agents take the registry's signed model; the
scripted rollout moves a new version through the fleet (every agent reports it
active) and the abort puts every device back, visible in the audit trail and the
device events; Ctrl-C stops everything.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from flowfleet.provisioning.mosquitto import free_port
from flowfleet.registry.http.access import CSRF_FIELD
from flowfleet.registry.http.websession import LOGIN_CSRF_COOKIE

pytestmark = pytest.mark.slow

DEVICES = {"demo-parking", "demo-lobby", "demo-plaza"}


def get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


class Output:
    """The demo's stdout, read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, proc) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in the demo's output:\n{self.text()[-4000:]}")


def login_form(base: str) -> tuple[urllib.request.OpenerDirector, dict]:
    """A browser-like opener that fetched the login form, and the form's CSRF field."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(base + "/login", timeout=5):
        pass
    # The login form's CSRF token is a double-submit cookie: the form carries its value.
    (cookie,) = [c for c in jar if c.name == LOGIN_CSRF_COOKIE]
    return opener, {CSRF_FIELD: cookie.value}


def sign_in(base: str, user: str, password: str) -> urllib.request.OpenerDirector:
    """Sign in through the login form as a browser does; returns the session's opener."""
    opener, form = login_form(base)
    form.update({"username": user, "password": password, "next": "/models"})
    with opener.open(base + "/login", data=urllib.parse.urlencode(form).encode(), timeout=5) as r:
        assert r.status == 200 and r.url.endswith("/models"), r.url
    return opener


def test_demo_shows_the_whole_loop_and_ctrl_c_stops_everything(tmp_path, data):
    port = free_port()
    started = time.monotonic()
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
            "--rollout-delay",
            "0",
            "--soak",
            "7",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        base = f"http://127.0.0.1:{port}"
        login = out.wait_for(r"sign in as (\S+) / (\S+) \(operator", 60, proc)
        user, password = login.group(1), login.group(2)
        token = (tmp_path / "operator.token").read_text().strip()

        # Sign-in: the printed user and password open a web session.
        opener = sign_in(base, user, password)
        with opener.open(base + "/models", timeout=5) as resp:
            page = resp.read().decode()
        assert "yolov8n" in page  # the sample models are registered
        other, form = login_form(base)
        form.update({"username": user, "password": "not-the-password"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            other.open(base + "/login", data=urllib.parse.urlencode(form).encode(), timeout=5)
        assert refused.value.code == 401

        # Devices are records with a location (the map) and groups.
        devices = {d["device"]: d for d in get(base + "/api/devices", token)["devices"]}
        assert set(devices) == DEVICES
        for d in devices.values():
            assert d["location"] and 51 < d["location"]["latitude"] < 52, d
            assert d["name"] and d["site"] == "demo-city"
        groups = {g["name"]: g for g in get(base + "/api/groups", token)["groups"]}
        assert set(groups) == {"indoor", "outdoor"}

        # Counts rise while the rollout plays.
        seen: list[int] = []
        cameras_counting: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lines = get(base + "/api/totals")["lines"]
            total = sum(r["in"] + r["out"] for r in lines)
            cameras_counting = {r["device"] for r in lines if r["in"] + r["out"]}
            if total:
                seen.append(total)
            if "[4/4] Done" in out.text() and len(seen) >= 2 and seen[-1] > seen[0]:
                break
            time.sleep(1)
        assert len(seen) >= 2 and seen[-1] > seen[0], f"counts did not rise: {seen}"
        assert {"demo-lobby", "demo-plaza"} <= cameras_counting, lines
        out.wait_for(r"\[4/4\] Done: 3 device\(s\) ran yolov8n v2", 5, proc)

        # The rollout moved every device to v2 and the abort put each back on v1.
        rollout = get(base + "/api/rollouts/1", token)
        assert rollout["state"] == "aborted", rollout
        moved = [d for w in rollout["waves"] for d in w["devices"]]
        assert {d["device"] for d in moved} == DEVICES
        assert all(d["activated_at"] and d["state"] == "reverted" for d in moved), moved
        assert [w["canary"] for w in rollout["waves"]] == [True, False, False]
        devices = get(base + "/api/devices", token)["devices"]
        for d in devices:
            assert d["state"] == "online" and d["gaps"] == 0, d
            (cam,) = d["reported"]["cameras"]
            assert (cam["camera"], cam["model"], cam["version"]) == ("main", "yolov8n", 1), d
        for device in DEVICES:  # the agents' own story: v1, then v2, then v1 again
            activated: list = []
            deadline = time.monotonic() + 15  # events travel through the outbox
            while activated[-3:] != [1, 2, 1] and time.monotonic() < deadline:
                events = get(base + f"/api/events?device={device}&limit=200", token)["events"]
                activated = [
                    e["data"].get("version")
                    for e in reversed(events)
                    if e["type"] == "model_activated"
                ]
                time.sleep(0.3)
            assert activated[-3:] == [1, 2, 1], (device, activated)
        audit = get(base + "/api/audit?target=rollout:1&limit=100", token)["entries"]
        actions = {e["action"] for e in audit}
        assert {"rollout.create", "rollout.abort", "rollout.aborted"} <= actions, actions
        reverts = get(base + "/api/audit?target=device:demo-plaza&limit=100", token)["entries"]
        assert any(
            e["action"] == "deployment.set"
            and e["actor"] == "rollout:1"
            and e["details"]["version"] == 1
            for e in reverts
        ), reverts
        print(f"demo loop checked in {time.monotonic() - started:.1f} s")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        out.thread.join(5)
    text = out.text()
    assert proc.returncode == 0, text[-3000:]
    assert f"open http://127.0.0.1:{port}/" in text
    assert "demo stopped" in text
    # Everything it started is gone: nothing answers on the registry port any more.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
