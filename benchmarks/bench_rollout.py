"""Staged rollout benchmark (issue 16's goal); not a test.

    .venv/bin/python benchmarks/bench_rollout.py [--postgres] [--devices 1000]
        [--canary 10] [--waves 3] [--soak 5] [--beat 2.5] [--tick 0.5] [--json FILE]

A rollout of yolo v2 to ``--devices`` devices running v1: a canary of ``--canary``,
then ``--waves`` waves, each device soaked ``--soak`` seconds, through the registry's
real code on a real database (a temporary SQLite file, or with ``--postgres`` a
temporary database on ``$FLOWFLEET_TEST_POSTGRES``, as the tests use):

* the rollout job's steps (`RolloutStepper.step`, the code the service runs every
  ``--tick`` seconds): judging devices, moving waves through `ModelRegistry.deploy`;
* the commands outbox published by a real `CommandPublisher` on a real
  `MqttConnection` to a private Mosquitto;
* the devices' answers stored by the real ingest code (`Ingestor.handle_batch`).

The devices are simulated in-process: one paho subscriber receives every desired
state the broker delivers, and each device answers at once with a reported state
(the model activated) and sends a health beat every ``--beat`` seconds, both handed
to the ingest code in batches as the ingest worker would (1,000 MQTT connections
would measure the test machine, not the registry).

Reported: the wall time from creation to "succeeded" and how much of it is beyond
the soak times ((1 + waves) x soak: nothing can go faster), and the registry's own
busy time per part (steps, ingest of answers and beats, the publisher's lag).
Then a second rollout back to v1 is aborted after its first wave moved, and the
abort step (every moved device back on its previous model) is timed.
Prints a table and writes JSON (default benchmarks/results/rollout.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
MODEL, CAMERA = "yolo", "front"
FILES = ("yolov8n_full_integer_quant.tflite", "yolov8n_int8_dynamic.tflite")


class Fleet:
    """Simulated devices: what the broker delivers in, reported states and beats out
    through the registry's ingest code."""

    def __init__(self, broker, ingestor, topics, devices: list[str]) -> None:
        self.ingestor = ingestor
        self.topics = topics
        self.devices = devices
        self.seq = dict.fromkeys(devices, 0)
        self.applied: dict[str, int] = {}  # the desired version each device applied
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.received = 0
        self.ingest_s = {"answers": 0.0, "beats": 0.0}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.inbox.put(msg.payload)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{topics.root}/commands/+/desired", 1)
        if not subscribed.wait(10):
            raise RuntimeError("the fleet's subscriber was not subscribed")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _ingest(self, items, part: str) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(items), 1000):
            outcomes = self.ingestor.handle_batch(items[i : i + 1000])
            bad = [o for o in outcomes if o != "stored"]
            if bad:
                raise RuntimeError(f"ingest refused {len(bad)} {part}: {bad[:3]}")
        self.ingest_s[part] += time.perf_counter() - t0

    def answer(self) -> int:
        """Every device that received a desired state reports it active."""
        from flowfleet.contract import CameraModel, Reported, parse_payload

        items = []
        t = time.time()
        while True:
            try:
                payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            desired = parse_payload("desired", payload)
            if desired.version <= self.applied.get(desired.device, 0):
                continue  # delivered again (a retained state sent twice): applied already
            self.applied[desired.device] = desired.version
            ref = desired.models[CAMERA]
            cam = CameraModel(
                camera=CAMERA,
                model=ref.name,
                version=ref.version,
                sha256=ref.sha256,
                update="activated",
                update_model=ref.name,
                update_version=ref.version,
                update_ts=t,
            )
            rep = Reported(
                device=desired.device, ts=t, desired_version=desired.version, cameras=(cam,)
            )
            items.append((self.topics.reported(desired.device), rep.to_json(), t))
        self.received += len(items)
        if items:
            self._ingest(items, "answers")
        return len(items)

    def beat(self) -> None:
        from flowfleet.contract import Health

        t = time.time()
        items = []
        for d in self.devices:
            self.seq[d] += 1
            beat = Health(device=d, seq=self.seq[d], ts=t, uptime_s=100.0 + self.seq[d])
            items.append((self.topics.health(d), beat.to_json(), t))
        self._ingest(items, "beats")


def run(args: argparse.Namespace, url: str, tmp: Path) -> dict:
    from flowfleet.contract import Topics
    from flowfleet.data import data_dir
    from flowfleet.mqtt import BrokerAddress, MqttConnection
    from flowfleet.provisioning.mosquitto import Broker
    from flowfleet.registry.catalog.artifacts import LocalStore
    from flowfleet.registry.catalog.keys import KeyRing
    from flowfleet.registry.catalog.modelreg import MIB, ModelRegistry
    from flowfleet.registry.fleet.commands import CommandPublisher
    from flowfleet.registry.fleet.ingest import Ingestor
    from flowfleet.registry.fleet.rollout_steps import RolloutStepper
    from flowfleet.registry.fleet.rollouts import abort_rollout, create_rollout, get_rollout
    from flowfleet.registry.store.db import Command, open_database
    from flowfleet.registry.store.rollout_tables import Rollout
    from flowfleet.registry.testing import reset_database

    db = open_database(url)
    reset_database(db)
    db.connect(reuse_if_open=True)
    reg = ModelRegistry(
        db, LocalStore(tmp / "artifacts"), KeyRing(tmp / "keys"), max_upload_bytes=64 * MIB
    )
    reg.start()
    models = data_dir() / "models"
    for f in FILES:
        reg.add_version(models / f, name=MODEL, filename=f, actor="bench")
    topics = Topics()
    devices = [f"bench-{i:05d}" for i in range(args.devices)]
    ingestor = Ingestor(db, topics)
    out: dict = {"devices": args.devices}
    with Broker(tmp / "broker") as broker:
        conn = MqttConnection("bench-registry", BrokerAddress(broker.host, broker.port))
        conn.start()
        if not conn.wait_connected(10):
            raise RuntimeError("the registry's connection was not accepted")
        commands = CommandPublisher(db, conn, tick_s=args.tick)
        commands.start()
        fleet = Fleet(broker, ingestor, topics, devices)
        try:
            fleet.beat()  # every device known (its first beat creates its record)
            t0 = time.perf_counter()
            for d in devices:
                reg.deploy(d, CAMERA, MODEL, 1, actor="bench")
            commands.wake()
            out["setup_deploy_s"] = round(time.perf_counter() - t0, 2)
            deadline = time.monotonic() + 120
            while fleet.received < len(devices) and time.monotonic() < deadline:
                fleet.answer()
                time.sleep(0.05)
            if fleet.received < len(devices):
                raise RuntimeError(f"only {fleet.received} devices got v1")
            stepper = RolloutStepper(reg, commands=commands, topics=topics)
            out["rollout"] = drive(args, reg, stepper, fleet, create_rollout, 2, Rollout)
            out["rollout"]["publish_lag_s"] = publish_lag(Command, out["rollout"]["first_command"])
            # An abort: back to v1, aborted by hand once its first wave has moved.
            r = create_rollout(
                reg,
                model=MODEL,
                ref=1,
                camera=CAMERA,
                targets={"all": True},
                plan=plan(args, waves=1),
                actor="bench",
            )
            loop(args, stepper, fleet, r["id"], lambda: Rollout.get_by_id(r["id"]).wave == 1)
            moved = sum(
                1 for w in get_rollout(r["id"])["waves"] for d in w["devices"] if d["moved_at"]
            )
            t0 = time.perf_counter()
            shown = abort_rollout(db, r["id"], actor="bench", stepper=stepper)
            out["abort"] = {
                "moved": moved,
                "abort_step_s": round(time.perf_counter() - t0, 3),
                "state": shown["state"],
            }
        finally:
            fleet.close()
            commands.stop()
            conn.stop()
    return out


def drive(args, reg, stepper, fleet, create_rollout, version, Rollout) -> dict:
    """Create the rollout and run it the way the service does; returns the timings."""
    from flowfleet.registry.fleet.rollouts import get_rollout
    from flowfleet.registry.store.db import Command

    fleet.ingest_s = {"answers": 0.0, "beats": 0.0}  # this rollout's only
    first_command = Command.select(Command.id).order_by(Command.id.desc()).first().id + 1
    t_start = time.perf_counter()
    r = create_rollout(
        reg,
        model=MODEL,
        ref=version,
        camera=CAMERA,
        targets={"all": True},
        plan=plan(args, args.waves),
        actor="bench",
    )
    create_s = time.perf_counter() - t_start
    steps = loop(args, stepper, fleet, r["id"], lambda: False)
    state = Rollout.get_by_id(r["id"]).state
    wall = time.perf_counter() - t_start
    soak_floor = (1 + args.waves) * args.soak
    shown = get_rollout(r["id"])
    busy = create_s + sum(steps) + fleet.ingest_s["answers"]
    return {
        "state": state,
        "states": shown["devices"],
        "waves": [len(w["devices"]) for w in shown["waves"]],
        "wall_s": round(wall, 2),
        "soak_floor_s": soak_floor,
        "beyond_soak_s": round(wall - soak_floor, 2),
        "create_s": round(create_s, 3),
        "steps": len(steps),
        "steps_s": round(sum(steps), 2),
        "step_max_s": round(max(steps), 3),
        "step_median_ms": round(1000 * statistics.median(steps), 1),
        "ingest_answers_s": round(fleet.ingest_s["answers"], 2),
        "ingest_beats_s": round(fleet.ingest_s["beats"], 2),
        "registry_busy_s": round(busy, 2),
        "first_command": first_command,
    }


def plan(args, waves: int) -> dict:
    return {
        "canary": {"count": args.canary},
        "waves": waves,
        "soak_s": args.soak,
        "timeout_s": 120,
        "beat_timeout_s": 3 * args.beat,
    }


def loop(args, stepper, fleet, rollout_id: int, until) -> list[float]:
    """Step the rollout every tick as the service's job does, the devices answering and
    beating meanwhile, until it finishes or ``until()``; returns the step times."""
    from flowfleet.registry.store.rollout_tables import Rollout

    steps: list[float] = []
    t_start = time.perf_counter()
    next_beat = time.monotonic() + args.beat
    while True:
        t0 = time.perf_counter()
        stepper.step(rollout_id)
        steps.append(time.perf_counter() - t0)
        if Rollout.get_by_id(rollout_id).state not in ("running", "paused") or until():
            return steps
        if time.perf_counter() - t_start > 900:
            raise RuntimeError("the rollout did not finish in 15 minutes")
        fleet.answer()
        if time.monotonic() >= next_beat:
            fleet.beat()
            next_beat = time.monotonic() + args.beat
        time.sleep(args.tick)


def publish_lag(Command, first_id: int) -> dict:
    lags = [
        c.published_at - c.created_at
        for c in Command.select().where(Command.id >= first_id)
        if c.published_at is not None
    ]
    lags.sort()
    return {
        "published": len(lags),
        "p50": round(lags[len(lags) // 2], 3) if lags else None,
        "max": round(lags[-1], 3) if lags else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres", action="store_true", help="a temporary PostgreSQL database")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--canary", type=int, default=10)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--soak", type=float, default=5.0)
    ap.add_argument("--beat", type=float, default=2.5, help="seconds between health beats")
    ap.add_argument("--tick", type=float, default=0.5, help="the rollout job's tick")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/rollout.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from flowfleet.registry.testing import release, temporary_postgres

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with contextlib.ExitStack() as stack:
            if args.postgres:
                url = stack.enter_context(temporary_postgres())
                kind = "postgresql"
            else:
                url = str(tmp / "registry.sqlite")
                kind = "sqlite"
            try:
                result = run(args, url, tmp)
            finally:
                release()
    result.update(
        {
            "database": kind,
            "soak_s": args.soak,
            "beat_s": args.beat,
            "tick_s": args.tick,
            "canary": args.canary,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
            f"python {platform.python_version()}",
        }
    )
    r = result["rollout"]
    rows = [
        ("database", kind),
        ("devices (canary + waves)", f"{args.devices} ({' + '.join(map(str, r['waves']))})"),
        ("outcome", f"{r['state']} {r['states']}"),
        ("wall, create to succeeded", f"{r['wall_s']} s"),
        ("soak floor ((1 + waves) x soak)", f"{r['soak_floor_s']} s"),
        ("beyond the soak times", f"{r['beyond_soak_s']} s (goal < 120 s)"),
        ("registry busy (create + steps + answers)", f"{r['registry_busy_s']} s"),
        (
            "steps: count, total, max, median",
            f"{r['steps']}, {r['steps_s']} s, {r['step_max_s']} s, {r['step_median_ms']} ms",
        ),
        ("ingest of answers / of beats", f"{r['ingest_answers_s']} s / {r['ingest_beats_s']} s"),
        (
            "desired states published (p50 / max lag)",
            f"{r['publish_lag_s']['published']} ({r['publish_lag_s']['p50']} / "
            f"{r['publish_lag_s']['max']} s)",
        ),
        (
            "abort: devices moved, abort step",
            f"{result['abort']['moved']}, {result['abort']['abort_step_s']} s "
            f"({result['abort']['state']})",
        ),
        ("setup: deploy v1 to every device", f"{result['setup_deploy_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
