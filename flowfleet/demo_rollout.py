"""The demo's scripted rollout: a new model moves through the fleet, then is taken back.

Everything goes through the registry's REST API with the demo operator's token, as
an operator's own script would:

1. upload the next model version (the registry signs it);
2. start a staged rollout: a canary device first, then one wave per remaining device,
   each watched for ``soak_s`` seconds (health beats, no probation rollback, no
   drift alarm) before the next one moves;
3. once every device runs the new version, abort it, as an operator who does not
   like what they see would: the registry puts every device it moved back on the
   version it ran before (if the rollout aborts by itself first, say a device failed
   its health gate, that is the rollback shown instead);
4. wait until every device reports the previous version again and print the audit
   trail's story.

Each step is printed in plain words; the equivalent CLI commands are printed too.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ABORT_REASON = "demo: the operator wants the new model's counts checked first"

# How each device state of a rollout reads to an operator.
STATE_WORDS = {
    "moving": "told to run {new}; downloading it and checking its signature",
    "soaking": "now counting with {new}; watching it for {soak:g} s",
    "succeeded": "healthy on {new}",
    "failed": "failed on {new}",
    "rolled_back": "went back to its old model by itself (probation)",
    "timed_out": "did not report {new} in time",
    "drifted": "drift alarm on {new}",
    "reverted": "told to go back to {old}",
    "shadowing": "running {new} in shadow beside its current model",
}


class StoryError(RuntimeError):
    """The story could not go on (the registry refused a step, or time ran out)."""


@dataclass(frozen=True)
class StoryResult:
    """What happened: the rollout id, the new version, and how it ended."""

    rollout: int
    version: int
    state: str
    moved: tuple[str, ...]  # devices that reported running the new version
    back: tuple[str, ...]  # devices that reported the previous version again
    audit: tuple[str, ...]  # the rollout's audit actions, oldest first


class Api:
    """A tiny JSON client for the registry's REST API (bearer token)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict | None = None, *, raw=None, ctype=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", ctype or "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise StoryError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        return json.loads(text) if text else None

    def upload(self, model: str, path: Path, notes: str) -> dict:
        """Register ``path`` as a version of ``model`` (multipart, as curl -F does)."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="notes"\r\n\r\n{notes}\r\n',
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n',
        ]
        raw = "".join(parts).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return self.call(
            "POST",
            f"/api/models/{model}/versions",
            raw=raw,
            ctype=f"multipart/form-data; boundary={boundary}",
        )

    def running(self) -> dict[str, dict[str, tuple[str | None, int | None]]]:
        """What each device reports running: {device: {camera: (model, version)}}."""
        out: dict[str, dict[str, tuple[str | None, int | None]]] = {}
        for dev in self.call("GET", "/api/devices")["devices"]:
            cams = (dev.get("reported") or {}).get("cameras") or []
            out[dev["device"]] = {c["camera"]: (c["model"], c["version"]) for c in cams}
        return out


def wait_until(check: Callable[[], bool], timeout: float, stop: threading.Event, what: str):
    """Poll ``check`` twice a second until it is true; StoryError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if stop.is_set():
            raise StoryError("the demo is stopping")
        if time.monotonic() > deadline:
            raise StoryError(f"gave up after {timeout:.0f} s waiting until {what}")
        stop.wait(0.5)


def run_story(
    api: Api,
    *,
    model: str,
    model_file: Path,
    camera: str,
    canary: str,
    devices: list[str],
    groups: list[str],
    soak_s: float,
    say: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    timeout: float = 600.0,
    cli: str = "flowfleet registry",
) -> StoryResult:
    """Play the rollout story (see the module docstring) and return what happened."""
    stop = stop or threading.Event()
    before = api.running()
    old_versions = {d: before.get(d, {}).get(camera, (None, None))[1] for d in devices}
    old = f"{model} v{max((v for v in old_versions.values() if v), default=1)}"

    up = api.upload(model, model_file, "the demo's next model: float I/O, dynamic-range int8")
    version = up["version"]
    new = f"{model} v{version}"
    if up.get("created", True):
        say(f"[1/4] Uploaded {model_file.name} as {new}; the registry signed it with its key.")
    else:
        say(f"[1/4] {model_file.name} is registered already, as {new} (signed); using it.")
    say(f"      (CLI: {cli} models add {model_file} --name {model})")

    others = [d for d in devices if d != canary]
    plan = {
        "canary": {"devices": [canary]},
        "waves": max(len(others), 1),
        "soak_s": soak_s,
        "timeout_s": 300,
        "beat_timeout_s": 120,
    }
    body = {
        "model": model,
        "version": version,
        "camera": camera,
        "targets": {"groups": groups},
        "plan": plan,
        "reason": "demo: try the new model on the fleet",
    }
    r = api.call("POST", "/api/rollouts", body)
    rid = r["id"]
    rest = f", then {' and '.join(others)}, one per wave" if others else ""
    say(
        f"[2/4] Rollout {rid} started: {new} goes to the canary {canary} first{rest}. "
        f"Each device must report {new} running and stay healthy for {soak_s:g} s "
        "before the next one moves."
    )
    say(
        f"      (CLI: {cli} rollouts create {model} {version} --camera {camera} "
        f"--group {' --group '.join(groups)} --canary {canary} --waves {plan['waves']} "
        f"--soak {soak_s:g} --timeout 300 --beat-timeout 120; watch it: {cli} rollouts show {rid})"
    )

    seen: dict[str, str] = {}
    activated: set[str] = set()  # devices the rollout saw report the new version active
    state = {"rollout": "running", "devices": {}}

    def poll() -> dict:
        got = api.call("GET", f"/api/rollouts/{rid}")
        for wave in got["waves"]:
            for dev in wave["devices"]:
                name, st = dev["device"], dev["state"]
                if seen.get(name) != st and st in STATE_WORDS:
                    words = STATE_WORDS[st].format(new=new, old=old, soak=soak_s)
                    why = f" ({dev['reason']})" if dev.get("reason") and st != "soaking" else ""
                    say(f"      {name}: {words}{why}")
                seen[name] = st
                if dev.get("activated_at") is not None:
                    activated.add(name)
                if dev.get("previous"):
                    old_versions[name] = dev["previous"]["version"]
        if got["state"] != state["rollout"]:
            say(f"      rollout {rid} is now {got['state']}")
        state["rollout"] = got["state"]
        state["devices"] = seen
        return got

    def all_moved_or_over() -> bool:
        got = poll()
        if got["state"] not in ("running", "paused"):
            return True
        # Every device moved and judged or being judged (a failed one is put back
        # at once by the registry; the others go on).
        waiting = ("pending", "moving", "shadowing")
        return len(seen) == len(devices) and not any(s in waiting for s in seen.values())

    wait_until(all_moved_or_over, timeout, stop, f"every device runs {new}")
    if state["rollout"] in ("running", "paused"):
        running_new = sum(1 for s in seen.values() if s in ("soaking", "succeeded"))
        say(
            f"[3/4] {running_new} of {len(devices)} devices now count with {new}. The demo "
            f"plays the operator who wants to check its counts first: abort. The registry "
            f"puts every device the rollout moved back on {old}."
        )
        say(f'      (CLI: {cli} rollouts abort {rid} --reason "...")')
        try:
            api.call("POST", f"/api/rollouts/{rid}/abort", {"reason": ABORT_REASON})
        except StoryError as exc:  # it finished between the look and the abort
            say(f"      the abort came too late: {exc}")
    else:
        say(f"[3/4] The rollout stopped by itself ({state['rollout']}); the registry rolls back.")

    def settled() -> bool:
        got = poll()
        return got["state"] in ("aborted", "succeeded")

    wait_until(settled, timeout, stop, f"rollout {rid} finished rolling back")
    moved = tuple(sorted(activated))
    entries = api.call("GET", f"/api/audit?target=rollout:{rid}&limit=100")["entries"]
    actions = tuple(e["action"] for e in sorted(entries, key=lambda e: (e["ts"], e["id"])))
    if state["rollout"] == "succeeded":
        say(
            f"[4/4] The rollout succeeded before it could be aborted: the fleet runs {new}. "
            f"The audit trail of rollout {rid}: {', '.join(actions)}."
        )
        return StoryResult(rid, version, state["rollout"], moved, (), actions)

    def all_back() -> bool:
        now = api.running()
        return all(now.get(d, {}).get(camera, (None, None))[1] == old_versions[d] for d in moved)

    wait_until(all_back, timeout, stop, f"the moved devices report {old} again")
    back = moved
    say(
        f"[4/4] Done: {len(moved)} device(s) ran {new} and are back on {old}. "
        f"The audit trail of rollout {rid}: {', '.join(actions)}."
    )
    say(f"      (CLI: {cli} models audit --target rollout:{rid}; per device: --target device:ID)")
    return StoryResult(rid, version, state["rollout"], moved, back, actions)
