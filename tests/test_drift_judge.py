"""The drift judge in the registry (`flowfleet.registry.fleet.drift`) on real windows:
the real detector (the agent's loader) over a real sample video, its frames replayed
through the agent's own `DriftWindow`, the summaries stored by the registry's real
ingest, judged on SQLite and PostgreSQL, rolled back through the real deployments
code into the commands outbox.

One detector pass per variant (60 frames of PETS09, every 2nd frame) is shared by
the whole session; windows are 40 frames, and the 60 frames are looped with a stride
of 7 frames, so windows overlap but differ. (The false-alarm rate and the detection
power on disjoint windows of every sample video are measured by
``benchmarks/bench_drift.py calibrate``; docs/drift.md.)
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from flowfleet.agent.shadow import match_boxes
from flowfleet.cli import main as cli_main
from flowfleet.configfile import ConfigError
from flowfleet.contract import Topics
from flowfleet.contract_shadow import ShadowDrift, ShadowModel, ShadowWindow, agreement_of
from flowfleet.registry.config import load_registry_config
from flowfleet.registry.fleet.drift import DriftJudge, JudgeOptions, model_version, verdicts
from flowfleet.registry.fleet.drift_stats import Settings
from flowfleet.registry.fleet.ingest import Ingestor
from flowfleet.registry.fleet.shadow import drift_shadow_source
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store.db import AuditEntry, Command, Deployment
from flowfleet.registry.store.drift_tables import DriftActivation, DriftCursor, DriftVerdict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import drift_windows

MODEL = "yolov8n_full_integer_quant.tflite"
NEW_MODEL_FILE = "yolov8n_int8_dynamic.tflite"  # v2: another real file (sha256 differs)
WORSE = "broken_scaling:8"
FRAMES = 60
WINDOW = 40
STRIDE = 7
T0 = drift_windows.T0


@pytest.fixture(scope="session")
def real_frames(data):
    """Per variant: the real detector's frames over 60 frames of PETS09."""
    video = data / "videos" / "pets09-s2l1.avi"
    model = data / "models" / MODEL
    # FLOWFLEET_DRIFT_CACHE: keep the detector's frames between runs (development).
    cache = os.environ.get("FLOWFLEET_DRIFT_CACHE")
    return {
        (variant, transform): drift_windows.detect_frames(
            model,
            video,
            variant=variant,
            transform=transform,
            step=2,
            limit=FRAMES,
            cache=Path(cache) if cache else None,
        )
        for variant, transform in (
            ("good", "none"),
            (WORSE, "none"),
            ("good", "dark"),
            ("good", "night"),
        )
    }


@pytest.fixture
def fleet(registry, data):
    """The registry with model ``people`` v1 and v2 (two real files), and a clean
    judge cursor (reset_database empties tables with a device; the cursor has none)."""
    DriftCursor.delete().execute()
    files = {}
    for name in (MODEL, NEW_MODEL_FILE):
        v, _ = registry.add_version(
            data / "models" / name, name="people", filename=name, actor="test"
        )
        files[v.version] = f"people-v{v.version}-{v.sha256[:12]}.tflite"  # as the agent names it
    return registry, files


def windows(frames, model_file, count, *, first=0, window=WINDOW, t0=T0):
    """``count`` windows (looped, stride 7) named after ``model_file``."""
    ws = drift_windows.make_windows(
        frames, model_file, window_frames=window, count=first + count, stride=STRIDE, t0=t0
    )
    return ws[first:]


class Device:
    """A device's drift summaries, stored through the registry's real ingest."""

    def __init__(self, registry, name: str) -> None:
        self.ingest = Ingestor(registry.db, Topics())
        self.name = name
        self.seq = 0
        self.t = T0

    def send(self, summaries) -> None:
        items = []
        for s in summaries:
            self.seq += 1
            span = s.end - s.start
            s = s.model_copy(
                update={"device": self.name, "seq": self.seq, "start": self.t, "end": self.t + span}
            )
            self.t += span
            items.append((Topics().drift(self.name), s.to_json(), time.time() - 60))
        assert set(self.ingest.handle_batch(items)) == {"stored"}


# Latency is left out of the tests' policies: measured on a shared test machine it
# follows the other processes' load (tests/test_drift_stats.py covers the policy).
POLICIES = ("distribution", "confidence_variance", "agreement")


def judge(registry, shadow=None, **settings) -> DriftJudge:
    return DriftJudge(
        registry.db,
        registry,
        Settings(**{"policies": POLICIES, **settings}),
        JudgeOptions(baseline_windows=10, judge_windows=60),
        topics=Topics(),
        shadow=shadow,
    )


def audits(action: str) -> list[AuditEntry]:
    return list(AuditEntry.select().where(AuditEntry.action == action).order_by(AuditEntry.id))


def activation_states(device: str) -> list[str]:
    """The device's activations' states, oldest first, its environment watches apart."""
    q = DriftActivation.select().where(
        (DriftActivation.device == device) & (DriftActivation.state != "watching")
    )
    return [a.state for a in q.order_by(DriftActivation.id)]


def verdict_counts(device: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in DriftVerdict.select().where(DriftVerdict.device == device):
        out[v.verdict] = out.get(v.verdict, 0) + 1
    return out


def test_model_file_names_resolve_to_versions(fleet):
    _, files = fleet
    assert model_version(files[2]) == ("people", 2)
    assert model_version(MODEL) == ("people", 1)  # by the uploaded file name
    assert model_version("unknown.tflite") is None
    assert model_version(None) is None


def test_unchanged_model_30_windows_no_alarm(fleet, real_frames):
    """v1 -> v2 where v2 behaves like v1 (the same detector's windows): 30 windows
    judged, none confirmed, nothing rolled back."""
    registry, files = fleet
    good = real_frames[("good", "none")]
    dev = Device(registry, "cam-same")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(good, files[2], 30, first=10))
    done = judge(registry).run_once()
    counts = verdict_counts("cam-same")
    assert sum(counts.values()) == 30
    assert counts.get("ok", 0) >= 29, counts  # at most one lone breach of 30
    assert "model_drift" not in counts and "environment" not in counts
    assert done["activations"] == 1
    assert not audits("drift.rollback") and not Deployment.select().count()
    # Incremental: a second pass has nothing new to judge.
    assert judge(registry).run_once() == {}


def test_worse_model_rolled_back_on_that_device_only(fleet, real_frames):
    registry, files = fleet
    good, worse = real_frames[("good", "none")], real_frames[(WORSE, "none")]
    bad, fine = Device(registry, "cam-bad"), Device(registry, "cam-fine")
    for dev in (bad, fine):
        dev.send(windows(good, files[1], 10))
    bad.send(windows(worse, files[2], 8, first=10))
    fine.send(windows(good, files[2], 8, first=10))
    judge(registry).run_once()

    counts = verdict_counts("cam-bad")
    assert counts.get("model_drift") == 1, counts  # confirmed once, at the k-th breach
    assert verdict_counts("cam-fine").get("model_drift") is None
    (entry,) = audits("drift.rollback")
    assert entry.target == "device:cam-bad/camera:cam"
    details = json.loads(entry.details)
    assert (details["model"], details["version"]) == ("people", 2)
    assert (details["previous_model"], details["previous_version"]) == ("people", 1)
    assert 3 <= len(details["windows"]) <= 4  # the k-of-n windows that confirmed it
    assert len(details["baseline_windows"]) == 10
    assert details["breaches"] and set(details["breaches"]) <= set(details["statistics"])
    assert all(k in details["thresholds"] for k in details["breaches"])
    # The new desired state: cam-bad's camera back on v1, queued for the broker.
    (dep,) = Deployment.select()
    assert (dep.device, dep.camera, dep.model, dep.version) == ("cam-bad", "cam", "people", 1)
    assert Command.select().where(Command.device == "cam-bad").count() == 1
    act = DriftActivation.get(
        (DriftActivation.device == "cam-bad") & (DriftActivation.state != "watching")
    )
    assert act.state == "rolled_back"

    # More bad windows before the device switches back: no second rollback; then
    # the device runs v1 again: not judged against the model that was rolled back.
    bad.send(windows(worse, files[2], 4, first=18))
    bad.send(windows(good, files[1], 6, first=22))
    judge(registry).run_once()
    assert len(audits("drift.rollback")) == 1
    assert activation_states("cam-bad") == ["rolled_back", "restored"]
    # Back on v1, the camera's own windows start its environment watch.
    assert DriftActivation.select().order_by(DriftActivation.id.desc()).first().state == "watching"
    assert sum(verdict_counts("cam-bad").values()) == sum(counts.values())


def test_back_on_the_previous_model_is_not_judged(fleet, real_frames):
    """The agent's own probation took v2 back before the judge confirmed anything:
    v1's windows are not judged against v2 (which could 'roll back' to v2)."""
    registry, files = fleet
    good, worse = real_frames[("good", "none")], real_frames[(WORSE, "none")]
    dev = Device(registry, "cam-probation")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(worse, files[2], 2, first=10))
    dev.send(windows(good, files[1], 6, first=12))
    judge(registry).run_once()
    assert activation_states("cam-probation") == ["judging", "restored"]
    assert sum(verdict_counts("cam-probation").values()) == 2  # v2's two windows only
    assert not audits("drift.rollback")


def test_darkened_frames_environment_not_rollback(fleet, real_frames):
    """The scene darkens as v2 arrives (frames darkened for both models): an
    environment alert, no rollback."""
    registry, files = fleet
    good, dark = real_frames[("good", "none")], real_frames[("good", "dark")]
    dev = Device(registry, "cam-night")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(dark, files[2], 8, first=10))
    judge(registry).run_once()
    counts = verdict_counts("cam-night")
    assert "model_drift" not in counts and "breach" not in counts, counts
    assert counts.get("environment", 0) >= 3, counts
    (entry,) = audits("drift.environment")
    assert entry.target == "device:cam-night/camera:cam"
    assert "brightness" in json.loads(entry.details)["environment"]
    assert not audits("drift.rollback") and not Deployment.select().count()


def test_unchanged_model_watched_for_the_scene(fleet, real_frames):
    """No activation at all: the camera's own first windows are its watch's baseline.
    30 more windows of the same model and scene raise nothing; then the frames darken
    (night, a dirty lens): an environment alert, never a rollback; the scene comes
    back: the alert is cleared."""
    registry, files = fleet
    good, dark = real_frames[("good", "none")], real_frames[("good", "dark")]
    dev = Device(registry, "cam-watch")
    dev.send(windows(good, files[1], 40))
    assert judge(registry).run_once() == {"watch_ok": 30}  # after 10 baseline windows
    (watch,) = DriftActivation.select().where(DriftActivation.device == "cam-watch")
    assert (watch.state, watch.judged, watch.recent) == ("watching", 30, "oooo")
    assert len(json.loads(watch.baseline_ids)) == 10
    assert not DriftVerdict.select().where(DriftVerdict.device == "cam-watch").count()

    dev.send(windows(dark, files[1], 5, first=40))
    done = judge(registry).run_once()
    assert done == {"watch_environment": 5}
    assert verdict_counts("cam-watch") == {"environment": 5}
    (entry,) = audits("drift.environment")
    assert entry.target == "device:cam-watch/camera:cam"
    details = json.loads(entry.details)
    assert details["watch"] is True and "brightness" in details["environment"]
    assert details["statistics"]["brightness_shift"] < -0.25
    assert len(details["windows"]) == 4 and len(details["baseline_windows"]) == 10
    assert not audits("drift.rollback") and not Deployment.select().count()

    dev.send(windows(good, files[1], 4, first=45))
    assert judge(registry).run_once() == {"watch_ok": 4}
    (cleared,) = audits("drift.environment_cleared")
    assert cleared.target == "device:cam-watch/camera:cam"
    assert DriftActivation.get_by_id(watch.id).environment_at is None


def window_frames(frames, i):
    """The frames of window ``i`` as `windows` (make_windows, stride 7) chose them."""
    return [frames[(i * STRIDE + j) % len(frames)] for j in range(WINDOW)]


def send_with_shadow(dev, files, active, previous, count, first, *, with_shadow=True):
    """``count`` windows of v2 on ``active`` frames; with each, the shadow window of the
    same frames with v1 (the previous model) as the candidate on ``previous`` frames:
    boxes matched by the agent's own `match_boxes`, v1's raw output binned by the
    agent's `DriftWindow` (`make_windows`)."""
    ws = windows(active, files[2], count, first=first)
    cand = windows(previous, files[1], count, first=first)
    start = dev.t
    dev.send(ws)
    if not with_shadow:
        return
    items = []
    for k, (w, c) in enumerate(zip(ws, cand, strict=True)):
        a_frames, c_frames = window_frames(active, first + k), window_frames(previous, first + k)
        boxes_a = sum(len(f.dets) for f in a_frames)
        boxes_c = sum(len(f.dets) for f in c_frames)
        matched = sum(match_boxes(x.dets, y.dets) for x, y in zip(a_frames, c_frames, strict=True))
        span = w.end - w.start
        body = ShadowWindow(
            device=dev.name,
            seq=k + 1 + first,
            camera="cam",
            start=start + k * span,
            end=start + (k + 1) * span,
            active=ShadowModel(file=files[2], model="people", version=2),
            candidate=ShadowModel(file=files[1], model="people", version=1),
            share=1.0,
            frames=WINDOW,
            frames_compared=WINDOW,
            detections_per_frame_active=round(boxes_a / WINDOW, 4),
            detections_per_frame_candidate=round(boxes_c / WINDOW, 4),
            boxes_active=boxes_a,
            boxes_candidate=boxes_c,
            matched=matched,
            agreement=agreement_of(matched, boxes_a, boxes_c),
            candidate_drift=ShadowDrift(
                frames=c.frames,
                detections=c.detections,
                confidence_hist=c.confidence_hist,
                class_mix=c.class_mix,
            ),
        )
        items.append((Topics().shadow(dev.name), body.to_json(), time.time() - 60))
    assert set(dev.ingest.handle_batch(items)) == {"stored"}


# Brightness and blur left wide: the scene change shows in the models' output only
# (a fogged lens, say), so only the shadow comparison can tell it from a model drift.
FIGURES_SILENT = {"brightness_shift_max": 10.0, "blur_ratio_max": 100.0}


def test_previous_model_in_shadow_shows_the_same_change(fleet, real_frames):
    """Night frames (x0.12) for both models as v2 arrives: v2's confidences move
    (psi, ks breached). With the shadow comparison, v1 on the same frames moves the
    same way against its own baseline: an environment alert, no rollback. The same
    windows without shadow data are a model drift (rolled back), and a really worse
    v2 beside an unchanged v1 is rolled back with the shadow data too."""
    registry, files = fleet
    good, night = real_frames[("good", "none")], real_frames[("good", "night")]
    worse = real_frames[(WORSE, "none")]
    lit, unlit, bad = (Device(registry, n) for n in ("cam-shadow", "cam-no-shadow", "cam-worse"))
    for dev in (lit, unlit, bad):
        dev.send(windows(good, files[1], 10))
    send_with_shadow(lit, files, night, night, 8, 10)
    send_with_shadow(unlit, files, night, night, 8, 10, with_shadow=False)
    send_with_shadow(bad, files, worse, good, 8, 10)
    judge(registry, shadow=drift_shadow_source(), **FIGURES_SILENT).run_once()

    counts = verdict_counts("cam-shadow")
    assert "model_drift" not in counts and "breach" not in counts, counts
    assert counts.get("environment", 0) >= 3, counts
    (env,) = audits("drift.environment")
    details = json.loads(env.details)
    assert env.target == "device:cam-shadow/camera:cam"
    assert details["environment"] == ["previous_model_same_change"]
    assert {"psi", "ks"} & set(details["breaches"])
    assert details["statistics"]["agreement"] == 1.0  # the same network's boxes

    assert verdict_counts("cam-no-shadow").get("model_drift") == 1
    assert verdict_counts("cam-worse").get("model_drift") == 1
    rolled = {e.target for e in audits("drift.rollback")}
    assert rolled == {"device:cam-no-shadow/camera:cam", "device:cam-worse/camera:cam"}
    worse_entry = next(e for e in audits("drift.rollback") if "cam-worse" in e.target)
    assert json.loads(worse_entry.details)["statistics"]["agreement"] < 0.7


def test_small_windows_not_judged(fleet, real_frames):
    registry, files = fleet
    good, worse = real_frames[("good", "none")], real_frames[(WORSE, "none")]
    dev = Device(registry, "cam-small")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(worse, files[2], 8, first=10, window=12))  # about 100 detections each
    judge(registry, min_detections=400).run_once()
    assert verdict_counts("cam-small") == {"not_judged": 8}
    (v, *_) = verdicts(device="cam-small")
    assert "min" in v["reason"]
    assert not audits("drift.rollback")


def test_two_judges_judge_each_window_once(fleet, real_frames):
    """Two registry processes' judges at once: the named lock and the cursor mean
    every window gets one verdict and the camera one rollback."""
    registry, files = fleet
    good, worse = real_frames[("good", "none")], real_frames[(WORSE, "none")]
    bad, fine = Device(registry, "cam-race-bad"), Device(registry, "cam-race-fine")
    for dev in (bad, fine):
        dev.send(windows(good, files[1], 10))
    bad.send(windows(worse, files[2], 12, first=10))
    fine.send(windows(good, files[2], 12, first=10))
    judges = [judge(registry), judge(registry)]
    errors = []

    def run(j):
        try:
            with registry.db.connection_context():
                j.run_once()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in judges]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert DriftVerdict.select().where(DriftVerdict.device == "cam-race-fine").count() == 12
    # The bad camera: judged up to its confirmation (then rolled back, not judged on).
    assert verdict_counts("cam-race-bad").get("model_drift") == 1
    assert len(audits("drift.rollback")) == 1


def test_verdicts_api_cli_and_config(fleet, real_frames, db_url, tmp_path, capsys):
    """The verdicts through GET /api/drift/verdicts (viewer; filters; bad input is a
    400 naming the parameter), `flowfleet registry drift verdicts --json`, and the
    `[drift]` config section (unknown keys and k > n refused, naming the key)."""
    registry, files = fleet
    good, dark = real_frames[("good", "none")], real_frames[("good", "dark")]
    dev = Device(registry, "cam-api")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(dark, files[2], 4, first=10))
    judge(registry).run_once()
    with registry.db.connection_context():
        auth.create_user("viewer-user", "viewer", actor="test")
        token, _ = auth.create_token("viewer-user", actor="test")
    client = create_app(registry.db, registry=registry).test_client()
    headers = {"Authorization": f"Bearer {token}"}
    body = client.get("/api/drift/verdicts?device=cam-api", headers=headers).get_json()
    assert [v["verdict"] for v in body["verdicts"]] == ["environment"] * 4
    assert body["verdicts"][0]["statistics"]["brightness_shift"] < -0.5
    assert body["verdicts"][0]["thresholds"]["brightness_shift"] == 0.25
    none = client.get("/api/drift/verdicts?device=cam-api&verdict=model_drift", headers=headers)
    assert none.get_json()["verdicts"] == []
    bad = client.get("/api/drift/verdicts?verdict=awful", headers=headers)
    assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "verdict"
    assert client.get("/api/drift/verdicts").status_code == 401
    assert "/api/drift/verdicts" in client.get("/api/openapi.json").get_json()["paths"]

    assert (
        cli_main(["registry", "drift", "verdicts", "--db", db_url, "--device", "cam-api", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and rows[0]["device"] == "cam-api"

    cfg = tmp_path / "registry.toml"
    cfg.write_text("[drift]\nk = 3\nn = 5\ninterval_s = 30\npolicies = ['distribution']\n")
    drift_cfg = load_registry_config(cfg, check=False).drift
    assert (drift_cfg.k, drift_cfg.n, drift_cfg.stats_settings().policies) == (
        3,
        5,
        ("distribution",),
    )
    for text, key in (
        ("k = 5\nn = 4\n", "k (5) must not exceed n (4)"),
        ("windows = 3\n", "windows"),
    ):
        cfg.write_text("[drift]\n" + text)
        with pytest.raises(ConfigError, match=re.escape(key)) as err:
            load_registry_config(cfg, check=False)
        assert "registry.toml" in str(err.value)


def test_a_rejected_model_deployed_again_is_judged_again(fleet, real_frames):
    """Back on v1 after a rollback, an operator (or a rollout) moves the camera to the
    same bad v2 again: that is a new activation, judged and rolled back again, not a
    'return to the model it ran before'."""
    registry, files = fleet
    good, worse = real_frames[("good", "none")], real_frames[(WORSE, "none")]
    dev = Device(registry, "cam-again")
    dev.send(windows(good, files[1], 10))
    dev.send(windows(worse, files[2], 6, first=10))
    judge(registry).run_once()
    dev.send(windows(good, files[1], 10, first=16))
    judge(registry).run_once()
    assert activation_states("cam-again") == ["rolled_back", "restored"]
    dev.send(windows(worse, files[2], 6, first=26))
    judge(registry).run_once()
    assert activation_states("cam-again") == ["rolled_back", "restored", "rolled_back"]
    assert len(audits("drift.rollback")) == 2
