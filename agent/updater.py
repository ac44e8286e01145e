"""Model updates: desired state -> verify -> download -> gate -> swap -> probation.

The agent subscribes to its retained desired-state topic. For each camera whose
desired model differs from what it runs, the updater (on its own worker thread, so
counting never waits):

1. checks the registry's ed25519 signature over the manifest carried in the
   `ModelRef` with the device's key bundle (``[registry] keys_file``), and that the
   reference's name, version and sha256 are the manifest's (a wrong checksum is
   refused before anything is downloaded);
2. downloads the artifact over HTTP with the device's token into ``<file>.part``,
   resuming with ``Range`` after a broken connection, logging progress;
3. checks the file's size and sha256 against the signed manifest;
4. loads it into a second detector (`load_detector` warms it up and refuses outputs
   no decoder understands) and runs a health gate: a sanity inference on the
   camera's most recent frame must finish within the latency budget
   (``gate_max_ms``, else ``gate_latency_factor`` x the current model's median).
   A camera that is down (failed, reconnecting, not started yet: no frame newer
   than ``gate_frame_max_age_s``) has nothing to gate on: the verified model is
   held *pending* (``model_pending``, persisted) and gated on the first frame the
   camera delivers, while the camera counts on with its current model;
5. swaps it in between two frames (under the camera's lock), closing the camera's
   drift window there so each summary describes one model; the previous detector
   stays loaded for ``probation_frames`` frames (`agent.probation`): if the new
   one raises ``max_errors`` times, or the median of its latest inference times
   exceeds the gate's budget, the camera goes back to the previous model at once
   and the update is reported ``rolled_back`` (reason ``crashed`` or ``slow``).

Every step is an event (``model_downloading``, ``model_verified``,
``model_pending``, ``model_activated``, ``model_failed``, ``model_rolled_back``)
and part of the retained reported state. What each camera runs, the previous
model and pending updates are persisted in ``<models_dir>/active.json``, so a
restart keeps the activated model rather than the config's; the previous model's
file stays on disk.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from flowfleet.contract import (
    CameraModel,
    ContractError,
    Desired,
    ModelRef,
    Reported,
    parse_payload,
)

from .download import (
    Downloader,
    UpdateRefused,
    sha256_file,
    verify_manifest,
    write_labels_file,
)
from .pending import PendingUpdates
from .probation import (
    ProbationDetector,
    install_detector,
    installed_detector,
    load_and_gate,
    load_for,
)
from .state_file import load_state, save_state

log = logging.getLogger(__name__)

__all__ = [
    "ModelUpdater",
    "ProbationDetector",
    "UpdateRefused",
    "install_detector",
    "installed_detector",
    "sha256_file",
]

ACTIVE_FILE = "active.json"


class ModelUpdater(PendingUpdates):
    """Applies desired states for one `AgentService` (see the module docstring)."""

    def __init__(self, service) -> None:
        self.service = service
        self.cfg = service.config.registry
        self.enabled = bool(self.cfg.url)
        state_dir = Path(service.config.state_dir)
        self.models_dir = Path(self.cfg.models_dir or state_dir / "models")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.models_dir / ACTIVE_FILE
        self._lock = threading.RLock()
        doc = self._load()
        self.applied_version: int | None = doc.get("desired_version")
        self.active: dict[str, dict[str, Any]] = doc.get("cameras", {})
        self.states: dict[str, dict[str, Any]] = doc.get("states", {})
        # camera -> verified update waiting for a frame to gate on (see _hold)
        self.pending: dict[str, dict[str, Any]] = doc.get("pending", {})
        self._gating: set[str] = set()  # cameras with a queued "gate" job
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.downloader = Downloader(self.models_dir, self._stop)
        self._thread: threading.Thread | None = None
        self._latest_seen = self.applied_version or 0
        self._retries = 0

    # -- persistence -----------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        return load_state(self._path, "cameras start with their configured models")

    def _save(self) -> None:
        with self._lock:
            doc = {
                "desired_version": self.applied_version,
                "cameras": self.active,
                "states": self.states,
                "pending": self.pending,
            }
            save_state(self._path, doc)
            dir_fd = os.open(self.models_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def model_for(self, camera) -> tuple[str, str | None]:
        """(model file, labels file) a camera starts with: the activated one, if any."""
        rec = self.active.get(camera.name)
        if rec:
            path = Path(rec["path"])
            try:
                if sha256_file(path) == rec["sha256"]:
                    log.info(
                        "camera %s runs %s v%s from the registry (%s)",
                        camera.name,
                        rec["model"],
                        rec["version"],
                        path.name,
                    )
                    return str(path), rec.get("labels")
                problem = "its sha256 changed"
            except OSError as exc:
                problem = exc.strerror or str(exc)
            log.error(
                "camera %s: activated model %s unusable (%s); using the configured model",
                camera.name,
                path,
                problem,
            )
            with self._lock:
                self.active.pop(camera.name, None)
        return camera.model, camera.labels

    # -- reported state ----------------------------------------------------------------

    def reported(self) -> Reported:
        cams = []
        with self._lock:
            for name, cam in self.service.cameras.items():
                rec = self.active.get(name) or {}
                st = self.states.get(name) or {}
                cams.append(
                    CameraModel(
                        camera=name,
                        model=rec.get("model"),
                        version=rec.get("version"),
                        sha256=rec.get("sha256"),
                        file=Path(cam.model_path).name,
                        **st,
                    )
                )
        return Reported(
            device=self.service.device,
            ts=round(time.time(), 3),
            desired_version=self.applied_version,
            cameras=tuple(cams),
            geometry=self.service.setup.reported(),
        )

    def publish_reported(self) -> None:
        if not self.enabled:
            return
        try:
            s = self.service
            s.connection.publish(
                s.topics.reported(s.device), self.reported().to_json(), retain=True
            )
        except Exception:
            log.exception("could not publish the reported state")

    def _report(
        self,
        camera: str,
        ref: ModelRef,
        state: str,
        message: str,
        *,
        desired: int,
        reason: str | None = None,
        severity: str = "info",
        event: str | None = None,
    ) -> None:
        """Record ``state`` in the reported state and send an event (``model_<state>``
        unless ``event`` names another: the contract's update states have no
        "pending", so a held update reports ``verified`` with reason ``pending``)."""
        with self._lock:
            self.states[camera] = {
                "update": state,
                "update_model": ref.name,
                "update_version": ref.version,
                "reason": None if reason is None else f"{reason}: {message}"[:1024],
                "update_ts": round(time.time(), 3),
            }
        try:
            self.service.event(
                event or f"model_{state}",
                message,
                severity=severity,
                camera=camera,
                model=ref.name,
                version=ref.version,
                sha256=ref.sha256,
                reason=reason,
                desired_version=desired,
            )
        except Exception:
            log.exception("could not record the %s event", event or f"model_{state}")
        self.publish_reported()

    # -- worker ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._jobs.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    def on_desired(self, topic: str, payload: bytes) -> None:
        """MQTT handler (paho's thread): validate and queue; never blocks."""
        try:
            desired = parse_payload("desired", payload, device=self.service.device)
        except ContractError as exc:
            log.error("ignoring an invalid desired state on %s: %s", topic, exc)
            return
        self._latest_seen = max(self._latest_seen, desired.version)
        self._jobs.put(("desired", desired))

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            try:
                if job[0] == "desired":
                    self.apply(job[1])
                elif job[0] == "trip":
                    self._rollback(job[1], job[2], job[3])
                elif job[0] == "gate":
                    self._gate_pending(job[1])
                elif job[0] == "pass":
                    self._passed(job[1], job[2])
            except Exception:
                log.exception("model updater: %s failed", job[0])

    def apply(self, desired: Desired) -> None:
        if self.applied_version is not None and desired.version <= self.applied_version:
            log.info(
                "desired state version %d already applied (have %d); ignoring",
                desired.version,
                self.applied_version,
            )
            if desired.version == self.applied_version:  # the retained one, after a restart
                self.service.shadows.apply(desired)
                self.service.setup.apply(desired)
            return
        if desired.version < self._latest_seen:
            log.info(
                "desired state version %d superseded by %d", desired.version, self._latest_seen
            )
            return
        log.info("applying desired state version %d", desired.version)
        retry = False
        for camera, ref in sorted(desired.models.items()):
            if self._stop.is_set():
                return  # not applied: the retained message brings it back after a restart
            try:
                self.update_camera(camera, ref, desired.version)
            except UpdateRefused as exc:
                if self._stop.is_set():
                    log.info("model update of camera %s interrupted: agent stopping", camera)
                    return
                retry = retry or exc.transient
                self._report(
                    camera,
                    ref,
                    "failed",
                    str(exc),
                    desired=desired.version,
                    reason=exc.reason,
                    severity="error",
                )
            except Exception as exc:
                log.exception("model update of camera %s failed", camera)
                self._report(
                    camera,
                    ref,
                    "failed",
                    f"{type(exc).__name__}: {exc}",
                    desired=desired.version,
                    reason="internal",
                    severity="error",
                )
        # Shadow comparisons after the models: a candidate compares with what is active.
        self.service.shadows.apply(desired)
        self.service.setup.apply(desired)  # lines, zones and snapshot requests
        if retry:
            # The registry was unreachable: try the same desired state again later
            # (unless a newer one arrives first); cameras already updated are skipped.
            self._retries += 1
            delay = min(30.0 * 2 ** (self._retries - 1), 3600.0)
            log.warning(
                "desired state version %d: retrying the download in %.0fs",
                desired.version,
                delay,
            )
            timer = threading.Timer(delay, self._jobs.put, args=(("desired", desired),))
            timer.daemon = True
            timer.start()
            return
        self._retries = 0
        with self._lock:
            self.applied_version = desired.version
            self._save()
        self.publish_reported()

    # -- one camera --------------------------------------------------------------------

    def update_camera(self, camera: str, ref: ModelRef, desired: int) -> None:
        cam = self.service.cameras.get(camera)
        if cam is None:
            raise UpdateRefused("unknown_camera", f"this device has no camera {camera!r}")
        # A newer desired state for this camera supersedes an update still pending.
        dropped = self._drop_pending(camera)
        rec = self.active.get(camera)
        if rec and rec["sha256"] == ref.sha256 and Path(cam.model_path) == Path(rec["path"]):
            log.info("camera %s already runs %s v%d", camera, ref.name, ref.version)
            if dropped:
                self._report(
                    camera,
                    ref,
                    "activated",
                    f"camera {camera} keeps {ref.name} v{ref.version}; the pending "
                    f"{dropped['ref']['name']} v{dropped['ref']['version']} is dropped",
                    desired=desired,
                )
            return
        doc = verify_manifest(ref, self.cfg.keys_file)
        self._report(
            camera,
            ref,
            "downloading",
            f"downloading {ref.name} v{ref.version} ({doc['size']} bytes)",
            desired=desired,
        )
        path = self.downloader.download(ref, doc, self.cfg)
        labels = write_labels_file(path, doc)
        self._report(
            camera,
            ref,
            "verified",
            f"{ref.name} v{ref.version}: sha256 and signature by key {ref.key_id} verified",
            desired=desired,
        )
        if not self.has_fresh_frame(cam):
            # Refuse now what needs no frame to refuse (unloadable, wrong classes),
            # then wait for a frame to run the real gate on.
            load_for(cam, path, labels).close()
            self._hold(cam, ref, path, labels, desired)
            return
        self._gate_and_activate(cam, ref, path, labels, desired)

    def _gate_and_activate(self, cam, ref: ModelRef, path: Path, labels, desired: int) -> None:
        detector, ms, budget = load_and_gate(cam, path, labels, self.cfg)
        shown = "none" if budget is None else f"{budget:.1f} ms"
        activated = self.activate(
            cam,
            ref,
            path,
            labels,
            detector,
            desired,
            f"camera {cam.config.name} runs {ref.name} v{ref.version} (gate inference "
            f"{ms:.1f} ms, budget {shown})",
            budget,
        )
        if not activated:  # the camera went down between the gate and the swap
            self._hold(cam, ref, path, labels, desired)

    def activate(
        self, cam, ref: ModelRef, path: Path, labels, detector, desired, message, budget_ms=None
    ) -> bool:
        """Swap ``detector`` in under probation; False (detector closed, nothing
        changed) if the camera is not running, so the caller holds the update."""
        name = cam.config.name
        previous = self.active.get(name) or {
            "model": None,
            "version": None,
            "sha256": None,
            "path": cam.model_path,
            "labels": cam.labels_path,
        }
        previous = {k: v for k, v in previous.items() if k != "previous"}
        summary = None
        with cam.lock:
            pipeline = cam.pipeline
            if pipeline is None:
                detector.close()
                return False
            old = installed_detector(pipeline)
            if isinstance(old, ProbationDetector):  # an update during probation
                old.state = "replaced"
                old.fallback.close()
                old = old.inner
            probe = ProbationDetector(
                detector,
                old,
                frames=self.cfg.probation_frames,
                max_errors=self.cfg.max_errors,
                on_trip=lambda p, n=name: self._on_trip(n, p),
                on_pass=lambda p, n=name: self._jobs.put(("pass", n, p)),
                budget_ms=budget_ms,
                latency_frames=min(self.cfg.probation_latency_frames, self.cfg.probation_frames),
            )
            install_detector(pipeline, probe, cam.config.classes)
            cam.classes = tuple(pipeline.counted_classes)
            cam.model_path, cam.labels_path = str(path), labels
            # The drift window closes at the swap: frames before it were the old model's.
            if cam.drift is not None:
                summary = cam.drift.switch(self.service.device, path.name, time.time())
        if summary is not None:
            self.service.enqueue_drift(summary)
        with self._lock:
            self.active[name] = {
                "model": ref.name,
                "version": ref.version,
                "sha256": ref.sha256,
                "path": str(path),
                "labels": labels,
                "previous": previous,
                "activated_at": round(time.time(), 3),
            }
            self._save()
        self._report(name, ref, "activated", message, desired=desired)
        self._prune()
        return True

    def _previous_path(self, name: str) -> str:
        cam = self.service.cameras[name]
        with self._lock:
            prev = (self.active.get(name) or {}).get("previous") or {}
        return prev.get("path") or cam.config.model

    def _on_trip(self, name: str, probe: ProbationDetector) -> None:
        """Camera thread, under the camera's lock, inside the tripping frame: from
        here on the previous model answers, so its drift window starts here."""
        cam = self.service.cameras[name]
        summary = None
        if cam.drift is not None:
            summary = cam.drift.switch(
                self.service.device, Path(self._previous_path(name)).name, time.time()
            )
        self._jobs.put(("trip", name, probe, summary))

    def _rollback(self, name: str, probe: ProbationDetector, summary=None) -> None:
        if summary is not None:
            self.service.enqueue_drift(summary)
        if probe.state == "replaced":
            return
        cam = self.service.cameras[name]
        with cam.lock:
            pipeline = cam.pipeline
            if pipeline is not None and installed_detector(pipeline) is probe:
                install_detector(pipeline, probe.fallback, cam.config.classes)
                cam.classes = tuple(pipeline.counted_classes)
            else:
                probe.fallback.close()
            with self._lock:
                rec = self.active.get(name) or {}
                prev = rec.get("previous") or {}
                cam.model_path = prev.get("path") or cam.config.model
                cam.labels_path = prev.get("labels") if prev else cam.config.labels
                if prev.get("model"):
                    self.active[name] = prev
                else:
                    self.active.pop(name, None)
                self._save()
            summary = None
            if cam.drift is not None:  # normally switched at the trip already: a no-op
                summary = cam.drift.switch(
                    self.service.device, Path(cam.model_path).name, time.time()
                )
        if summary is not None:
            self.service.enqueue_drift(summary)
        probe.inner.close()
        ref = ModelRef(
            name=rec.get("model") or "unknown",
            version=rec.get("version") or 1,
            sha256=rec.get("sha256") or "0" * 64,
            url="",
        )
        self._report(
            name,
            ref,
            "rolled_back",
            f"{ref.name} v{ref.version} {probe.trip_message}; camera {name} "
            f"runs {Path(cam.model_path).name} again",
            desired=self.applied_version or 1,
            reason=probe.trip_reason,
            severity="error",
        )

    def _passed(self, name: str, probe: ProbationDetector) -> None:
        if probe.state == "replaced":
            return
        cam = self.service.cameras[name]
        with cam.lock:
            pipeline = cam.pipeline
            if pipeline is not None and installed_detector(pipeline) is probe:
                install_detector(pipeline, probe.inner, cam.config.classes)
        probe.fallback.close()
        log.info("camera %s: new model passed %d probation frames", name, probe.frames)

    def _prune(self) -> None:
        """Delete model files no camera runs or would roll back to."""
        keep = self.service.shadows.files()  # candidates running in shadow
        with self._lock:
            recs = [*self.active.values(), *self.pending.values()]
            for rec in recs:
                for r in (rec, rec.get("previous") or {}):
                    for key in ("path", "labels"):
                        if r.get(key):
                            keep.add(Path(r[key]).name)
        for p in self.models_dir.iterdir():
            if p.name == ACTIVE_FILE or p.name.endswith((".part", ".tmp")) or p.name in keep:
                continue
            try:
                p.chmod(0o644)
                p.unlink()
                log.info("removed the unused model file %s", p)
            except OSError:
                log.debug("could not remove %s", p, exc_info=True)
