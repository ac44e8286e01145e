"""`flowfleet demo` shows the whole loop, with real processes.

One demo run (broker, registry, three agents on the sample videos) is checked for:
counts rise on the people cameras; the devices are on the map (locations) and in
groups; the sign-in it prints works; its agents take the registry's signed model;
the scripted rollout sends a really worse version to the canary, the drift judge
takes it back by itself, the rollout aborts and no other device moves, visible in
the audit trail and the device events; Ctrl-C stops everything.

The test waits on the conditions it checks, with generous deadlines, never on the
story's timing: on a loaded machine an agent may infer one frame a second.
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


def wait_for(check, timeout: float, what: str, proc, out: Output):
    """Poll ``check`` every second until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; the demo's output:\n{out.text()[-4000:]}")


def activations(base: str, token: str, device: str) -> list:
    """The versions a device's agent reported activating, oldest first."""
    events = get(base + f"/api/events?device={device}&limit=200", token)["events"]
    return [e["data"].get("version") for e in reversed(events) if e["type"] == "model_activated"]


@pytest.mark.timeout(1200)
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
            # Long: the drift judge ends the canary's soak (on a loaded machine it may
            # need a few minutes); the rollout never soaks that long.
            "--soak",
            "600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        base = f"http://127.0.0.1:{port}"
        login = out.wait_for(r"sign in as (\S+) / (\S+) \(operator", 120, proc)
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

        # Counts rise, on the lobby and the plaza at least (whatever the story does).
        seen: list[int] = []

        def counting() -> bool:
            lines = get(base + "/api/totals")["lines"]
            total = sum(r["in"] + r["out"] for r in lines)
            if total:
                seen.append(total)
            cams = {r["device"] for r in lines if r["in"] + r["out"]}
            return bool(seen) and {"demo-lobby", "demo-plaza"} <= cams and seen[-1] > seen[0]

        wait_for(counting, 600, f"the lobby and the plaza to count (totals {seen})", proc, out)

        # The story: the canary takes v2, the drift judge takes it back by itself.
        out.wait_for(r"\[4/4\] Done: demo-plaza ran yolov8n v2", 900, proc)
        text = out.text()
        assert "The drift judge found yolov8n v2 worse on demo-plaza" in text, text[-4000:]
        assert "drift verdicts --device demo-plaza --camera main" in text  # the evidence

        rollout = get(base + "/api/rollouts/1", token)
        assert rollout["state"] == "aborted", rollout
        assert rollout["reason"].startswith("canary failed"), rollout
        assert [w["canary"] for w in rollout["waves"]] == [True, False, False]
        rows = {d["device"]: d for w in rollout["waves"] for d in w["devices"]}
        assert set(rows) == DEVICES
        canary = rows.pop("demo-plaza")
        assert canary["activated_at"] and canary["state"] == "drifted", canary
        assert "drift alarm by drift-judge" in canary["reason"], canary
        assert all(d["activated_at"] is None for d in rows.values()), rows  # nobody else

        audit = get(base + "/api/audit?target=device:demo-plaza/camera:main&limit=100", token)
        (rollback,) = [e for e in audit["entries"] if e["action"] == "drift.rollback"]
        assert rollback["actor"] == "drift-judge", rollback
        details = rollback["details"]
        assert (details["version"], details["previous_version"]) == (2, 1), details
        assert "dpf_log_ratio" in details["breaches"], details
        entries = get(base + "/api/audit?target=rollout:1", token)["entries"]
        actions = {e["action"] for e in entries}
        assert {"rollout.create", "rollout.abort", "rollout.aborted"} <= actions, actions
        # Nobody aborted it by hand: the rollout job did, on the canary's drift.
        aborts = [e for e in entries if e["action"].startswith("rollout.abort")]
        assert {e["actor"] for e in aborts} == {"rollout-job"}, aborts

        # Every device runs v1 again; only the canary's agent ever ran v2.
        def all_on_v1():
            now = get(base + "/api/devices", token)["devices"]
            return all(
                [(c["camera"], c["model"], c["version"]) for c in d["reported"]["cameras"]]
                == [("main", "yolov8n", 1)]
                for d in now
            )

        wait_for(all_on_v1, 120, "every device to report yolov8n v1", proc, out)
        for d in get(base + "/api/devices", token)["devices"]:
            assert d["state"] == "online" and d["gaps"] == 0, d
        wait_for(
            lambda: activations(base, token, "demo-plaza")[-3:] == [1, 2, 1],
            120,
            "the canary's events: v1, v2, v1",
            proc,
            out,
        )
        for device in DEVICES - {"demo-plaza"}:
            got = activations(base, token, device)
            assert 1 in got and 2 not in got, (device, got)
        print(out.text())  # the story as a user sees it (pytest -s)
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
