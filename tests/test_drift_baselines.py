"""Activations made in bulk (`drift_baselines`) are exactly those made one at a time.

The same windows are judged twice on an emptied database, SQLite and PostgreSQL:
once reading baselines and creating activation rows in bulk (the default), once one
camera at a time (`JudgeOptions(bulk_activations=False)`, the code the bulk path
replaced). Activations and verdicts must be identical, in cases chosen to meet every
rule of a pass: a camera that activates mid-pass, a camera seen for the first time
and activating in the same pass, two activations of one camera in one pass (the
second one goes the one-camera way), a window without a model name, a late window
from before what the camera knows, more cameras than one bulk query takes.
"""

from __future__ import annotations

import json

from flowfleet.registry.fleet import drift_baselines
from flowfleet.registry.fleet.drift import DriftJudge, JudgeOptions
from flowfleet.registry.store.db import Device, DriftSummary
from flowfleet.registry.store.drift_tables import DriftActivation, DriftVerdict
from flowfleet.registry.testing import fresh_database
from tests.factories import valid_payload

T0 = 1_780_000_000.0

# Per camera, the models of its windows: first pass, then second pass. None: a window
# without a model name. ("late", m): a window of m that starts before the camera's
# newest known window.
CASES = {
    ("d1", "mid-pass"): (["a", "a", "a"], ["a", "b", "b"]),
    ("d1", "new-camera"): ([], ["a", "a", "b", "b"]),
    ("d2", "twice"): (["a", "a"], ["b", "a", "b", "b"]),
    ("d2", "no-name"): ([None, None], ["b", "b"]),
    ("d3", "late"): (["a", "a"], [("late", "a"), "b", "b"]),
    ("d3", "steady"): (["a", "a"], ["a", "a"]),
}
DEVICES = sorted({d for d, _ in CASES} | {f"x{i}" for i in range(5)})


def windows(pass_no: int) -> list[dict]:
    rows = []
    seq = {d: 1000 * pass_no for d in DEVICES}
    cases = dict(CASES)
    for i in range(5):  # more cameras than one bulk query takes (KEYS_PER_QUERY below)
        cases[(f"x{i}", "front")] = (["a", "a"], ["b", "b"])
    for (device, camera), passes in cases.items():
        first = len(passes[0])
        for i, model in enumerate(passes[pass_no]):
            late = isinstance(model, tuple)
            model = model[1] if late else model
            slot = (i + first * pass_no) if not late else 0.5
            start = T0 + 60 * slot
            seq[device] += 1
            payload = valid_payload("drift", device, seq[device])
            payload.update(camera=camera, model=model, start=start, end=start + 60)
            if model == "b":  # the new model sees half as much, more of it unsure
                payload["detections"] //= 2
                payload["confidence_hist"] = [400, 900, 700, 60, 30, 30, 20, 10, 10, 0]
                payload["detections_hist"] = [2000, 700, 200, 90, 0, 0, 0]
                payload["class_mix"] = {"person": 1500, "bicycle": 561}
            rows.append(
                {
                    "device": device,
                    "seq": seq[device],
                    "camera": camera,
                    "model": model,
                    "start": start,
                    "end": start + 60,
                    "received_at": T0,
                    "payload": json.dumps(payload),
                }
            )
    return rows


def judge_both_passes(bulk: bool) -> tuple[list, list]:
    judge = DriftJudge(
        DriftSummary._meta.database,
        # Activations only: the environment watch (test_drift_judge) makes its own rows.
        options=JudgeOptions(baseline_windows=2, bulk_activations=bulk, watch=False),
    )
    Device.insert_many([{"id": d, "first_seen": T0} for d in DEVICES]).execute()
    for pass_no in (0, 1):
        DriftSummary.insert_many(windows(pass_no)).execute()
        judge.run_once(at=T0 + 10_000)
    acts = sorted(
        (
            a.device_id,
            a.camera,
            a.model,
            a.previous_model,
            a.started_at,
            a.state,
            a.baseline,
            len(json.loads(a.baseline_ids)),  # ids differ between the two databases
        )
        for a in DriftActivation.select()
    )
    verdicts = sorted(
        (v.device_id, v.camera, v.model, v.baseline_model, v.start, v.verdict, v.reason)
        for v in DriftVerdict.select()
    )
    return acts, verdicts


def test_bulk_activations_equal_one_at_a_time(db_url, monkeypatch):
    monkeypatch.setattr(drift_baselines, "KEYS_PER_QUERY", 3)
    monkeypatch.setattr(drift_baselines, "ROWS_PER_INSERT", 2)
    fresh_database(db_url)
    db = DriftSummary._meta.database
    with db.connection_context():
        bulk = judge_both_passes(True)
    fresh_database(db_url)
    with db.connection_context():
        single = judge_both_passes(False)
    assert bulk == single
    acts, verdicts = bulk
    by_camera = {}
    for a in acts:
        by_camera.setdefault((a[0], a[1]), []).append((a[3], a[2], a[5]))
    # What each case is there for happened.
    assert by_camera[("d1", "mid-pass")] == [("a", "b", "judging")]
    assert by_camera[("d1", "new-camera")] == [("a", "b", "judging")]
    # a -> b, back to a (restored: the model it replaced), then b again (judged again:
    # a model the camera was taken back from is a new activation, not a return); the
    # last two in the one-camera way.
    assert sorted(by_camera[("d2", "twice")]) == [
        ("a", "b", "judging"),
        ("a", "b", "judging"),
        ("b", "a", "restored"),
    ]
    assert by_camera[("d2", "no-name")] == [(None, "b", "judging")]
    assert by_camera[("d3", "late")] == [("a", "b", "judging")]
    assert ("d3", "steady") not in by_camera
    assert all(by_camera[(f"x{i}", "front")] == [("a", "b", "judging")] for i in range(5))
    assert any(v[5] == "breach" for v in verdicts), "the new model's windows were judged"
