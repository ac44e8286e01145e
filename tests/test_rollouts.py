"""Staged rollouts with real components, on SQLite and PostgreSQL.

The state machine is driven two ways: step by step with explicit clock times (no
broker; what each step decides), and end to end: ten simulated devices
(tests/simdevices.py: the agent's MQTT client code and the contract's payloads, on a
real Mosquitto) that report activations, probation rollbacks and health beats, the
registry's real ingest worker storing them, its commands outbox publishing the desired
states, and the rollout job stepping the rollout. Soak times are 1-1.5 s.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.errors import RegistryError
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.fleet.groups import set_group
from flowfleet.registry.fleet.rollout_gates import default_gates
from flowfleet.registry.fleet.rollout_job import LEASE, RolloutJob
from flowfleet.registry.fleet.rollout_plan import assign_waves, parse_plan
from flowfleet.registry.fleet.rollout_steps import RolloutStepper
from flowfleet.registry.fleet.rollouts import (
    abort_rollout,
    create_rollout,
    get_rollout,
    list_rollouts,
    pause_rollout,
    resume_rollout,
)
from flowfleet.registry.fleet.shadow import agreement_source
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.store import leases
from flowfleet.registry.store.audit import audit
from flowfleet.registry.store.db import AuditEntry, Command, Deployment, DesiredCounter
from flowfleet.registry.store.rollout_tables import Rollout, RolloutDevice
from tests.simdevices import start_fleet, stop_fleet

MODEL = "yolo"
FILES = ("yolov8n_full_integer_quant.tflite", "yolov8n_int8_dynamic.tflite")  # v1, v2
CAMERA = "front"
DEVICES = [f"sim-{i:02d}" for i in range(10)]
# Short soaks; beat and activation timeouts with room for a loaded test machine (the
# simulated devices beat every 0.2 s and answer at once).
FAST = {"soak_s": 1.0, "timeout_s": 10.0, "beat_timeout_s": 2.5}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def two_versions(registry, data) -> None:
    for f in FILES:
        registry.add_version(data / "models" / f, name=MODEL, filename=f, actor="test")


def deployed(device: str) -> int:
    return Deployment.get(Deployment.device == device, Deployment.camera == CAMERA).version


def actions(action: str, target: str | None = None) -> list[AuditEntry]:
    query = AuditEntry.select().where(AuditEntry.action == action)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    return list(query.order_by(AuditEntry.id))


def state_of(rollout_id: int) -> str:
    return Rollout.get_by_id(rollout_id).state


# -- validation: bad input names the field and creates nothing ------------------------

BAD = [
    ({"model": "nope"}, 404, "model"),
    ({"ref": 9}, 404, "version"),
    ({"ref": "no-such-alias"}, 404, "version"),
    ({"camera": "bad camera"}, 400, "camera"),
    ({"targets": {}}, 400, "targets"),
    ({"targets": {"devices": ["a"], "all": True}}, 400, "targets"),
    ({"targets": {"devices": ["bad id!"]}}, 400, "targets.devices"),
    ({"targets": {"groups": ["nope"]}}, 404, "group"),
    ({"targets": {"tags": ["nobody-has-it"]}}, 409, "targets"),
    ({"targets": {"colour": "red"}}, 400, "targets.colour"),
    ({"plan": {"waves": 0}}, 400, "plan.waves"),
    ({"plan": {"soak_s": -1}}, 400, "plan.soak_s"),
    ({"plan": {"rate_per_minute": 0}}, 400, "plan.rate_per_minute"),
    ({"plan": {"rate_growth": 0.5}}, 400, "plan.rate_growth"),
    ({"plan": {"abort": {"failed_percent": 101}}}, 400, "plan.abort.failed_percent"),
    ({"plan": {"canary": {"count": 1, "percent": 5}}}, 400, "plan.canary"),
    ({"plan": {"canary": {"devices": ["stranger"]}}}, 400, "plan.canary.devices"),
    ({"plan": {"sook_s": 5}}, 400, "plan.sook_s"),
]


def test_bad_input_names_the_field_and_creates_nothing(registry, data):
    """Every row of BAD on one registry (one registry per row would cost a second
    each): the refusal's status and field, and nothing stored."""
    two_versions(registry, data)
    for change, status, field in BAD:
        args = {
            "model": MODEL,
            "ref": 2,
            "camera": CAMERA,
            "targets": {"devices": DEVICES[:3]},
            "plan": None,
        }
        args.update(change)
        with pytest.raises(RegistryError) as err:
            create_rollout(registry, actor="test", **args)
        got = (err.value.status, err.value.field)
        assert got == (status, field), f"{change}: {got} {err.value.message}"
        if field.startswith("plan"):
            assert err.value.message.startswith(f"{field}: "), err.value.message
        assert Rollout.select().count() == 0, change
        assert RolloutDevice.select().count() == 0, change
        assert not actions("rollout.create"), change


def test_targets_resolve_devices_groups_tags_and_the_fleet(registry, data):
    two_versions(registry, data)
    set_group(registry.db, "north", ["g-1", "g-2"], actor="test")
    from flowfleet.registry.fleet.devices import create_device

    create_device(registry.db, "t-1", {"tags": ["lobby", "pi5"]}, actor="test")
    create_device(registry.db, "t-2", {"tags": ["lobby"]}, actor="test")

    def devices(targets):
        r = create_rollout(
            registry, model=MODEL, ref=2, camera=CAMERA, targets=targets, actor="test"
        )
        stepper = RolloutStepper(registry)
        abort_rollout(registry.db, r["id"], actor="test", stepper=stepper)  # frees them
        return sorted(d["device"] for w in r["waves"] for d in w["devices"])

    assert devices({"devices": ["x-1"], "groups": ["north"]}) == ["g-1", "g-2", "x-1"]
    assert devices({"tags": ["lobby", "pi5"]}) == ["t-1"]
    assert devices({"tags": ["lobby"]}) == ["t-1", "t-2"]
    assert devices({"all": True}) == ["t-1", "t-2"]  # every device record


def test_waves_are_reproducible_from_the_recorded_seed():
    devices = [f"d-{i:03d}" for i in range(100)]
    plan = parse_plan({"canary": {"percent": 5}, "waves": 3})
    a = assign_waves(devices, plan, seed=42)
    assert a == assign_waves(devices, plan, seed=42)
    assert a != assign_waves(devices, plan, seed=43)
    sizes = [sum(1 for w in a.values() if w == n) for n in range(4)]
    assert sizes == [5, 31, 32, 32]
    named = assign_waves(devices, parse_plan({"canary": {"devices": ["d-007"]}}), seed=1)
    assert [d for d, w in named.items() if w == 0] == ["d-007"]


def test_a_device_in_an_active_rollout_is_refused_a_second_one(registry, data):
    two_versions(registry, data)
    first = create_rollout(
        registry, model=MODEL, ref=2, camera=CAMERA, targets={"devices": ["a", "b"]}, actor="t"
    )
    with pytest.raises(RegistryError) as err:
        create_rollout(
            registry, model=MODEL, ref=2, camera=CAMERA, targets={"devices": ["b"]}, actor="t"
        )
    assert (err.value.status, err.value.code) == (409, "busy")
    assert [r["id"] for r in list_rollouts()] == [first["id"]]


# -- the state machine, step by step with explicit times (no broker) -------------------


def test_steps_move_waves_at_the_rate_time_out_and_pause(registry, data):
    """Canary of one, then one wave of four at 4 devices a minute; a device that never
    reports is timed out and put back on v1; pause stops moves, resume continues."""
    two_versions(registry, data)
    devices = ["a", "b", "c", "d", "e"]
    for d in devices:
        registry.deploy(d, CAMERA, MODEL, 1, actor="test")
    plan = {
        **FAST,
        "timeout_s": 30,
        "canary": {"devices": ["a"]},
        "waves": 1,
        "rate_per_minute": 4,
        "abort": {"min_finished": 5, "timed_out_percent": 100, "canary_failures": 1},
    }
    r = create_rollout(
        registry,
        model=MODEL,
        ref=2,
        camera=CAMERA,
        targets={"devices": devices},
        plan=plan,
        actor="test",
    )
    rid = r["id"]
    stepper = RolloutStepper(registry)
    t0 = time.time()
    assert stepper.step(rid, t0)  # the canary moves
    assert deployed("a") == 2 and deployed("b") == 1
    assert RolloutDevice.get(device="a").state == "moving"
    assert not stepper.step(rid, t0 + 1)  # nothing reported yet: nothing changes
    # Past the timeout without a report: timed out, back on v1 at once.
    assert stepper.step(rid, t0 + 31)
    a = RolloutDevice.get(device="a")
    assert a.state == "timed_out" and deployed("a") == 1
    assert "no activation reported within 30 s" in a.reason and "back on yolo v1" in a.reason
    assert a.revert_desired_version == DesiredCounter.get_by_id("a").last_version == 3
    # One canary failure is allowed (canary_failures 1): wave 1 opens, 4/min -> 1 now.
    assert Rollout.get_by_id(rid).wave == 1
    moved = [rd.device for rd in RolloutDevice.select() if rd.state == "moving"]
    assert len(moved) == 1
    pause_rollout(registry.db, rid, actor="op", reason="lunch")
    assert not stepper.step(rid, t0 + 40)  # paused: no new moves
    assert sum(rd.state == "moving" for rd in RolloutDevice.select()) == 1
    resume_rollout(registry.db, rid, actor="op")
    assert stepper.step(rid, t0 + 47)  # 16 s into the wave at 4/min: 2 moved in all
    assert sum(rd.state == "moving" for rd in RolloutDevice.select()) == 2
    with pytest.raises(RegistryError) as err:
        resume_rollout(registry.db, rid, actor="op")
    assert err.value.status == 409
    shown = abort_rollout(registry.db, rid, actor="op", reason="enough", stepper=stepper)
    assert shown["state"] == "aborted"
    assert all(deployed(d) == 1 for d in devices), "every moved device is back on v1"
    states = {d["device"]: d["state"] for w in shown["waves"] for d in w["devices"]}
    assert sorted(states.values()) == ["pending", "pending", "reverted", "reverted", "timed_out"]
    assert [e.actor for e in actions("rollout.pause")] == ["op"]
    assert [e.reason for e in actions("rollout.abort")] == ["enough"]
    assert len(actions("rollout.aborted")) == 1
    # The rollback desired states are queued for the devices (published after commit).
    queued = Command.select().where(Command.device == "b").count()
    assert queued == DesiredCounter.get_by_id("b").last_version


def test_the_lease_has_one_holder_until_it_expires(registry):
    db = registry.db
    assert leases.acquire(db, LEASE, "a", 0.3)
    assert not leases.acquire(db, LEASE, "b", 0.3)
    assert leases.acquire(db, LEASE, "a", 0.3)  # renewed
    time.sleep(0.35)
    assert leases.acquire(db, LEASE, "b", 0.3)  # a stopped renewing
    assert not leases.acquire(db, LEASE, "a", 0.3)
    leases.release(db, LEASE, "b")
    assert leases.acquire(db, LEASE, "a", 0.3)
    assert leases.holder_of(LEASE)["holder"] == "a"


# -- end to end: simulated devices over a real broker ---------------------------------


class Rig:
    """The registry's moving parts on one database: ingest, commands, the rollout job."""

    def __init__(self, db_url: str, registry, address: BrokerAddress, client_id: str) -> None:
        self.registry = registry
        self.worker = IngestWorker(db_url, address, Topics(), client_id=client_id)
        # A short ack timeout: a desired state sent just before a restart and not
        # acknowledged is sent again within a second (10 s by default).
        self.commands = CommandPublisher(
            registry.db, self.worker.connection, tick_s=0.1, ack_timeout_s=1.0
        )
        self.stepper = RolloutStepper(registry, commands=self.commands)
        self.job = RolloutJob(self.stepper, tick_s=0.1, lease_s=1.0)

    def start(self, *, job: bool = True) -> Rig:
        assert self.worker.start(wait=10), "ingest did not connect"
        self.commands.start()
        if job:
            self.job.start()
        return self

    def stop(self, *, release: bool = True) -> None:
        self.job.stop(release=release)
        self.commands.stop()
        self.worker.stop()


@pytest.fixture
def fleet(registry, broker, db_url, data):
    """Ten simulated devices running yolo v1 on camera front (deployed and reported),
    and a started rig without its rollout job; yields (rig, {device: SimDevice})."""
    two_versions(registry, data)
    address = BrokerAddress(broker.host, broker.port)
    rig = Rig(db_url, registry, address, f"reg-{uuid.uuid4().hex[:8]}").start(job=False)
    sims = start_fleet(address, DEVICES, camera=CAMERA, beat_s=0.2)
    try:
        for d in DEVICES:
            registry.deploy(d, CAMERA, MODEL, 1, actor="test")
        rig.commands.wake()
        wait_for(lambda: all(s.running == (MODEL, 1) for s in sims), 15, "v1 everywhere")
        yield rig, {s.device: s for s in sims}
    finally:
        stop_fleet(sims)
        rig.stop()


def create(registry, plan: dict, targets=None) -> int:
    r = create_rollout(
        registry,
        model=MODEL,
        ref=2,
        camera=CAMERA,
        targets=targets or {"devices": DEVICES},
        plan={**FAST, **plan},
        actor="test",
        reason="new model",
    )
    return r["id"]


def wave(rollout_id: int, n: int) -> list[str]:
    return [d["device"] for d in get_rollout(rollout_id)["waves"][n]["devices"]]


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [("rollback", "rolled_back"), ("silent_rollback", "rolled_back"), ("stop_beating", "failed")],
)
def test_a_canary_that_fails_its_health_gate_aborts_and_nobody_else_gets_the_model(
    fleet, registry, behaviour, kind
):
    rig, sims = fleet
    for s in sims.values():
        s.behaviours[(MODEL, 2)] = behaviour  # whichever device is picked fails
    rid = create(registry, {"canary": {"count": 1}, "waves": 3})
    (canary,) = wave(rid, 0)
    rig.job.start()
    wait_for(lambda: state_of(rid) == "aborted", 20, "the rollout to abort")
    shown = get_rollout(rid)
    assert shown["reason"].startswith("canary failed"), shown["reason"]
    c = shown["waves"][0]["devices"][0]
    assert c["state"] == kind, c
    assert "back on yolo v1" in c["reason"]
    for device, sim in sims.items():
        if device != canary:
            assert sim.versions_sent(MODEL) == [1], f"{device} was sent v2"
    assert deployed(canary) == 1
    wait_for(lambda: sims[canary].versions_sent(MODEL) == [1, 2, 1], 10, "the rollback sent")
    wait_for(lambda: sims[canary].running == (MODEL, 1), 10, "the canary back on v1")
    assert len(actions("rollout.move")) == 1
    assert len(actions("rollout.abort")) == len(actions("rollout.aborted")) == 1


@pytest.mark.parametrize(("agreement", "outcome"), [(0.4, "aborted"), (0.95, "succeeded")])
def test_a_canary_first_runs_the_model_in_shadow_and_disagreeing_counts_stop_it_unmoved(
    fleet, registry, agreement, outcome
):
    rig, sims = fleet
    for s in sims.values():
        s.shadow_agreement[(MODEL, 2)] = agreement
    plan = {"canary": {"devices": ["sim-00"]}, "waves": 1, "shadow_s": 1.5}
    rid = create(registry, plan)
    rig.job.start()
    wait_for(lambda: state_of(rid) == outcome, 30, f"the rollout to end {outcome}")
    canary = sims["sim-00"]
    # The canary was asked to run v2 in shadow beside v1, and sent windows about it.
    assert any(d.shadow and d.shadow[CAMERA].model.version == 2 for d in canary.received)
    assert canary.shadow_windows_sent >= 1
    assert len(actions("rollout.shadow")) == 1
    c = get_rollout(rid)["waves"][0]["devices"][0]
    assert c["shadow_agreement"] == agreement
    wait_for(lambda: canary.shadowing is None, 10, "the shadow comparison to stop")
    if outcome == "aborted":
        assert c["state"] == "failed" and c["moved_at"] is None, c
        assert "shadow comparison: counts agree 0.40 < 0.7" in c["reason"], c["reason"]
        for d, sim in sims.items():
            assert set(sim.versions_sent(MODEL)) == {1}, f"{d} was sent v2 to run"
            assert deployed(d) == 1
    else:
        assert c["state"] == "succeeded", c
        assert all(deployed(d) == 2 for d in DEVICES)


def test_a_moved_canary_runs_its_previous_model_in_shadow_through_the_soak(fleet, registry):
    """Plan ``soak_shadow``: once moved, the canary runs v1 in shadow beside v2, and
    the count-agreement gate (the registry's shadow source) judges it during the soak:
    counts that disagree fail it, the comparison stops, it goes back to v1. (A gate
    that passes on shadow data: test_the_count_agreement_gate_judges_only_with_shadow_data.)
    """
    agreement, outcome = 0.4, "aborted"
    rig, sims = fleet
    rig.stepper.gates = default_gates(agreement_source())
    for s in sims.values():
        s.shadow_agreement[(MODEL, 1)] = agreement  # the previous model, beside v2
    plan = {"canary": {"devices": ["sim-00"]}, "waves": 1, "soak_s": 2.0, "soak_shadow": True}
    rid = create(registry, plan)
    rig.job.start()
    wait_for(lambda: state_of(rid) == outcome, 30, f"the rollout to end {outcome}")
    canary = sims["sim-00"]
    assert any(
        d.shadow and d.shadow[CAMERA].model.version == 1 and d.models[CAMERA].version == 2
        for d in canary.received
    ), "the canary was asked to run v1 in shadow beside v2"
    assert canary.shadow_windows_sent >= 1
    wait_for(lambda: canary.shadowing is None, 10, "the shadow comparison to stop")
    c = get_rollout(rid)["waves"][0]["devices"][0]
    others = [s for d, s in sims.items() if d != "sim-00"]
    assert not any(d.shadow for s in others for d in s.received), "only the canary"
    assert c["state"] == "failed", c
    assert "count agreement 0.40 with the previous model < 0.7" in c["reason"], c
    assert "back on yolo v1" in c["reason"]
    wait_for(lambda: canary.running == (MODEL, 1), 10, "the canary back on v1")
    assert all(s.versions_sent(MODEL) == [1] for s in others)
    # The comparison stopped before the rollback: the last desired state has no shadow.
    assert canary.received[-1].shadow is None and canary.received[-1].models[CAMERA].version == 1


def test_a_camera_without_a_registry_model_before_is_named_not_silently_left(
    fleet, registry, broker
):
    """A failed device whose camera ran no registry model before the rollout (its
    configured file) cannot be put back: its reason says so, `rollout.not_reverted` is
    audited, the create entry counts such devices, and nothing else is deployed to it."""
    rig, _ = fleet
    (fresh,) = start_fleet(BrokerAddress(broker.host, broker.port), ["sim-new"], camera=CAMERA)
    try:
        fresh.behaviours[(MODEL, 2)] = "rollback"
        rid = create(
            registry, {"canary": {"devices": ["sim-new"]}, "waves": 1}, {"devices": ["sim-new"]}
        )
        (created,) = actions("rollout.create")
        details = json.loads(created.details)
        assert (details["without_previous"], details["without_previous_devices"]) == (
            1,
            ["sim-new"],
        )
        rig.job.start()
        wait_for(lambda: state_of(rid) == "aborted", 20, "the rollout to abort")
        c = get_rollout(rid)["waves"][0]["devices"][0]
        assert c["state"] == "rolled_back" and c["previous"] is None, c
        assert "not rolled back: the camera ran no registry model before" in c["reason"], c
        (entry,) = actions("rollout.not_reverted", f"device:sim-new/camera:{CAMERA}")
        assert json.loads(entry.details)["version"] == 2
        assert deployed("sim-new") == 2  # nothing signed to go back to
        assert fresh.versions_sent(MODEL) == [2]
    finally:
        stop_fleet([fresh])


def test_three_of_ten_failing_after_the_first_wave_abort_and_roll_every_moved_device_back(
    fleet, registry
):
    rig, sims = fleet
    plan = {
        "canary": {"devices": ["sim-00"]},
        "waves": 3,
        "soak_s": 1.5,
        "seed": 7,
        "abort": {"min_finished": 4, "drifted_percent": 50, "rolled_back_percent": 50},
    }
    rid = create(registry, plan)
    first = wave(rid, 1)
    assert len(first) == 3
    sims[first[0]].behaviours[(MODEL, 2)] = "rollback"  # probation rollback on the device
    drifting = first[1:]
    rig.job.start()

    def moved(device):
        return RolloutDevice.get(device=device).moved_at is not None

    wait_for(lambda: all(moved(d) for d in drifting), 15, "wave 1 to move")
    for d in drifting:  # what the drift judge writes when it rolls a camera back
        audit("drift-judge", "drift.rollback", f"device:{d}/camera:{CAMERA}", "psi 0.41 > 0.2")
    wait_for(lambda: state_of(rid) == "aborted", 20, "the rollout to abort")
    shown = get_rollout(rid)
    assert "of 4 finished devices" in shown["reason"], shown["reason"]
    assert shown["failures"] == {"failed": 0, "rolled_back": 1, "timed_out": 0, "drifted": 2}
    states = {d["device"]: d for w in shown["waves"] for d in w["devices"]}
    assert states["sim-00"]["state"] == "reverted"
    assert states[first[0]]["state"] == "rolled_back"
    for d in drifting:
        assert states[d]["state"] == "drifted"
        assert "drift alarm by drift-judge: psi 0.41" in states[d]["reason"]
    moved_devices = ["sim-00", *first]
    for d in DEVICES:
        assert deployed(d) == 1
        sim = sims[d]
        if d in moved_devices:
            # The last desired state the device received names v1 again.
            wait_for(
                lambda s=sim: (
                    s.versions_sent(MODEL)[-1:] == [1] and len(s.versions_sent(MODEL)) == 3
                ),
                10,
                f"{d} sent back to v1",
            )
            wait_for(lambda s=sim: s.running == (MODEL, 1), 10, f"{d} on v1")
        else:
            assert sim.versions_sent(MODEL) == [1], f"{d} was sent v2"
            assert states[d]["state"] == "pending"


def test_a_registry_restarted_mid_rollout_resumes_it(fleet, registry, broker, db_url):
    rig, sims = fleet
    rid = create(registry, {"canary": {"count": 1}, "waves": 2})
    rig.job.start()
    wait_for(lambda: Rollout.get_by_id(rid).wave >= 1, 15, "wave 1 to start")
    first_holder = rig.job.holder
    rig.stop(release=False)  # as if killed: the lease stays taken until it expires
    assert state_of(rid) == "running"
    again = Rig(db_url, registry, rig.worker.connection.address, rig.worker.connection.client_id)
    again.start()
    try:
        wait_for(lambda: state_of(rid) == "succeeded", 30, "the rollout to finish")
    finally:
        again.stop()
    assert leases.holder_of(LEASE)["holder"] == again.job.holder != first_holder
    assert again.job.ticks > 0
    for d, sim in sims.items():
        assert len(actions("rollout.move", f"device:{d}/camera:{CAMERA}")) == 1
        assert sim.versions_sent(MODEL) == [1, 2]
        assert sim.running == (MODEL, 2) and deployed(d) == 2
    assert len(actions("rollout.succeeded")) == 1
    states = {d["state"] for w in get_rollout(rid)["waves"] for d in w["devices"]}
    assert states == {"succeeded"}


def test_two_runners_on_one_database_run_each_step_once(fleet, registry):
    """Two steppers step the rollout as fast as they can, without the lease: the
    named lock alone keeps every move, wave and the end from happening twice."""
    rig, sims = fleet
    rid = create(registry, {"canary": {"count": 2}, "waves": 2, "soak_s": 1.5})
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(stepper: RolloutStepper) -> None:
        with registry.db.connection_context():
            while not stop.is_set():
                try:
                    stepper.step(rid)
                except BaseException as exc:
                    errors.append(exc)
                    return
                time.sleep(0.01)  # as often as possible, yet leaving ingest a gap

    runners = [
        threading.Thread(target=run, args=(RolloutStepper(registry, commands=rig.commands),))
        for _ in range(2)
    ]
    for t in runners:
        t.start()
    try:
        wait_for(lambda: state_of(rid) == "succeeded" or errors, 30, "the rollout to finish")
    except AssertionError:
        shown = get_rollout(rid)
        rows = [
            (d["device"], d["state"], d["reason"]) for w in shown["waves"] for d in w["devices"]
        ]
        raise AssertionError(f"{shown['state']} wave {shown['wave']}: {rows}") from None
    finally:
        stop.set()
        for t in runners:
            t.join(10)
    assert not errors, errors
    assert state_of(rid) == "succeeded"
    devices = [d for w in get_rollout(rid)["waves"] for d in w["devices"]]
    assert {d["state"] for d in devices} == {"succeeded"}, devices
    for d, sim in sims.items():
        assert len(actions("rollout.move", f"device:{d}/camera:{CAMERA}")) == 1
        assert DesiredCounter.get_by_id(d).last_version == 2  # v1, then v2 once
        assert sim.versions_sent(MODEL) == [1, 2]
    assert [e.details for e in actions("rollout.wave")] == [
        '{"devices": 4, "wave": 1}',
        '{"devices": 4, "wave": 2}',
    ]
    assert len(actions("rollout.succeeded")) == 1


@pytest.mark.parametrize(
    ("agreement", "state", "reason"),
    [
        (None, "succeeded", "count agreement not judged: no shadow comparison"),
        (0.93, "succeeded", "count agreement 0.93"),
        (0.41, "failed", "count_agreement: count agreement 0.41 with the previous model < 0.7"),
    ],
)
def test_the_count_agreement_gate_judges_only_with_shadow_data(
    registry, data, agreement, state, reason
):
    """A device that reported the model active and beats is judged by the gate's
    source during its soak (reports stored by the real ingest code)."""
    from flowfleet.contract import CameraModel, Health, Reported
    from flowfleet.registry.fleet.ingest import Ingestor
    from flowfleet.registry.fleet.rollout_gates import default_gates

    two_versions(registry, data)
    registry.deploy("a", CAMERA, MODEL, 1, actor="test")
    asked = []

    def source(device, camera, since):
        asked.append((device, camera))
        return agreement

    stepper = RolloutStepper(registry, gates=default_gates(source))
    rid = create(registry, {"canary": {"devices": ["a"]}, "soak_s": 10}, {"devices": ["a"]})
    t0 = time.time()
    assert stepper.step(rid, t0)
    rd = RolloutDevice.get(device="a")
    ingest = Ingestor(registry.db, Topics())
    cam = CameraModel(camera=CAMERA, model=MODEL, version=2, update="activated")
    report = Reported(device="a", ts=t0, desired_version=rd.desired_version, cameras=(cam,))
    assert ingest.handle(Topics().reported("a"), report.to_json(), t0 + 1) == "stored"
    assert stepper.step(rid, t0 + 1)
    assert RolloutDevice.get(device="a").state == "soaking"
    beat = Health(device="a", seq=1, ts=t0 + 5, uptime_s=60)
    assert ingest.handle(Topics().health("a"), beat.to_json(), t0 + 5) == "stored"
    # The gate is asked at every step of the soak: a disagreement fails at once,
    # agreement (or no data) waits for the end of the soak.
    assert stepper.step(rid, t0 + 6) == (state == "failed")
    if state != "failed":
        beat = Health(device="a", seq=2, ts=t0 + 10, uptime_s=65)
        assert ingest.handle(Topics().health("a"), beat.to_json(), t0 + 10) == "stored"
        assert stepper.step(rid, t0 + 11.5)
    rd = RolloutDevice.get(device="a")
    assert rd.state == state and reason in rd.reason, rd.reason
    assert asked and asked[0] == ("a", CAMERA)
