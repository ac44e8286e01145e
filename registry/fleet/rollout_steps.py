"""The rollout state machine: one step of a rollout, in one locked transaction.

A step reads the rollout and its device rows, judges the devices in flight
(`rollout_gates.judge`), reverts each device that failed, checks the abort criteria
and, if the rollout still runs, moves the next devices of the current wave (at most
the plan's rate) or opens the next wave once every device of this one finished. An
aborting rollout puts every device it moved back on its previous model. Everything a
step does (device rows, deployments, the desired states queued in the commands
outbox, audit entries) commits together, under the named lock ``rollout:<id>``
(`exclusive`): two registry processes stepping one rollout at once run one after
the other, and the second sees what the first did, so no step happens twice; a
registry that dies mid-step leaves nothing half done.

A step moves or rolls back at most ``batch`` devices per transaction and then
commits and goes on in a new one, so a wave of hundreds of devices does not hold
the database's write lock (SQLite has one) for seconds while ingest waits; on SQLite
it also pauses ``SQLITE_YIELD_S`` between two transactions, or a waiting writer
(whose busy handler polls every 100 ms at most) would rarely get in between them. Every
transaction leaves a consistent state (devices either moved, with their desired
state queued, or still pending), so a crash between two of them loses nothing.

Moves and rollbacks go through `ModelRegistry.deploy`, so each is an ordinary,
audited, signed desired state; the rollout adds ``rollout.move`` and
``rollout.device`` entries (``device:<id>/camera:<camera>``) and ``rollout.wave``,
``rollout.abort``, ``rollout.aborted``, ``rollout.succeeded`` (``rollout:<id>``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import peewee as pw

from ..errors import RegistryError
from ..store.audit import audit
from ..store.db import Deployment, now
from ..store.locks import exclusive
from ..store.rollout_tables import (
    ACTIVE_ROLLOUT_STATES,
    FAILURE_STATES,
    FINISHED_STATES,
    Rollout,
    RolloutDevice,
)
from . import shadow
from .rollout_gates import Gate, Subject, default_gates, gather, judge
from .rollout_plan import Plan

if TYPE_CHECKING:
    from flowfleet.contract import Topics

    from ..catalog.modelreg import ModelRegistry
    from .commands import CommandPublisher

log = logging.getLogger(__name__)

JOB_ACTOR = "rollout-job"
SQLITE_YIELD_S = 0.15
IN_FLIGHT = ("moving", "soaking")
SHADOWING = "shadowing"  # a canary running the new model in shadow, not moved yet


def rollout_target(rollout_id: int) -> str:
    return f"rollout:{rollout_id}"


def device_target(device: str, camera: str) -> str:
    return f"device:{device}/camera:{camera}"


class RolloutStepper:
    """Runs rollout steps against ``registry`` (see the module).

    Args:
        gates: the soak checks besides reported state, beats and drift; default
            `default_gates` (the count-agreement gate, not judged without shadow data).
        commands: woken after a step that queued desired states.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        gates: Iterable[Gate] | None = None,
        commands: CommandPublisher | None = None,
        topics: Topics | None = None,
        batch: int = 25,
    ) -> None:
        self.registry = registry
        self.batch = max(1, batch)
        self.db = registry.db
        self.gates = list(default_gates() if gates is None else gates)
        self.commands = commands
        self.topics = topics

    def step_all(self, at: float | None = None) -> int:
        """One step of every active rollout; returns how many changed something."""
        ids = [
            r.id
            for r in Rollout.select(Rollout.id)
            .where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
            .order_by(Rollout.id)
        ]
        return sum(1 for rollout_id in ids if self.step(rollout_id, at))

    def step(self, rollout_id: int, at: float | None = None) -> bool:
        """One step of one rollout (in as many transactions of at most ``batch`` moves
        or rollbacks as it needs); True when it changed something."""
        changed = False
        while True:
            did, more = self._transaction(rollout_id, at)
            changed = changed or did
            if not more:
                return changed
            if isinstance(self.db, pw.SqliteDatabase):
                time.sleep(SQLITE_YIELD_S)

    def _transaction(self, rollout_id: int, at: float | None) -> tuple[bool, bool]:
        """(changed something, more to do at once)."""
        with exclusive(self.db, rollout_target(rollout_id)):
            r = Rollout.get_or_none(Rollout.id == rollout_id)
            if r is None or r.state not in ACTIVE_ROLLOUT_STATES:
                return False, False
            t = now() if at is None else at
            self._queued = False
            self._budget = self.batch  # moves and rollbacks left in this transaction
            self._more = False
            changed = self._step(r, t)
            if changed:
                r.steps += 1
                r.updated_at = t
                r.save()
        if self._queued and self.commands is not None:
            self.commands.wake()  # committed: publish the desired states now
        return changed, self._more and changed

    def _spend(self) -> bool:
        """Take one move or rollback from this transaction's budget; False when spent
        (the caller leaves the rest to the next transaction)."""
        if self._budget <= 0:
            self._more = True
            return False
        self._budget -= 1
        return True

    # -- one step ------------------------------------------------------------------

    def _step(self, r: Rollout, t: float) -> bool:
        plan = Plan.model_validate_json(r.plan)
        rows = list(
            RolloutDevice.select()
            .where(RolloutDevice.rollout == r)
            .order_by(RolloutDevice.wave, RolloutDevice.device)
        )
        if r.state == "aborting":
            self._finish_abort(r, plan, rows, t)
            return True
        changed = self._judge_shadows(r, plan, rows, t)
        changed = self._judge(r, plan, rows, t) or changed
        reason = abort_reason(plan, rows)
        if reason:
            r.state = "aborting"
            r.reason = reason
            audit(JOB_ACTOR, "rollout.abort", rollout_target(r.id), reason, automatic=True)
            self._finish_abort(r, plan, rows, t)
            return True
        if r.state == "paused":
            return changed
        return self._advance(r, plan, rows, t) or changed

    def _judge(self, r: Rollout, plan: Plan, rows: list[RolloutDevice], t: float) -> bool:
        flying = [rd for rd in rows if rd.state in IN_FLIGHT]
        if not flying:
            return False
        facts = gather(((rd.device, rd.moved_at) for rd in flying), r.camera)
        changed = False
        for rd in flying:
            subject = None
            if rd.state == "soaking":
                subject = Subject(
                    rd.device, r.camera, r.model, r.version, rd.moved_at, rd.activated_at
                )
            j = judge(
                rd.state,
                subject,
                facts[rd.device],
                plan,
                rd.desired_version,
                rd.moved_at,
                r.model,
                r.version,
                t,
                self.gates,
            )
            if j.state == rd.state:
                continue
            if j.state in FAILURE_STATES and not self._spend():
                continue  # its rollback waits for the next transaction
            changed = True
            rd.state = j.state
            rd.reason = j.reason
            if j.activated_at is not None:
                rd.activated_at = j.activated_at
            if j.state in FINISHED_STATES:
                rd.finished_at = t
                if soak_shadowed(plan, rd):
                    self._stop_shadow(r, rd)  # before a rollback, so it runs alone
            if j.state in FAILURE_STATES:
                self._revert(r, rd, t, f"device {j.state}")
            rd.save()
            audit(
                JOB_ACTOR,
                "rollout.device",
                device_target(rd.device, r.camera),
                rd.reason,
                rollout=r.id,
                wave=rd.wave,
                state=rd.state,
                reverted=rd.reverted_at is not None,
            )
        return changed

    def _advance(self, r: Rollout, plan: Plan, rows: list[RolloutDevice], t: float) -> bool:
        if r.wave_started_at is None:
            r.wave_started_at = t
        current = [rd for rd in rows if rd.wave == r.wave]
        if any(rd.state == "pending" for rd in current):
            return self._move_some(r, plan, current, t)
        if any(rd.state in (*IN_FLIGHT, SHADOWING) for rd in current):
            return False
        if r.wave >= r.waves:
            r.state = "succeeded"
            r.finished_at = t
            states = Counter(rd.state for rd in rows)
            audit(JOB_ACTOR, "rollout.succeeded", rollout_target(r.id), "", states=dict(states))
            return True
        r.wave += 1
        r.wave_started_at = t
        nxt = [rd for rd in rows if rd.wave == r.wave]
        audit(JOB_ACTOR, "rollout.wave", rollout_target(r.id), "", wave=r.wave, devices=len(nxt))
        self._move_some(r, plan, nxt, t)
        return True

    def _move_some(self, r: Rollout, plan: Plan, wave: list[RolloutDevice], t: float) -> bool:
        pending = [rd for rd in wave if rd.state == "pending"]
        rate = plan.wave_rate(r.wave) if r.wave > 0 else None
        if rate is not None:
            allowed = math.floor(rate * max(0.0, t - r.wave_started_at) / 60.0) + 1
            pending = pending[: max(0, allowed - (len(wave) - len(pending)))]
        moved = False
        for rd in pending:
            if not self._spend():
                break
            if r.wave == 0 and plan.shadow_s > 0 and rd.shadow_started_at is None:
                self._start_shadow(r, plan, rd, t)
            else:
                self._move(r, plan, rd, t)
            moved = True
        return moved

    # -- the canary's shadow phase ---------------------------------------------------

    def _start_shadow(self, r: Rollout, plan: Plan, rd: RolloutDevice, t: float) -> None:
        """Ask a canary to run the new model beside its current one (a desired state
        with a shadow entry); it is judged by `_judge_shadows`."""
        refused = self._ask_shadow(
            r, plan, rd, r.model, r.version, f"rollout {r.id} canary: shadow comparison"
        )
        if refused is not None:
            self._device_done(r, rd, t, "failed", f"shadow comparison refused: {refused}")
            return
        rd.state, rd.shadow_started_at = SHADOWING, t
        rd.reason = f"running {r.model} v{r.version} in shadow for {plan.shadow_s:g} s"
        rd.save()
        audit(
            JOB_ACTOR,
            "rollout.shadow",
            device_target(rd.device, r.camera),
            rd.reason,
            rollout=r.id,
            wave=rd.wave,
        )

    def _judge_shadows(self, r: Rollout, plan: Plan, rows: list[RolloutDevice], t: float) -> bool:
        """Canaries in their shadow phase: fail one whose counts disagree (it never
        moves); move one whose phase is over (agreeing, or not judged: too few boxes,
        or an agent without shadow comparisons). A paused rollout moves none."""
        changed = False
        for rd in rows:
            if rd.state != SHADOWING:
                continue
            pooled = shadow.shadow_agreement(
                rd.device,
                r.camera,
                rd.shadow_started_at,
                candidate=r.model,
                candidate_version=r.version,
            )
            boxes = pooled["boxes_active"] + pooled["boxes_candidate"]
            judged = boxes >= plan.shadow_min_boxes and pooled["agreement"] is not None
            agreement = pooled["agreement"] if judged else None
            over = t - rd.shadow_started_at >= plan.shadow_s
            failed = agreement is not None and agreement < plan.shadow_min_agreement
            if not failed and (not over or r.state == "paused"):
                continue
            if not self._spend():
                continue  # the next transaction
            changed = True
            rd.shadow_agreement = agreement
            self._stop_shadow(r, rd)
            if failed:
                self._device_done(
                    r,
                    rd,
                    t,
                    "failed",
                    f"shadow comparison: counts agree {agreement:.2f} < "
                    f"{plan.shadow_min_agreement:g} with the current model over {boxes} "
                    "boxes; never moved",
                )
                continue
            found = (
                f"shadow agreement {agreement:.2f}"
                if agreement is not None
                else f"shadow comparison not judged ({boxes} boxes)"
            )
            self._move(r, plan, rd, t)
            if rd.state == "moving":
                rd.reason = f"desired state queued; {found}"
                rd.save()
        return changed

    def _stop_shadow(self, r: Rollout, rd: RolloutDevice) -> None:
        try:
            shadow.clear_shadow(
                self.registry,
                rd.device,
                r.camera,
                actor=rollout_target(r.id),
                reason=f"rollout {r.id}: shadow phase over",
                topics=self.topics,
            )
        except RegistryError as exc:  # cleared by hand already: nothing to stop
            log.info("rollout %d: %s: %s", r.id, rd.device, exc.message)
        else:
            self._queued = True

    def _device_done(self, r: Rollout, rd: RolloutDevice, t: float, state: str, why: str) -> None:
        """A device that finished without being moved (nothing to roll back)."""
        rd.state, rd.reason, rd.finished_at = state, why, t
        rd.save()
        audit(
            JOB_ACTOR,
            "rollout.device",
            device_target(rd.device, r.camera),
            rd.reason,
            rollout=r.id,
            wave=rd.wave,
            state=rd.state,
        )

    def _move(self, r: Rollout, plan: Plan, rd: RolloutDevice, t: float) -> None:
        prev = Deployment.get_or_none(
            (Deployment.device == rd.device) & (Deployment.camera == r.camera)
        )
        rd.previous_model = prev.model if prev is not None else None
        rd.previous_version = prev.version if prev is not None else None
        try:
            _, row = self.registry.deploy(
                rd.device,
                r.camera,
                r.model,
                r.version,
                actor=rollout_target(r.id),
                reason=f"rollout {r.id} wave {rd.wave}",
                topics=self.topics,
            )
        except RegistryError as exc:
            self._device_done(r, rd, t, "failed", f"deploy refused: {exc.message}")
            return
        self._queued = True
        rd.state, rd.reason = "moving", "desired state queued"
        if prev is None:
            rd.reason += "; no registry model before: it cannot be put back if it fails"
        rd.moved_at, rd.desired_version = t, row["desired_version"]
        rd.save()
        audit(
            JOB_ACTOR,
            "rollout.move",
            device_target(rd.device, r.camera),
            f"rollout {r.id} wave {rd.wave}",
            rollout=r.id,
            wave=rd.wave,
            model=r.model,
            version=r.version,
            previous=_version_text(rd.previous_model, rd.previous_version),
            desired_version=rd.desired_version,
        )
        if soak_shadowed(plan, rd):
            self._start_soak_shadow(r, plan, rd)

    def _start_soak_shadow(self, r: Rollout, plan: Plan, rd: RolloutDevice) -> None:
        """A moved canary runs its previous model in shadow through the soak (plan
        ``soak_shadow``): the count-agreement gate's data. A refusal (the previous
        version unsigned since, say) leaves the gate not judged, and says so."""
        refused = self._ask_shadow(
            r,
            plan,
            rd,
            rd.previous_model,
            rd.previous_version,
            f"rollout {r.id} canary: previous model in shadow during the soak",
        )
        if refused is not None:
            rd.reason += f"; no shadow comparison during the soak: {refused}"
            rd.save()

    def _ask_shadow(
        self, r: Rollout, plan: Plan, rd: RolloutDevice, model: str, version: int, reason: str
    ) -> str | None:
        """Queue a desired state running ``model`` v``version`` in shadow on the
        device's rollout camera; returns the registry's refusal, or None."""
        try:
            shadow.set_shadow(
                self.registry,
                rd.device,
                r.camera,
                model,
                version,
                share=plan.shadow_share,
                actor=rollout_target(r.id),
                reason=reason,
                topics=self.topics,
            )
        except RegistryError as exc:
            return exc.message
        self._queued = True
        return None

    def _revert(self, r: Rollout, rd: RolloutDevice, t: float, why: str) -> None:
        """Put the device's camera back on its previous model (a new desired state)."""
        rd.reverted_at = t
        current = Deployment.get_or_none(
            (Deployment.device == rd.device) & (Deployment.camera == r.camera)
        )
        if current is None or (current.model, current.version) != (r.model, r.version):
            now_on = _version_text(current.model, current.version) if current else "nothing"
            rd.reason += f"; not rolled back: its deployment is {now_on} already"
            return
        if rd.previous_model is None:
            # Nothing signed to go back to: the agent would keep the last model it was
            # sent whatever the registry did (a desired state cannot say "your
            # configured file"). Say so where an operator (and a webhook) sees it.
            rd.reason += (
                "; not rolled back: the camera ran no registry model before this rollout "
                f"(its configured file), so it keeps {r.model} v{r.version}; deploy a "
                "model to it by hand"
            )
            audit(
                JOB_ACTOR,
                "rollout.not_reverted",
                device_target(rd.device, r.camera),
                f"rollout {r.id}: {why}; no registry model before the rollout to put back",
                rollout=r.id,
                model=r.model,
                version=r.version,
            )
            return
        try:
            _, row = self.registry.deploy(
                rd.device,
                r.camera,
                rd.previous_model,
                rd.previous_version,
                actor=rollout_target(r.id),
                reason=f"rollout {r.id}: {why}, back to the previous model",
                topics=self.topics,
            )
        except RegistryError as exc:
            rd.reason += f"; rollback refused: {exc.message}"
            return
        self._queued = True
        rd.revert_desired_version = row["desired_version"]
        rd.reason += f"; back on {_version_text(rd.previous_model, rd.previous_version)}"

    def _finish_abort(self, r: Rollout, plan: Plan, rows: list[RolloutDevice], t: float) -> None:
        """Roll back the moved devices (``batch`` per transaction); once none is
        left, the rollout is aborted."""
        for rd in rows:
            if rd.state == SHADOWING:  # never moved: stop its comparison only
                if not self._spend():
                    return
                self._stop_shadow(r, rd)
                rd.state, rd.reason = "pending", "not moved: the rollout was aborted"
                rd.save()
                continue
            if rd.moved_at is None or rd.reverted_at is not None:
                continue
            if not self._spend():
                return  # more in the next transaction; the rollout stays aborting
            if rd.state not in FAILURE_STATES:
                if rd.state in IN_FLIGHT and soak_shadowed(plan, rd):
                    self._stop_shadow(r, rd)
                rd.state, rd.finished_at = "reverted", t
                rd.reason = f"rollout aborted: {r.reason}"
            self._revert(r, rd, t, "rollout aborted")
            rd.save()
            audit(
                JOB_ACTOR,
                "rollout.device",
                device_target(rd.device, r.camera),
                rd.reason,
                rollout=r.id,
                wave=rd.wave,
                state=rd.state,
                reverted=True,
            )
        RolloutDevice.update(reason="not moved: the rollout was aborted").where(
            (RolloutDevice.rollout == r) & (RolloutDevice.state == "pending")
        ).execute()
        reverted = [rd.device for rd in rows if rd.reverted_at is not None]
        r.state, r.finished_at = "aborted", t
        audit(JOB_ACTOR, "rollout.aborted", rollout_target(r.id), r.reason, reverted=reverted)


def soak_shadowed(plan: Plan, rd: RolloutDevice) -> bool:
    """Whether ``rd`` runs its previous model in shadow while it soaks: a moved
    canary of a plan with ``soak_shadow``, that had a registry model before."""
    return (
        plan.soak_shadow
        and rd.wave == 0
        and rd.moved_at is not None
        and rd.previous_model is not None
    )


def abort_reason(plan: Plan, rows: list[RolloutDevice]) -> str:
    """Why the rollout must abort now ("" when it need not)."""
    crit = plan.abort
    canary = [rd for rd in rows if rd.wave == 0 and rd.state in FAILURE_STATES]
    if len(canary) > crit.canary_failures:
        first = canary[0]
        return (
            f"canary failed: {len(canary)} canary device(s) failed (more than "
            f"{crit.canary_failures}); {first.device} {first.state}: {first.reason}"
        )
    finished = [rd for rd in rows if rd.state in FINISHED_STATES]
    n = len(finished)
    if n < crit.min_finished:
        return ""
    kinds = Counter(rd.state for rd in finished)
    for kind in FAILURE_STATES:
        k = kinds.get(kind, 0)
        share = 100.0 * k / n
        if k and share >= crit.percent(kind):
            names = ", ".join(rd.device for rd in finished if rd.state == kind)
            return (
                f"{kind}: {k} of {n} finished devices ({share:.0f}% >= "
                f"{crit.percent(kind):g}%): {names}"
            )
    return ""


def _version_text(model: str | None, version: int | None) -> str:
    return "nothing" if model is None else f"{model} v{version}"
