"""The environment watch: a camera whose model did not change, judged against its own
baseline, for scene changes (night, a dirty lens, a moved camera).

The drift judge (`drift.DriftJudge`) judges a camera's new model for
``judge_windows`` windows after an activation; outside that span (a camera first
seen, a new model accepted, a camera restored to its model, an activation without a
baseline) nothing judged it, so a lens that fogs up on a model that has run for
weeks went unnoticed. A **watch** is a `DriftActivation` row in state ``watching``
whose ``model`` is the camera's current model and whose baseline is that model's own
first ``baseline_windows`` windows on the camera (pooled as they arrive). Every later
window is compared with it (`drift_stats.compare`, the ``distribution`` policy and
the brightness / blur figures; latency, confidence variance and agreement are about a
model, which did not change). Because the model is the same, any breach is the
scene's: the window is flagged ``environment``, and ``k`` of the last ``n`` judged
windows flagged raise one ``drift.environment`` audit entry (``watch: true``). A
watch never rolls back. Once ``n`` judged windows in a row are clean again the alert
is cleared (``drift.environment_cleared``), so the next episode alerts again.

Only flagged windows get a `DriftVerdict` row (a fleet's steady windows would
otherwise add one row per camera and minute, forever); the clean ones are counted in
the watch's ``judged`` and ``recent``.

``previous_model`` of a watch is that of the activation it follows (None for a camera
first seen, or one restored to its model), so the judge's rule "back on the model it
ran before: restored" keeps working across a watch, and a model the camera was taken
back from is judged again if it is deployed again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from ..store.audit import audit
from ..store.drift_tables import DriftActivation
from .drift_baselines import insert_activations
from .drift_stats import Judgement, Settings, WindowStats, compare, confirmed

log = logging.getLogger(__name__)

ACTOR = "drift-judge"
_BULK = 200  # rows per bulk statement
WATCHING = "watching"
# After these states the camera's model is settled: watch it. (After ``rolled_back``
# the camera is about to switch back: the next activation takes over.)
WATCH_AFTER = ("accepted", "restored", "no_baseline")


def watch_settings(settings: Settings) -> Settings:
    """The judge's settings restricted to what a scene change moves."""
    return replace(settings, policies=tuple(p for p in settings.policies if p == "distribution"))


def new_watch(device: str, camera: str, row, previous: DriftActivation | None, at: float):
    """An unsaved watch starting at ``row`` (its first baseline window)."""
    stats = WindowStats.from_summary(json.loads(row.payload))
    return DriftActivation(
        device=device,
        camera=camera,
        model=row.model,
        # After a restore, the model it was taken back from is no "previous model" to
        # return to unjudged (see the module docstring).
        previous_model=(
            previous.previous_model
            if previous is not None and previous.state != "restored"
            else None
        ),
        started_at=row.start,
        baseline=json.dumps(stats.to_dict()),
        baseline_ids=json.dumps([row.id]),
        state=WATCHING,
        recent="",
        recent_ids="[]",
        judged=0,
        created_at=at,
    )


@dataclass
class WatchResult:
    """One window seen by a watch: ``judgement`` None while the baseline fills."""

    judgement: Judgement | None = None
    flagged: bool = False
    alert: bool = False  # confirmed now: write ``drift.environment``
    cleared: bool = False  # n clean windows after an alert: write ``drift.environment_cleared``


def watch_window(
    act: DriftActivation, row, settings: Settings, baseline_windows: int, at: float
) -> WatchResult:
    """Add ``row`` to the watch's baseline, or judge it against the baseline; updates
    ``act`` in memory (the caller writes it)."""
    new = WindowStats.from_summary(json.loads(row.payload))
    ids = json.loads(act.baseline_ids)
    base = getattr(act, "_base", None)
    if base is None:
        base = act._base = WindowStats(**json.loads(act.baseline))
    if len(ids) < baseline_windows:
        act._base = WindowStats.pool([base, new])
        act.baseline = json.dumps(act._base.to_dict())
        act.baseline_ids = json.dumps([*ids, row.id])
        act._grew = True  # its baseline columns need writing too
        return WatchResult()
    j = compare(base, new, watch_settings(settings))
    if j.verdict == "not_judged":
        return WatchResult(j)
    flagged = bool(j.breaches or j.environment)
    if flagged:
        j.verdict = "environment"
        what = j.environment + [b for b in j.breaches if b not in j.environment]
        j.environment = what
        j.reason = "the scene changed on an unchanged model: " + ", ".join(what)
    act.judged += 1
    act.recent = (act.recent + ("e" if flagged else "o"))[-settings.n :]
    act.recent_ids = json.dumps([*json.loads(act.recent_ids), row.id][-settings.n :])
    out = WatchResult(j, flagged)
    if act.environment_at is None:
        if flagged and confirmed((c == "e" for c in act.recent), settings.k, settings.n):
            act.environment_at = at
            out.alert = True
    elif len(act.recent) >= settings.n and "e" not in act.recent[-settings.n :]:
        act.environment_at = None
        out.cleared = True
    return out


_WATCH_FIELDS = (
    "device",
    "camera",
    "model",
    "previous_model",
    "started_at",
    "baseline",
    "baseline_ids",
    "state",
    "recent",
    "recent_ids",
    "judged",
    "created_at",
)


def judge_window(judge, act: DriftActivation, row, at: float) -> str | None:
    """One window of a watched camera for ``judge`` (its `DriftJudge`: settings, options
    and the pass's verdict rows); the verdict when judged, None while the baseline fills."""
    r = watch_window(act, row, judge.settings, judge.options.baseline_windows, at)
    j = r.judgement
    if j is None:
        return None
    target = f"device:{row.device_id}/camera:{row.camera}"
    if r.flagged:
        if act.id is None:  # a watch made in this pass: its row first
            act.save()
        judge._verdict_rows.append(
            {
                "summary": row.id,
                "activation": act.id,
                "device": row.device_id,
                "camera": row.camera,
                "model": row.model,
                "baseline_model": row.model,
                "start": row.start,
                "end": row.end,
                "verdict": j.verdict,
                "statistics": json.dumps(j.statistics),
                "thresholds": json.dumps(j.thresholds),
                "breaches": json.dumps(j.breaches),
                "reason": j.reason,
                "created_at": at,
            }
        )
    if r.alert or r.cleared:
        if act.id is None:
            act.save()
        act.save(only=[DriftActivation.environment_at])
    if r.alert:
        audit(
            ACTOR,
            "drift.environment",
            target,
            j.reason,
            model=row.model,
            previous_model=row.model,
            watch=True,
            environment=j.environment,
            windows=json.loads(act.recent_ids),
            baseline_windows=json.loads(act.baseline_ids),
            activation=act.id,
            statistics=j.statistics,
            thresholds=j.thresholds,
            breaches=j.breaches,
        )
        log.warning("drift: %s %s", target, j.reason)
    elif r.cleared:
        audit(
            ACTOR,
            "drift.environment_cleared",
            target,
            f"{judge.settings.n} windows in a row like the camera's baseline again",
            model=row.model,
            watch=True,
            windows=json.loads(act.recent_ids),
            activation=act.id,
        )
    return j.verdict


def save_watches(db, watched, cams, changed) -> None:
    """Write the pass's watches: new ones in bulk (and point their cameras at
    them), the others' baseline and recent flags as one CASE statement per batch."""
    fresh = [a for a in watched.values() if a.id is None]
    old = [a for a in watched.values() if a.id is not None]
    made = insert_activations(db, [{k: a.__data__[k] for k in _WATCH_FIELDS} for a in fresh])
    for key, act in {**watched, **made}.items():
        cam = cams[key]
        if cam.activation_id != act.id:  # a new watch (its id known only now)
            cam.activation = act
            if cam.id is not None:
                changed[key] = cam
    recent = [DriftActivation.recent, DriftActivation.recent_ids, DriftActivation.judged]
    grown = [a for a in old if getattr(a, "_grew", False)]
    if grown:  # baselines still filling: their (larger) baseline columns too
        DriftActivation.bulk_update(
            grown,
            fields=[DriftActivation.baseline, DriftActivation.baseline_ids, *recent],
            batch_size=_BULK,
        )
    judged = [a for a in old if not getattr(a, "_grew", False)]
    if judged:
        DriftActivation.bulk_update(judged, fields=recent, batch_size=_BULK)
