"""The demo's scripted rollout: a really worse model goes out and the registry takes it back.

Everything goes through the registry's REST API with the demo operator's token, as
an operator's own script would:

1. wait until the drift judge has a baseline: ``baseline_windows`` drift windows of
   the model the canary runs now; then upload the next version (the registry signs
   it). In the demo that version is the same network with its input scaling broken
   (`flowfleet.model_variants`): it loads and passes the agent's health gate and
   probation, but finds almost nothing;
2. start a staged rollout: the canary first, then one wave per remaining device,
   each watched for ``soak_s`` seconds (health beats, no probation rollback, no
   drift alarm) before the next one moves;
3. nobody intervenes: the drift judge compares the canary's windows on the new
   version with the baseline, confirms the drift (k of n windows) and deploys the
   previous version again; the rollout counts the canary as drifted and aborts, so
   no other device is moved;
4. wait until the canary reports the previous version again and print the evidence
   (the judge's statistics) and the audit trail's story.

Each step is printed in plain words, with the equivalent CLI commands.
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

# How each device state of a rollout reads to an operator.
STATE_WORDS = {
    "moving": "told to run {new}; downloading it and checking its signature",
    "soaking": "now counting with {new}; watching it for {soak:g} s",
    "succeeded": "healthy on {new}",
    "failed": "failed on {new}",
    "rolled_back": "went back to its old model by itself (probation)",
    "timed_out": "did not report {new} in time",
    "drifted": "the drift judge found {new} worse than {old} and put it back on {old}",
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
    evidence: dict | None = None  # the drift judge's rollback details (its audit entry)


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


def _percent(change) -> str:
    return "?" if change is None else f"{change:+.0%}"


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
    baseline_windows: int = 5,
    min_detections: int = 1,
    say: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    timeout: float = 600.0,
    cli: str = "flowfleet registry",
) -> StoryResult:
    """Play the rollout story (see the module docstring) and return what happened."""
    stop = stop or threading.Event()
    before = api.running()
    old_versions = {d: before.get(d, {}).get(camera, (None, None))[1] for d in devices}
    old_v = old_versions.get(canary) or max((v for v in old_versions.values() if v), default=1)
    old = f"{model} v{old_v}"
    # The agents name a registry model's file "<model>-v<version>-<file>" in their windows.
    prefix = f"{model}-v{old_v}-"
    base: dict = {}

    def has_baseline() -> bool:
        got = api.call(
            "GET", f"/api/drift?device={canary}&camera={camera}&limit={4 * baseline_windows}"
        )["drift"]
        mine = [w for w in got if str(w.get("model") or "").startswith(prefix)]
        mine = mine[:baseline_windows]
        base.update(
            windows=len(mine),
            detections=sum(w["detections"] for w in mine),
            frames=sum(w["frames"] for w in mine),
        )
        return len(mine) >= baseline_windows and base["detections"] >= min_detections

    wait_until(has_baseline, timeout, stop, f"{canary} sent {baseline_windows} drift windows")
    say(
        f"[1/4] The drift judge has its baseline: {base['windows']} windows of {old} on "
        f"{canary}, {base['detections']} detections in {base['frames']} frames."
    )
    up = api.upload(model, model_file, "the demo's bad release: input scaling broken")
    version = up["version"]
    new = f"{model} v{version}"
    how = "Uploaded" if up.get("created", True) else "Registered already:"
    say(
        f"      {how} {model_file.name} as {new}, signed by the registry. It is {old} "
        "with its input scaling broken, as a faulty export makes it: it loads and passes "
        "the agent's own checks, but sees almost nothing."
    )
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
    rid = api.call("POST", "/api/rollouts", body)["id"]
    rest = f", then {' and '.join(others)}, one per wave" if others else ""
    say(
        f"[2/4] Rollout {rid} started: {new} goes to the canary {canary} first{rest}. "
        f"Each device must run {new} healthy, with no drift alarm, for {soak_s:g} s "
        f"before the next one moves. Nobody steps in: the drift judge compares "
        f"{canary}'s windows on {new} with the baseline."
    )
    say(
        f"      (CLI: {cli} rollouts create {model} {version} --camera {camera} "
        f"--group {' --group '.join(groups)} --canary {canary} --waves {plan['waves']} "
        f"--soak {soak_s:g} --timeout 300 --beat-timeout 120; watch it: {cli} rollouts show {rid})"
    )

    seen: dict[str, str] = {}
    activated: set[str] = set()  # devices the rollout saw report the new version active
    state = {"rollout": "running", "reason": None}

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
        state["rollout"], state["reason"] = got["state"], got.get("reason")
        return got

    # The rollout ends by itself: aborted (a gate failed, say the canary drifted) or
    # succeeded (every wave soaked clean).
    wait_until(
        lambda: poll()["state"] in ("aborted", "succeeded"),
        timeout,
        stop,
        f"rollout {rid} ended",
    )
    moved = tuple(sorted(activated))
    evidence = None
    target = f"device:{canary}/camera:{camera}"
    for e in api.call("GET", f"/api/audit?target={target}&limit=100")["entries"]:
        if e["action"] == "drift.rollback" and e["details"].get("version") == version:
            evidence = e["details"]
            break  # newest first
    look = (
        f"      (the evidence: {cli} drift verdicts --device {canary} --camera {camera}; "
        f"{cli} models audit --target {target})"
    )
    if state["rollout"] == "succeeded":
        kept = sorted(d for d, st in seen.items() if st == "succeeded")
        say(
            f"[3/4] The rollout succeeded: the drift judge did not confirm drift on {canary} "
            f"within the {soak_s:g} s soak; {', '.join(kept) or 'no device'} kept {new}."
        )
        say(look)
        return StoryResult(rid, version, "succeeded", moved, (), _actions(api, rid), evidence)
    if evidence is not None:
        stats = evidence.get("statistics") or {}
        say(
            f"[3/4] The drift judge found {new} worse on {canary}: "
            f"{stats.get('detections', '?')} detections in {stats.get('frames', '?')} frames, "
            f"{_percent(stats.get('dpf_change'))} detections per frame against {old}'s "
            f"baseline (breached: {', '.join(evidence.get('breaches') or ())}; drift in "
            f"{evidence['k']} of the last {evidence['n']} windows). It deployed {old} again by "
            f"itself; the rollout counted the canary as drifted and aborted "
            f"({state['reason']}). No other device was moved."
        )
    else:
        say(f"[3/4] The rollout aborted by itself: {state['reason']}.")
    say(look)

    def all_back() -> bool:
        now = api.running()
        return all(now.get(d, {}).get(camera, (None, None))[1] == old_versions[d] for d in moved)

    wait_until(all_back, timeout, stop, f"the moved devices report {old} again")
    actions = _actions(api, rid)
    untouched = len(devices) - len(moved)
    say(
        f"[4/4] Done: {', '.join(moved) or 'no device'} ran {new} and counts with {old} "
        f"again; {untouched} other device(s) never left {old}. The audit trail of rollout "
        f"{rid}: {', '.join(actions)}."
    )
    say(f"      (CLI: {cli} models audit --target rollout:{rid})")
    return StoryResult(rid, version, state["rollout"], moved, moved, actions, evidence)


def _actions(api: Api, rid: int) -> tuple[str, ...]:
    """The rollout's audit actions, oldest first."""
    entries = api.call("GET", f"/api/audit?target=rollout:{rid}&limit=100")["entries"]
    return tuple(e["action"] for e in sorted(entries, key=lambda e: (e["ts"], e["id"])))
