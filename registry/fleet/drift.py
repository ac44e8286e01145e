"""The drift judge: each camera's new model judged against its previous model, in the
registry, and a confirmed model drift rolled back.

A pass (`DriftJudge.run_once`) reads the drift summaries stored since the last pass
(a cursor on ``drift_summary.id``), under the named lock ``drift-judge`` (an advisory
lock on PostgreSQL, the write lock on SQLite), so several registry processes never
judge one window twice. Per device and camera:

* an **activation** is a change of the ``model`` the camera's windows name (what a
  deployment, a probation rollback or a local change ends in). Its baseline is the
  pooled last ``baseline_windows`` windows of the previous model on that camera;
* each window of the new model is compared with that baseline
  (`flowfleet.registry.fleet.drift_stats.compare`) and gets a stored verdict:
  ``ok``, ``not_judged`` (too few detections or frames), ``breach``,
  ``environment`` (the scene changed: brightness, blur, or the previous model shows
  the same change) or ``model_drift`` (a breach confirmed by k of the last n judged
  windows);
* ``model_drift`` rolls the camera back to the previous model version through the
  deployments code (a new desired state, published after commit) and writes the
  audit entry ``drift.rollback`` with the evidence; an activation is rolled back at
  most once. A confirmed environment change writes ``drift.environment`` (no
  rollback). After ``judge_windows`` judged windows without either, the new model
  is accepted and its camera is no longer judged until the next activation.

A camera that goes back to the model it ran before (after our rollback, or the
agent's own probation rollback) is not judged against the model it replaced.

Shadow comparison hook: ``shadow(summary_row, previous_model)`` may return the
previous model's output over the same frames (pooled from the agent's shadow windows
that ran it as the candidate) and the agreement share.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw

from ..errors import RegistryError
from ..store.audit import audit
from ..store.db import DriftSummary, ModelVersion, now
from ..store.drift_tables import DriftActivation, DriftCamera, DriftCursor, DriftVerdict
from ..store.locks import exclusive
from . import drift_baselines, drift_watch
from .drift_stats import Settings, WindowStats, compare, confirmed

log = logging.getLogger(__name__)

ACTOR = "drift-judge"
BULK = 200  # rows per bulk statement
LOCK = "drift-judge"
# The agent names a registry model's file <name>-v<version>-<sha256[:12]>.<ext>.
_AGENT_FILE = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)-[0-9a-f]{12}\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Shadow:
    """The previous model beside the new one on the same frames (from the agent)."""

    previous_window: WindowStats | None = None
    agreement: float | None = None


# (the new model's window, the previous model's file) -> the shadow data, or None
ShadowSource = Callable[[DriftSummary, str | None], Shadow | None]


@dataclass(frozen=True)
class JudgeOptions:
    """How the judge runs (config section ``[drift]`` besides the thresholds)."""

    baseline_windows: int = 10
    judge_windows: int = 60
    settle_s: float = 5.0  # summaries younger than this wait for the next pass
    batch: int = 2000
    # Read the baselines and create the activations of a pass in bulk
    # (`drift_baselines`); False: one camera at a time (the benchmark's comparison).
    bulk_activations: bool = True
    # Watch cameras whose model did not change for scene changes (`drift_watch`).
    watch: bool = True


def model_version(model_file: str | None) -> tuple[str, int] | None:
    """(registry model name, version) for a window's model file, or None.

    The agent stores a registry version as ``<name>-v<version>-<sha12>.<ext>``;
    otherwise a version uploaded under that file name (the newest) is taken.
    """
    if not model_file:
        return None
    m = _AGENT_FILE.match(model_file)
    if m:
        return m["name"], int(m["version"])
    v = (
        ModelVersion.select()
        .where(ModelVersion.filename == model_file)
        .order_by(ModelVersion.created_at.desc())
        .first()
    )
    return (v.model.name, v.version) if v is not None else None


class DriftJudge:
    """Judges new drift windows; `run_once` is one pass, `start` runs passes on a thread."""

    def __init__(
        self,
        db: pw.Database,
        registry=None,
        settings: Settings | None = None,
        options: JudgeOptions | None = None,
        *,
        commands=None,
        topics=None,
        shadow: ShadowSource | None = None,
        name: str = "default",
    ) -> None:
        self.db = db
        self.registry = registry  # a ModelRegistry (its deploy); None: no rollbacks
        self.settings = settings or Settings()
        self.options = options or JudgeOptions()
        self.commands = commands
        self.topics = topics
        self.shadow = shadow
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass --------------------------------------------------------------------

    def run_once(self, at: float | None = None) -> dict[str, int]:
        """Judge what arrived since the last pass; returns counts per verdict/action."""
        at = now() if at is None else at
        out: dict[str, int] = {}
        rolled = False
        while True:
            with exclusive(self.db, LOCK):
                _, more, rb = self._pass(at, out)
            rolled = rolled or rb
            if not more:
                break
        if rolled and self.commands is not None:
            self.commands.wake()  # the desired states are committed: publish them
        return out

    def _pass(self, at: float, out: dict[str, int]) -> tuple[int, bool, bool]:
        cursor = DriftCursor.get_or_none(DriftCursor.name == self.name)
        last_id = cursor.last_id if cursor is not None else 0
        rows = list(
            DriftSummary.select()
            .where(
                (DriftSummary.id > last_id)
                & (DriftSummary.received_at <= at - self.options.settle_s)
            )
            .order_by(DriftSummary.id)
            .limit(self.options.batch)
        )
        if not rows:
            return 0, False, False
        keys = {(r.device_id, r.camera) for r in rows}
        devices = sorted({d for d, _ in keys})
        cams = {
            (c.device_id, c.camera): c
            for c in DriftCamera.select().where(DriftCamera.device.in_(devices))
            if (c.device_id, c.camera) in keys
        }
        # Their open activations in one query (not one per camera).
        open_ids = {c.activation_id for c in cams.values() if c.activation_id is not None}
        acts = {a.id: a for a in DriftActivation.select().where(DriftActivation.id.in_(open_ids))}
        for c in cams.values():
            if c.activation_id in acts:
                c.activation = acts[c.activation_id]
        new_cams: list[DriftCamera] = []
        changed: dict[tuple[str, str], DriftCamera] = {}
        judged_acts: dict[int, DriftActivation] = {}
        watched: dict[tuple[str, str], DriftActivation] = {}  # by camera: the watch now
        self._verdict_rows: list[dict] = []
        rolled = False
        rows.sort(key=lambda r: (r.device_id, r.camera, r.start, r.id))
        # Each camera's first activation in this pass, made in bulk before judging.
        premade = self._activate_many(rows, cams, at) if self.options.bulk_activations else {}
        for row in rows:
            key = (row.device_id, row.camera)
            cam = cams.get(key)
            if cam is None:  # first window seen: its model is the camera's baseline
                cam = cams[key] = DriftCamera(
                    device=row.device_id,
                    camera=row.camera,
                    model=row.model,
                    last_start=row.start,
                    updated_at=at,
                )
                new_cams.append(cam)
                if self.options.watch:  # and the first window of its watch's baseline
                    cam.activation = watched[key] = drift_watch.new_watch(*key, row, None, at)
                continue
            act = cam.activation
            if row.start < cam.last_start or (act is not None and row.start < act.started_at):
                continue  # a late window from before what we know: its model is history
            if row.model != cam.model:
                if key in watched and watched[key].id is None:
                    del watched[key]  # a watch made in this pass, never written: moot
                # The camera row changes only here (an activation), not per window.
                made = premade.pop(key, None)
                act = made[1] if made is not None and made[0] == row.id else None
                act = cam.activation = act or self._activate(cam, row, at)
                cam.model, cam.last_start, cam.updated_at = row.model, row.start, at
                if cam.id is not None:
                    changed[key] = cam
                out["activations"] = out.get("activations", 0) + 1
            if act is not None and act.state == "judging":
                verdict = self._judge(act, row, at)
                judged_acts[act.id] = act
                out[verdict] = out.get(verdict, 0) + 1
                rolled = rolled or verdict == "model_drift"
            elif self.options.watch and (act is None or act.state in drift_watch.WATCH_AFTER):
                # The model is settled: its own windows become a watch's baseline.
                cam.activation = watched[key] = drift_watch.new_watch(*key, row, act, at)
                if cam.id is not None:
                    changed[key] = cam
            elif act is not None and act.state == drift_watch.WATCHING:
                watched[key] = act
                verdict = self._watch(act, row, at)
                if verdict is not None:
                    out[f"watch_{verdict}"] = out.get(f"watch_{verdict}", 0) + 1
        if premade:  # never met (the scan mirrors the loop, so this is a safety net)
            DriftActivation.delete().where(
                DriftActivation.id.in_([a.id for _, a in premade.values()])
            ).execute()
        self._save_watches(watched, cams, changed)
        # Written in bulk: a pass over a fleet's windows is a handful of statements.
        for i in range(0, len(self._verdict_rows), BULK):
            DriftVerdict.insert_many(self._verdict_rows[i : i + BULK]).execute()
        if judged_acts:
            # Never NULL, so one CASE statement per batch works on PostgreSQL too; the
            # rare state changes (rollback, environment, accepted) are saved as they happen.
            DriftActivation.bulk_update(
                list(judged_acts.values()),
                fields=[DriftActivation.recent, DriftActivation.recent_ids, DriftActivation.judged],
                batch_size=BULK,
            )
        # New cameras and those with a new activation, as upserts on (device, camera).
        upserts = [
            {
                "device": c.device_id,
                "camera": c.camera,
                "model": c.model,
                "last_start": c.last_start,
                "activation": c.activation_id,
                "updated_at": at,
            }
            for c in [*new_cams, *changed.values()]
        ]
        for i in range(0, len(upserts), BULK):
            DriftCamera.insert_many(upserts[i : i + BULK]).on_conflict(
                conflict_target=[DriftCamera.device, DriftCamera.camera],
                preserve=[
                    DriftCamera.model,
                    DriftCamera.last_start,
                    DriftCamera.activation,
                    DriftCamera.updated_at,
                ],
            ).execute()
        top = max(r.id for r in rows)
        DriftCursor.insert(name=self.name, last_id=top, updated_at=at).on_conflict(
            conflict_target=[DriftCursor.name],
            update={DriftCursor.last_id: top, DriftCursor.updated_at: at},
        ).execute()
        return len(rows), len(rows) == self.options.batch, rolled

    # -- activations -----------------------------------------------------------------

    def _activate(self, cam: DriftCamera, row: DriftSummary, at: float) -> DriftActivation:
        base_rows = drift_baselines.read_baseline(
            row.device_id, row.camera, cam.model, row.start, self.options.baseline_windows
        )
        return DriftActivation.create(
            **self._activation_values(row, cam.model, cam.activation, base_rows, at)
        )

    def _activate_many(
        self, rows: list[DriftSummary], cams: dict[tuple[str, str], DriftCamera], at: float
    ) -> dict[tuple[str, str], tuple[int, DriftActivation]]:
        """Each camera's first activation in ``rows``, its baseline read and its row
        created in bulk (`drift_baselines`); by camera: (the row's id, activation)."""
        planned = drift_baselines.first_activations(rows, cams)
        wanted = [(d, c, prev, row.start) for (d, c), (row, prev) in planned.items() if prev]
        bases = drift_baselines.read_baselines(self.db, wanted, self.options.baseline_windows)
        values = []
        for key, (row, prev) in planned.items():
            cam = cams.get(key)
            prior = cam.activation if cam is not None else None
            if key in bases:
                base_rows = bases[key]
            else:  # no previous model name (NULL): the one-camera query matches it
                base_rows = drift_baselines.read_baseline(
                    *key, prev, row.start, self.options.baseline_windows
                )
            values.append(self._activation_values(row, prev, prior, base_rows, at))
        made = drift_baselines.insert_activations(self.db, values)
        return {key: (planned[key][0].id, act) for key, act in made.items()}

    def _activation_values(
        self,
        row: DriftSummary,
        previous: str | None,
        prior: DriftActivation | None,
        base_rows: list[tuple[int, str]],
        at: float,
    ) -> dict:
        """The activation row for ``row`` (the new model's first window) after
        ``previous``, judged against ``base_rows`` ((id, payload) of its windows)."""
        pooled = (
            WindowStats.pool(WindowStats.from_summary(json.loads(body)) for _, body in base_rows)
            if base_rows
            else None
        )
        if prior is not None and prior.state != "restored" and row.model == prior.previous_model:
            # Back on the model it ran before (our rollback, or the agent's own
            # probation): never judged against the model it replaced. Not after a
            # restore: moving again to the model it was taken back from is a new
            # activation (a rejected version deployed again), judged like any other.
            state = "restored"
        elif pooled is None or pooled.detections < self.settings.min_detections:
            state = "no_baseline"
        else:
            state = "judging"
        return {
            "device": row.device_id,
            "camera": row.camera,
            "model": row.model,
            "previous_model": previous,
            "started_at": row.start,
            "baseline": json.dumps(pooled.to_dict()) if pooled is not None else None,
            "baseline_ids": json.dumps(sorted(i for i, _ in base_rows)),
            "state": state,
            "created_at": at,
        }

    # -- one window ------------------------------------------------------------------

    def _judge(self, act: DriftActivation, row: DriftSummary, at: float) -> str:
        s = self.settings
        base = getattr(act, "_base", None)
        if base is None:  # parsed once per pass, not per window
            base = act._base = WindowStats(**json.loads(act.baseline))
        new = WindowStats.from_summary(json.loads(row.payload))
        shadow = self.shadow(row, act.previous_model) if self.shadow is not None else None
        j = compare(
            base,
            new,
            s,
            agreement=shadow.agreement if shadow else None,
            previous_model=shadow.previous_window if shadow else None,
        )
        verdict = j.verdict
        if verdict != "not_judged":
            flag = {"breach": "b", "environment": "e"}.get(verdict, "o")
            act.recent = (act.recent + flag)[-s.n :]
            act.recent_ids = json.dumps([*json.loads(act.recent_ids), row.id][-s.n :])
        act.judged += 1
        evidence = {
            "statistics": j.statistics,
            "thresholds": j.thresholds,
            "breaches": j.breaches,
        }
        if verdict == "breach" and confirmed((c == "b" for c in act.recent), s.k, s.n):
            verdict = "model_drift"
        elif (
            verdict == "environment"
            and act.environment_at is None
            and confirmed((c == "e" for c in act.recent), s.k, s.n)
        ):
            act.environment_at = at
            act.save(only=[DriftActivation.environment_at])
            audit(
                ACTOR,
                "drift.environment",
                f"device:{row.device_id}/camera:{row.camera}",
                j.reason,
                model=row.model,
                previous_model=act.previous_model,
                environment=j.environment,
                windows=json.loads(act.recent_ids),
                activation=act.id,
                **evidence,
            )
        self._verdict_rows.append(
            {
                "summary": row.id,
                "activation": act.id,
                "device": row.device_id,
                "camera": row.camera,
                "model": row.model,
                "baseline_model": act.previous_model,
                "start": row.start,
                "end": row.end,
                "verdict": verdict,
                "statistics": json.dumps(j.statistics),
                "thresholds": json.dumps(j.thresholds),
                "breaches": json.dumps(j.breaches),
                "reason": j.reason,
                "created_at": at,
            }
        )
        if verdict == "model_drift" and act.rolled_back_at is None:
            self._roll_back(act, row, evidence, at)
            act.save()
        elif act.judged >= self.options.judge_windows:
            act.state = "accepted"
            act.save()
        return verdict

    def _roll_back(self, act: DriftActivation, row: DriftSummary, evidence: dict, at: float):
        """Deploy the previous version on this camera; audit the evidence either way."""
        act.rolled_back_at = at
        act.state = "rolled_back"
        target = f"device:{row.device_id}/camera:{row.camera}"
        new = model_version(row.model)
        prev = model_version(act.previous_model)
        details = {
            "model": new[0] if new else row.model,
            "version": new[1] if new else None,
            "previous_model": prev[0] if prev else act.previous_model,
            "previous_version": prev[1] if prev else None,
            "model_file": row.model,
            "previous_model_file": act.previous_model,
            "windows": json.loads(act.recent_ids),
            "baseline_windows": json.loads(act.baseline_ids),
            "activation": act.id,
            "k": self.settings.k,
            "n": self.settings.n,
            **evidence,
        }
        reason = f"model drift confirmed in {self.settings.k} of {self.settings.n} windows"
        problem = None
        if self.registry is None:
            problem = "the judge has no model registry to deploy with"
        elif prev is None:
            problem = f"previous model {act.previous_model!r} is not a registry version"
        else:
            try:
                _, dep = self.registry.deploy(
                    row.device_id,
                    row.camera,
                    prev[0],
                    prev[1],
                    actor=ACTOR,
                    reason=f"drift rollback: {reason}",
                    topics=self.topics,
                )
                details["desired_version"] = dep["desired_version"]
            except RegistryError as exc:
                problem = f"deploy failed: {exc}"
        if problem is None:
            audit(ACTOR, "drift.rollback", target, reason, **details)
            log.warning("drift: %s rolled back to %s v%s (%s)", target, *prev, reason)
        else:
            audit(ACTOR, "drift.rollback_failed", target, f"{reason}; {problem}", **details)
            log.error("drift: %s needs a rollback but %s", target, problem)

    # -- the environment watch (a camera whose model did not change) -------------------

    def _watch(self, act: DriftActivation, row: DriftSummary, at: float) -> str | None:
        return drift_watch.judge_window(self, act, row, at)

    def _save_watches(self, watched, cams, changed) -> None:
        drift_watch.save_watches(self.db, watched, cams, changed)

    # -- periodic job ----------------------------------------------------------------

    def start(self, interval_s: float = 60.0) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="drift-judge", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with self.db.connection_context():
                    done = self.run_once()
                if done.get("model_drift") or done.get("environment"):
                    log.info("drift judge pass: %s", done)
            except Exception:
                log.exception("drift judge pass failed; trying again in %.0f s", interval_s)


def verdicts(
    device: str | None = None,
    camera: str | None = None,
    *,
    limit: int = 100,
    before: int | None = None,
    verdict: str | None = None,
) -> list[dict]:
    """Stored verdicts, newest first, optionally of one device, camera or verdict."""
    q = DriftVerdict.select().order_by(DriftVerdict.id.desc()).limit(limit)
    if verdict is not None:
        q = q.where(DriftVerdict.verdict == verdict)
    if device is not None:
        q = q.where(DriftVerdict.device == device)
    if camera is not None:
        q = q.where(DriftVerdict.camera == camera)
    if before is not None:
        q = q.where(DriftVerdict.id < before)
    return [verdict_dict(v) for v in q]


def verdict_dict(v: DriftVerdict) -> dict:
    return {
        "id": v.id,
        "summary": v.summary,
        "activation": v.activation_id,
        "device": v.device_id,
        "camera": v.camera,
        "model": v.model,
        "baseline_model": v.baseline_model,
        "start": v.start,
        "end": v.end,
        "verdict": v.verdict,
        "statistics": json.loads(v.statistics),
        "thresholds": json.loads(v.thresholds),
        "breaches": json.loads(v.breaches),
        "reason": v.reason,
        "created_at": v.created_at,
    }
