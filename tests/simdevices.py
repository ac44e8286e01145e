"""Simulated devices that speak the real wire protocol over a real broker.

Each `SimDevice` has its own `flowfleet.mqtt.MqttConnection` (the agent's client code)
and the contract's payload types: it subscribes to its retained desired state, and for
each camera reports what a real agent's updater would (`Reported`, retained: the
model activated, refused, or rolled back by probation), and sends `Health` beats.
How it takes a model version is scripted per (model, version) in ``behaviours``:

* ``ok``: activates it;
* ``fail``: refuses it (``update: failed``), keeps the old model;
* ``rollback``: activates it, then probation rolls it back (``update: rolled_back``)
  after ``rollback_after_s``;
* ``silent_rollback``: activates it, then later runs the old model again without
  saying so (its update state still reads ``activated``);
* ``stop_beating``: activates it and sends no health beat from then on;
* ``ignore``: never applies the desired state (a device that went quiet).

A desired state with a ``shadow`` entry for its camera makes it send shadow-comparison
windows (every ``shadow_window_s``, 60 boxes per model each) until a desired state
without one arrives; how well the candidate agrees with the running model is scripted
per (model, version) in ``shadow_agreement`` (default 0.95).

``received`` keeps every desired state that arrived, to check afterwards which model
versions a device was ever sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flowfleet.contract import CameraModel, Desired, Health, Reported, Topics, parse_payload
from flowfleet.contract_shadow import ShadowWindow
from flowfleet.mqtt import BrokerAddress, MqttConnection
from tests.factories import shadow_window

SHADOW_BOXES = 60  # per model and window


class SimDevice:
    def __init__(
        self,
        address: BrokerAddress,
        device: str,
        *,
        camera: str = "front",
        beat_s: float = 0.2,
        rollback_after_s: float = 0.3,
        shadow_window_s: float = 0.2,
        topics: Topics | None = None,
    ) -> None:
        self.device = device
        self.camera = camera
        self.beat_s = beat_s
        self.rollback_after_s = rollback_after_s
        self.topics = topics or Topics()
        self.behaviours: dict[tuple[str, int], str] = {}
        self.shadow_agreement: dict[tuple[str, int], float] = {}
        self.shadow_window_s = shadow_window_s
        self.shadowing: tuple[str, int] | None = None  # the candidate it runs in shadow
        self.shadow_windows_sent = 0
        self._shadow_seq = 0
        self.received: list[Desired] = []
        self.running: tuple[str, int] | None = None  # what the camera runs now
        self.applied: int | None = None
        self.beating = True
        self._entry: dict = {"camera": camera}
        self._lock = threading.Lock()
        self._seq = 0
        self._last_ts = 0.0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self.conn = MqttConnection(f"sim-{device}", address)
        self.conn.subscribe(self.topics.desired(device), self._on_desired)
        self._beater = threading.Thread(target=self._beat_loop, daemon=True)
        self._shadower = threading.Thread(target=self._shadow_loop, daemon=True)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SimDevice:
        self.conn.start()
        if not self.conn.wait_connected(10):
            raise RuntimeError(f"{self.device}: the broker did not accept the session")
        self._beater.start()
        self._shadower.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._beater.join(5)
        self._shadower.join(5)
        self.conn.stop()

    # -- what it was sent ------------------------------------------------------------

    def versions_sent(self, model: str) -> list[int]:
        """The versions of ``model`` its desired states named for its camera, in order;
        a desired state delivered again (the same desired version) counts once."""
        seen: set[int] = set()
        out = []
        with self._lock:
            for d in self.received:
                if d.version in seen:
                    continue
                seen.add(d.version)
                ref = d.models.get(self.camera)
                if ref is not None and ref.name == model:
                    out.append(ref.version)
        return out

    # -- protocol --------------------------------------------------------------------

    def _ts(self) -> float:
        with self._lock:
            self._last_ts = max(time.time(), self._last_ts + 0.001)
            return self._last_ts

    def _report(self) -> None:
        with self._lock:
            entry = dict(self._entry)
            applied = self.applied
        reported = Reported(
            device=self.device,
            ts=self._ts(),
            desired_version=applied,
            cameras=(CameraModel(**entry),),
        )
        self.conn.publish(self.topics.reported(self.device), reported.to_json(), retain=True)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        desired = parse_payload("desired", payload, device=self.device)
        with self._lock:
            self.received.append(desired)
            if self.applied is not None and desired.version <= self.applied:
                return
            entry = (desired.shadow or {}).get(self.camera)
            self.shadowing = (entry.model.name, entry.model.version) if entry else None
            ref = desired.models.get(self.camera)
            if ref is None:
                self.applied = desired.version
                return
            behaviour = self.behaviours.get((ref.name, ref.version), "ok")
            if behaviour == "ignore":
                return
            self.applied = desired.version
            previous = self.running
            update = {
                "update_model": ref.name,
                "update_version": ref.version,
                "update_ts": round(time.time(), 3),
            }
            if behaviour == "fail":
                self._entry.update(update, update="failed", reason="gate: too slow")
            else:
                self.running = (ref.name, ref.version)
                self._entry.update(
                    update, model=ref.name, version=ref.version, update="activated", reason=None
                )
            if behaviour == "stop_beating":
                self.beating = False
        self._report()
        if behaviour in ("rollback", "silent_rollback"):
            threading.Timer(
                self.rollback_after_s, self._roll_back, (previous, behaviour == "rollback")
            ).start()

    def _roll_back(self, previous: tuple[str, int] | None, say_so: bool) -> None:
        with self._lock:
            self.running = previous
            model, version = previous if previous is not None else (None, None)
            self._entry.update(model=model, version=version)
            if say_so:
                self._entry.update(update="rolled_back", reason="slow: probation")
        self._report()

    def _shadow_loop(self) -> None:
        while not self._stop.wait(self.shadow_window_s):
            with self._lock:
                candidate, running = self.shadowing, self.running
                if candidate is None or running is None:
                    continue
                self._shadow_seq += 1
                seq = self._shadow_seq
            agreement = self.shadow_agreement.get(candidate, 0.95)
            start = self._ts()
            body = shadow_window(
                self.device,
                seq,
                start,
                camera=self.camera,
                candidate=candidate[0],
                boxes=(SHADOW_BOXES, SHADOW_BOXES),
                matched=round(agreement * SHADOW_BOXES),
                end=start + self.shadow_window_s,
            )
            body["active"] = {"file": f"{running[0]}-v{running[1]}.tflite", "model": running[0]}
            body["active"]["version"] = running[1]
            body["candidate"]["version"] = candidate[1]
            window = ShadowWindow.model_validate(body)
            self.conn.publish(self.topics.shadow(self.device), window.to_json())
            self.shadow_windows_sent += 1

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.beat_s):
            if not self.beating:
                continue
            with self._lock:
                self._seq += 1
                seq = self._seq
            beat = Health(
                device=self.device,
                seq=seq,
                ts=time.time(),
                uptime_s=time.monotonic() - self._started,
            )
            self.conn.publish(self.topics.health(self.device), beat.to_json())


def start_fleet(address: BrokerAddress, devices: Iterable[str], **kwargs) -> list[SimDevice]:
    fleet = []
    try:
        for device in devices:
            fleet.append(SimDevice(address, device, **kwargs).start())
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


def stop_fleet(fleet: Iterable[SimDevice]) -> None:
    for sim in fleet:
        sim.stop()
