"""Is a device that a rollout moved doing well? The facts and the gates.

`gather` reads, for many devices at once, what the registry knows about them: the
reported state of the rollout's camera (and which desired-state version the device
had applied when it reported), the newest health beat, and drift alarms (audit
entries ``drift.rollback`` with target ``device:<id>/camera:<camera>``, written by the
drift judge) since the device moved. `judge` turns them into the device's next
state. "Sent" is never success: only a reported state that shows the model active,
after the device applied the desired version the rollout published, starts the
soak, and a device that later runs something else (a probation rollback, silent or
not) has failed.

Gates (`Gate`) are extra checks during the soak; each says pass, fail or "not
judged". `CountAgreementGate` compares the counts of the new model with the previous
one's through a pluggable ``source`` (the shadow comparison); without shadow data
it is not judged, which does not stop a device from succeeding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import peewee as pw

from ..store.db import AuditEntry, HealthBeat, ReportedState
from .rollout_plan import Plan

PASS, FAIL, NOT_JUDGED = "pass", "fail", "not_judged"
DRIFT_ACTION = "drift.rollback"


def drift_target(device: str, camera: str) -> str:
    """The audit target the drift judge writes for one camera of a device."""
    return f"device:{device}/camera:{camera}"


@dataclass(frozen=True)
class Facts:
    """What the registry knows about one moved device (see the module)."""

    device: str
    applied_version: int | None = None  # the reported state's desired_version
    camera: dict | None = None  # the reported state's entry for the rollout's camera
    reported_at: float | None = None
    last_beat_at: float | None = None
    drift: list[dict] = field(default_factory=list)  # drift.rollback entries since the move


@dataclass(frozen=True)
class GateResult:
    verdict: str  # PASS, FAIL or NOT_JUDGED
    reason: str = ""


@dataclass(frozen=True)
class Subject:
    """The device a gate judges: the rollout's model, camera and the device's times."""

    device: str
    camera: str
    model: str
    version: int
    moved_at: float
    activated_at: float


class Gate(Protocol):
    name: str

    def check(self, subject: Subject, facts: Facts, now: float) -> GateResult: ...


# (device, camera, since) -> agreement of the new model's counts with the previous
# model's, 0..1, over the soak so far; None while there is no shadow data.
AgreementSource = Callable[[str, str, float], float | None]


class CountAgreementGate:
    """Counts of the new model must agree with the previous model's (the shadow
    comparison run on the device) at least ``minimum``; not judged without data."""

    name = "count_agreement"

    def __init__(self, source: AgreementSource | None = None, minimum: float = 0.7) -> None:
        self.source = source
        self.minimum = minimum

    def check(self, subject: Subject, facts: Facts, now: float) -> GateResult:
        agreement = (
            None
            if self.source is None
            else self.source(subject.device, subject.camera, subject.activated_at)
        )
        if agreement is None:
            return GateResult(NOT_JUDGED, "count agreement not judged: no shadow comparison")
        if agreement < self.minimum:
            return GateResult(
                FAIL, f"count agreement {agreement:.2f} with the previous model < {self.minimum}"
            )
        return GateResult(PASS, f"count agreement {agreement:.2f}")


def default_gates(agreement: AgreementSource | None = None) -> list[Gate]:
    """The soak gates a `RolloutStepper` uses unless given others: the count-agreement
    gate, fed by ``agreement`` (the shadow comparison's figures; None: not judged)."""
    return [CountAgreementGate(agreement)]


def gather(devices: Iterable[tuple[str, float]], camera: str) -> dict[str, Facts]:
    """Facts for each (device, moved_at), read in a few queries."""
    moved = dict(devices)
    if not moved:
        return {}
    ids = list(moved)
    reported: dict[str, tuple[int | None, dict | None, float]] = {}
    for row in ReportedState.select().where(ReportedState.device.in_(ids)):
        try:
            cams = json.loads(row.payload).get("cameras") or []
        except ValueError:
            cams = []
        entry = next((c for c in cams if c.get("camera") == camera), None)
        reported[row.device_id] = (row.desired_version, entry, row.ts)
    beats = dict(
        HealthBeat.select(HealthBeat.device, pw.fn.MAX(HealthBeat.received_at))
        .where(HealthBeat.device.in_(ids) & (HealthBeat.received_at >= min(moved.values())))
        .group_by(HealthBeat.device)
        .tuples()
    )
    targets = {drift_target(d, camera): d for d in ids}
    drift: dict[str, list[dict]] = {}
    query = AuditEntry.select().where(
        (AuditEntry.action == DRIFT_ACTION)
        & AuditEntry.target.in_(list(targets))
        & (AuditEntry.ts >= min(moved.values()))
    )
    for entry in query.order_by(AuditEntry.id):
        device = targets[entry.target]
        if entry.ts >= moved[device]:
            drift.setdefault(device, []).append(
                {"ts": entry.ts, "actor": entry.actor, "reason": entry.reason}
            )
    out = {}
    for device in ids:
        applied, entry, ts = reported.get(device, (None, None, None))
        out[device] = Facts(
            device=device,
            applied_version=applied,
            camera=entry,
            reported_at=ts,
            last_beat_at=beats.get(device),
            drift=drift.get(device, []),
        )
    return out


@dataclass(frozen=True)
class Judgement:
    state: str
    reason: str = ""
    activated_at: float | None = None


def _runs(entry: dict | None, model: str, version: int) -> bool:
    return entry is not None and entry.get("model") == model and entry.get("version") == version


def _update_of(entry: dict | None, model: str, version: int) -> str | None:
    """The camera's last update state if that update was to ``model`` ``version``."""
    if entry is None:
        return None
    if entry.get("update_model") == model and entry.get("update_version") == version:
        return entry.get("update")
    return None


def _describe(entry: dict | None) -> str:
    if entry is None:
        return "the camera is not in its reported state"
    what = f"{entry.get('model') or entry.get('file') or 'its configured file'}"
    if entry.get("version") is not None:
        what += f" v{entry['version']}"
    return f"it runs {what}"


def judge(
    state: str,
    subject: Subject | None,
    facts: Facts,
    plan: Plan,
    desired_version: int,
    moved_at: float,
    model: str,
    version: int,
    now: float,
    gates: Iterable[Gate] = (),
) -> Judgement:
    """The next state of a device in ``state`` (moving or soaking); ``subject`` is set
    while soaking. Failures are checked before success, so a device that rolled
    back is never counted as a success."""
    if facts.drift:
        first = facts.drift[0]
        return Judgement("drifted", f"drift alarm by {first['actor']}: {first['reason']}")
    applied = facts.applied_version is not None and facts.applied_version >= desired_version
    entry = facts.camera if applied else None
    update = _update_of(entry, model, version)
    if update == "failed":
        return Judgement("failed", f"the device refused the update: {entry.get('reason') or ''}")
    if update == "rolled_back":
        return Judgement(
            "rolled_back", f"probation rollback: {entry.get('reason') or _describe(entry)}"
        )
    if state == "moving":
        if applied and _runs(entry, model, version) and entry.get("update") in (None, "activated"):
            return Judgement("soaking", "reported the model active", activated_at=now)
        if now - moved_at > plan.timeout_s:
            seen = (
                _describe(entry)
                if applied
                else f"it applied desired version {facts.applied_version}, not {desired_version}"
            )
            return Judgement(
                "timed_out", f"no activation reported within {plan.timeout_s:g} s ({seen})"
            )
        return Judgement("moving")
    # soaking
    assert subject is not None
    if not _runs(entry, model, version):
        return Judgement("rolled_back", f"no longer runs {model} v{version}: {_describe(entry)}")
    last = max(facts.last_beat_at or 0.0, 0.0)
    if now - max(last, subject.activated_at) > plan.beat_timeout_s:
        since = "since the move" if facts.last_beat_at is None else f"for {now - last:.0f} s"
        return Judgement(
            "failed", f"no health beat {since} (beat_timeout_s {plan.beat_timeout_s:g})"
        )
    notes = []
    for gate in gates:
        result = gate.check(subject, facts, now)
        if result.verdict == FAIL:
            return Judgement("failed", f"{gate.name}: {result.reason}")
        notes.append(result.reason)
    if now - subject.activated_at >= plan.soak_s:
        if facts.last_beat_at is None or facts.last_beat_at < subject.activated_at:
            return Judgement("failed", "no health beat during the soak")
        reason = f"active and healthy for {plan.soak_s:g} s"
        return Judgement("succeeded", "; ".join([reason, *notes]))
    return Judgement("soaking")
