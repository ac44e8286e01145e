"""Starts and stops shadow comparisons as the desired state asks, and sends their windows.

The updater hands every desired state it accepts (and, after a restart, the retained
one it had applied already) to `ShadowManager.apply`. For each camera with a
``shadow`` entry the candidate is checked like a model update (`verify_manifest`:
signed by a key in the device's bundle; downloaded and sha256/size checked against
the signed manifest; loaded with `load_for`, which refuses a model that cannot count
the camera's classes) but never activated: it gets a `ShadowRunner` beside the
camera's pipeline. A camera no longer listed stops its comparison (its last window
is sent). Every start, stop and refusal is an event (``shadow_started``,
``shadow_stopped``, ``shadow_failed`` with the reason: ``unsigned``, ``signature``,
``manifest``, ``download``, ``checksum``, ``load``, ``health_gate``,
``unknown_camera``, ``crashed``); a candidate that fails, now or later, never touches
the camera's counting.

Windows close every ``[shadow] window_seconds`` on their own thread and go through
the outbox (stream ``shadow``) like every other message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from flowfleet.contract import Desired, ShadowRef
from flowfleet.contract_shadow import ShadowModel, ShadowWindow

from .download import UpdateRefused, verify_manifest, write_labels_file
from .probation import load_for
from .shadow import ShadowRunner, candidate_pipeline, stride_for

log = logging.getLogger(__name__)


class ShadowManager:
    """The shadow comparisons of one `AgentService` (see the module docstring)."""

    def __init__(self, service) -> None:
        self.service = service
        self.config = service.config.shadow
        self.runners: dict[str, ShadowRunner] = {}  # camera -> running comparison
        self._files: dict[str, set[str]] = {}  # camera -> candidate model + labels files
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shadow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the window loop and send every comparison's last window (the camera
        threads have stopped by now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.close_windows()
        for camera in list(self.runners):
            runner = self._detach(camera)
            if runner is not None:
                runner.close()

    def files(self) -> set[str]:
        """Model and label file names running comparisons use (kept by the updater)."""
        with self._lock:
            return set().union(*self._files.values()) if self._files else set()

    # -- desired state -----------------------------------------------------------------

    def apply(self, desired: Desired) -> None:
        """Start, keep or stop each camera's comparison as ``desired.shadow`` says."""
        wanted = dict(desired.shadow or {})
        for camera in sorted(set(self.runners) - set(wanted)):
            self.stop_camera(camera, f"desired state {desired.version} has no shadow for it")
        for camera, ref in sorted(wanted.items()):
            if self._stop.is_set():
                return
            share = ref.share or self.config.share
            runner = self.runners.get(camera)
            if (
                runner is not None
                and runner.candidate.sha256 == ref.model.sha256
                and runner.stride == stride_for(share)
            ):
                continue  # the same comparison runs already
            try:
                self._start_camera(camera, ref, share, desired.version)
            except UpdateRefused as exc:
                self._failed(camera, ref, exc.reason, str(exc), desired.version)
            except Exception as exc:  # a bug here must not cost the other cameras
                log.exception("shadow comparison of camera %s failed to start", camera)
                why = f"{type(exc).__name__}: {exc}"
                self._failed(camera, ref, "internal", why, desired.version)

    def _start_camera(self, camera: str, ref: ShadowRef, share: float, desired: int) -> None:
        s = self.service
        cam = s.cameras.get(camera)
        if cam is None:
            raise UpdateRefused("unknown_camera", f"this device has no camera {camera!r}")
        model = ref.model
        updater = s.updater
        doc = verify_manifest(model, updater.cfg.keys_file)
        path = updater.downloader.download(model, doc, updater.cfg)
        labels = write_labels_file(path, doc)
        detector = load_for(cam, path, labels)
        source = s._sources.get(camera)
        fps = float(getattr(source, "delivered_fps", 0) or cam.config.fps)
        stride = stride_for(share)
        try:
            pipeline = candidate_pipeline(cam.config, detector, fps, stride)
        except ValueError as exc:
            detector.close()
            raise UpdateRefused("health_gate", f"the model cannot count: {exc}") from None
        runner = ShadowRunner(
            camera,
            pipeline,
            share=share,
            active=self._active_model(cam),
            candidate=ShadowModel(
                file=path.name, model=model.name, version=model.version, sha256=model.sha256
            ),
        )
        self.attach(runner, files=(path.name, *([Path(labels).name] if labels else [])))
        s.event(
            "shadow_started",
            f"camera {camera} compares {model.name} v{model.version} in shadow on "
            f"1 of every {stride} frame(s); signature by key {model.key_id} verified",
            camera=camera,
            model=model.name,
            version=model.version,
            sha256=model.sha256,
            share=share,
            desired_version=desired,
        )

    def attach(self, runner: ShadowRunner, files=()) -> None:
        """Put ``runner`` beside its camera's pipeline from the next frame on, in place
        of a comparison running there (whose last window is sent). ``files`` are the
        candidate's model files in the models folder, kept while it runs."""
        camera = runner.camera
        old = self._detach(camera)
        if old is not None:
            self._send(old, time.time())
            old.close()
        cam = self.service.cameras[camera]
        with self._lock:
            self._files[camera] = set(files)
            self.runners[camera] = runner
        with cam.lock:
            cam.shadow = runner

    def _active_model(self, cam) -> ShadowModel:
        """The model the camera counts with now, as a window names it."""
        rec = self.service.updater.active.get(cam.config.name) or {}
        file = Path(cam.model_path).name
        if Path(rec.get("path") or "").name != file:
            rec = {}  # the config's own model (or one being rolled back to)
        return ShadowModel(
            file=file, model=rec.get("model"), version=rec.get("version"), sha256=rec.get("sha256")
        )

    def stop_camera(self, camera: str, why: str) -> None:
        """End a camera's comparison: its last window is sent, its detector closed."""
        runner = self._detach(camera)
        if runner is None:
            return
        self._send(runner, time.time())
        runner.close()
        c = runner.candidate
        self.service.event(
            "shadow_stopped",
            f"camera {camera} stopped comparing {c.model} v{c.version}: {why}",
            camera=camera,
            model=c.model,
            version=c.version,
        )

    def _detach(self, camera: str) -> ShadowRunner | None:
        cam = self.service.cameras.get(camera)
        if cam is not None:
            with cam.lock:
                if cam.shadow is self.runners.get(camera):
                    cam.shadow = None
        with self._lock:
            self._files.pop(camera, None)
            return self.runners.pop(camera, None)

    def _failed(self, camera: str, ref: ShadowRef, reason: str, message: str, desired) -> None:
        try:
            self.service.event(
                "shadow_failed",
                f"shadow comparison of {ref.model.name} v{ref.model.version} on camera "
                f"{camera} refused: {message}",
                severity="error",
                camera=camera if camera in self.service.cameras else None,
                model=ref.model.name,
                version=ref.model.version,
                sha256=ref.model.sha256,
                reason=reason,
                desired_version=desired,
            )
        except Exception:
            log.exception("could not record the shadow_failed event")

    # -- frames (camera thread, under the camera's lock) --------------------------------

    def on_frame(self, cam, image, ts: float, result) -> None:
        """Feed one frame to the camera's comparison; a candidate that raises is
        detached at once (counting has its result already) and reported."""
        runner = cam.shadow
        try:
            if Path(cam.model_path).name != runner.active.file:
                # A model update (or its rollback) swapped the active model before this
                # frame: the window closes here, so each compares with one model.
                self._send(runner, time.time())
                runner.active = self._active_model(cam)
            runner.on_frame(image, ts, result)
        except Exception as exc:
            cam.shadow = None  # under the camera's lock: no further frame reaches it
            log.exception("shadow candidate of camera %s failed", cam.config.name)
            threading.Thread(
                target=self._crashed, args=(cam.config.name, runner, exc), daemon=True
            ).start()

    def _crashed(self, camera: str, runner: ShadowRunner, exc: Exception) -> None:
        with self._lock:
            if self.runners.get(camera) is runner:
                self.runners.pop(camera)
                self._files.pop(camera, None)
        self._send(runner, time.time())
        runner.close()
        c = runner.candidate
        self.service.event(
            "shadow_failed",
            f"shadow candidate {c.model} v{c.version} on camera {camera} crashed: "
            f"{type(exc).__name__}: {exc}; counting is unaffected",
            severity="error",
            camera=camera,
            model=c.model,
            version=c.version,
            reason="crashed",
        )

    # -- windows -----------------------------------------------------------------------

    def close_windows(self) -> int:
        """Enqueue every running comparison's window now ending; returns how many."""
        now = time.time()
        with self._lock:
            runners = list(self.runners.values())
        return sum(self._send(r, now) for r in runners)

    def _send(self, runner: ShadowRunner, end: float) -> bool:
        cam = self.service.cameras.get(runner.camera)
        runner.declare_lines(cam.classes if cam is not None else ())
        window = runner.take(self.service.device, end)
        if window is None:
            return False
        self.enqueue(window)
        return True

    def enqueue(self, window: ShadowWindow) -> None:
        """Enqueue one window (its seq is assigned here)."""
        s = self.service
        s.outbox.enqueue(
            "shadow",
            s.topics.shadow(s.device),
            lambda seq, w=window: w.model_copy(update={"seq": seq}).to_json(),
        )
        s.publisher.notify()

    def _loop(self) -> None:
        period = self.config.window_seconds
        while True:
            now = time.time()
            boundary = math.floor(now / period) * period + period
            if self._stop.wait(boundary - now):
                return
            try:
                self.close_windows()
            except Exception:
                log.exception("could not enqueue shadow windows")
