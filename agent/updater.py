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
   (``gate_max_ms``, else ``gate_latency_factor`` x the current model's median);
5. swaps it in between two frames (under the camera's lock); the previous detector
   stays loaded for ``probation_frames`` frames: if the new one raises
   ``max_errors`` times in that window, the camera goes back to the previous model
   at once (the failing frames are answered by the previous model) and the update
   is reported ``rolled_back``.

Every step is an event (``model_downloading``, ``model_verified``,
``model_activated``, ``model_failed``, ``model_rolled_back``) and part of the
retained reported state. What each camera runs, and the previous model, are
persisted in ``<models_dir>/active.json``, so a restart keeps the activated model
rather than the config's; the previous model's file stays on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from flowfleet.contract import (
    CameraModel,
    ContractError,
    Desired,
    ModelRef,
    Reported,
    parse_payload,
)

from .config import read_token
from .drift import RecordingDetector

log = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
EXTENSIONS = {"tflite": ".tflite", "onnx": ".onnx", "eim": ".eim"}
BLOCK = 256 * 1024
GATE_RUNS = 3


class UpdateRefused(Exception):
    """An update that must not go ahead; ``reason`` is a short code for events."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient  # worth trying again later (the network, not the bytes)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def installed_detector(pipeline):
    """The detector a pipeline runs, under the drift recorder if there is one."""
    holder = pipeline.detector
    return holder._inner if isinstance(holder, RecordingDetector) else holder


def install_detector(pipeline, detector, classes) -> None:
    """Put ``detector`` into ``pipeline`` (caller holds the camera's lock)."""
    from .labels import ClassFilter

    holder = pipeline.detector
    if isinstance(holder, RecordingDetector):
        holder._inner = detector
    else:
        pipeline.detector = detector
    pipeline.class_filter = ClassFilter(classes, detector.labels)


class ProbationDetector:
    """A newly activated detector, watched for its first ``frames`` frames.

    An exception from the new model is answered by the previous detector for that
    frame; after ``max_errors`` of them the probation trips (``on_trip``) and every
    further frame goes to the previous detector until the updater swaps it back.
    After ``frames`` frames without tripping, ``on_pass`` lets the updater release
    the previous detector.
    """

    def __init__(self, inner, fallback, *, frames: int, max_errors: int, on_trip, on_pass):
        self.inner = inner
        self.fallback = fallback
        self.frames = frames
        self.max_errors = max_errors
        self.on_trip = on_trip
        self.on_pass = on_pass
        self.seen = 0
        self.errors = 0
        self.last_error: str | None = None
        self.state = "probation"  # -> "tripped" | "passed" | "replaced" (by a newer update)

    def detect(self, frame_bgr):
        if self.state == "tripped":
            return self.fallback.detect(frame_bgr)
        try:
            dets = self.inner.detect(frame_bgr)
        except Exception as exc:
            if self.state != "probation":
                raise
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            log.warning(
                "new model failed on a frame (%d/%d): %s",
                self.errors,
                self.max_errors,
                self.last_error,
            )
            if self.errors >= self.max_errors:
                self.state = "tripped"
                self.on_trip(self)
            return self.fallback.detect(frame_bgr)
        if self.state == "probation":
            self.seen += 1
            if self.seen >= self.frames:
                self.state = "passed"
                self.on_pass(self)
        return dets

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ModelUpdater:
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
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest_seen = self.applied_version or 0
        self._retries = 0

    # -- persistence -----------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error(
                "%s unreadable (%s); cameras start with their configured models", self._path, exc
            )
            return {}
        return doc if isinstance(doc, dict) else {}

    def _save(self) -> None:
        with self._lock:
            doc = {
                "desired_version": self.applied_version,
                "cameras": self.active,
                "states": self.states,
            }
            tmp = self._path.with_name(self._path.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
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
    ) -> None:
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
                f"model_{state}",
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
            log.exception("could not record the model_%s event", state)
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
                    self._rollback(job[1], job[2])
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
        rec = self.active.get(camera)
        if rec and rec["sha256"] == ref.sha256 and Path(cam.model_path) == Path(rec["path"]):
            log.info("camera %s already runs %s v%d", camera, ref.name, ref.version)
            return
        doc = self.verify_manifest(ref)
        self._report(
            camera,
            ref,
            "downloading",
            f"downloading {ref.name} v{ref.version} ({doc['size']} bytes)",
            desired=desired,
        )
        path = self.download(ref, doc)
        labels = self._labels_file(path, doc)
        self._report(
            camera,
            ref,
            "verified",
            f"{ref.name} v{ref.version}: sha256 and signature by key {ref.key_id} verified",
            desired=desired,
        )
        detector, ms, budget = self.load_and_gate(cam, path, labels)
        self.activate(
            cam,
            ref,
            path,
            labels,
            detector,
            desired,
            f"camera {camera} runs {ref.name} v{ref.version} (gate inference "
            f"{ms:.1f} ms, budget {budget})",
        )

    def verify_manifest(self, ref: ModelRef) -> dict[str, Any]:
        if not (ref.manifest and ref.signature and ref.key_id):
            raise UpdateRefused(
                "unsigned",
                f"{ref.name} v{ref.version} has no signed manifest "
                "(manifest, signature, key_id); an unsigned model is never run",
            )
        try:
            from flowfleet import signing
        except ImportError as exc:  # cryptography missing on this device
            raise UpdateRefused("signature", f"cannot verify signatures: {exc}") from None
        try:
            manifest = base64.b64decode(ref.manifest, validate=True)
        except ValueError:
            raise UpdateRefused("manifest", "the manifest is not valid base64") from None
        try:
            keys = signing.load_bundle(Path(self.cfg.keys_file))
            doc = signing.verify_manifest(manifest, ref.signature, ref.key_id, keys)
        except (signing.VerificationError, OSError, ValueError, KeyError) as exc:
            raise UpdateRefused("signature", f"{ref.name} v{ref.version}: {exc}") from None
        for field in ("name", "version", "sha256"):
            if doc.get(field) != getattr(ref, field):
                raise UpdateRefused(
                    "manifest",
                    f"the desired {field} {getattr(ref, field)!r} is not the "
                    f"signed manifest's {doc.get(field)!r}",
                )
        if doc.get("runtime") not in EXTENSIONS or not isinstance(doc.get("size"), int):
            raise UpdateRefused("manifest", f"unsupported runtime {doc.get('runtime')!r}")
        return doc

    def _url(self, ref: ModelRef) -> tuple[str, dict[str, str]]:
        base = self.cfg.url.rstrip("/") + "/"
        url = urllib.parse.urljoin(base, ref.url)
        a, b = urllib.parse.urlsplit(base), urllib.parse.urlsplit(url)
        if b.scheme not in ("http", "https"):
            raise UpdateRefused("download", f"refusing a {b.scheme or 'relative'} URL: {url}")
        headers = {"User-Agent": "flowfleet-agent"}
        token = read_token(self.cfg)
        # The token goes only to the registry itself, never to another host.
        if token and (a.scheme, a.netloc) == (b.scheme, b.netloc):
            headers["Authorization"] = f"Bearer {token}"
        return url, headers

    def download(self, ref: ModelRef, doc: dict[str, Any]) -> Path:
        from flowfleet import signing

        final = self.models_dir / (
            f"{ref.name}-v{ref.version}-{ref.sha256[:12]}{EXTENSIONS[doc['runtime']]}"
        )
        if final.exists():
            try:
                signing.verify_artifact(final, doc)
                return final
            except signing.VerificationError:
                final.chmod(0o644)
                final.unlink()
        part = final.with_name(final.name + ".part")
        size = doc["size"]
        url, headers = self._url(ref)
        last_error = "no attempt"
        for attempt in range(1, self.cfg.download_attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            try:
                self._fetch(url, headers, part, have, size, ref)
            except UpdateRefused:
                raise
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                got = part.stat().st_size if part.exists() else 0
                delay = min(2.0 ** (attempt - 1), 30.0)
                log.warning(
                    "download of %s v%d broke at %d/%d bytes (%s); resuming in %.0fs",
                    ref.name,
                    ref.version,
                    got,
                    size,
                    last_error,
                    delay,
                )
                if self._stop.wait(delay):
                    raise UpdateRefused("download", "agent stopping") from None
        have = part.stat().st_size if part.exists() else 0
        if have != size:
            raise UpdateRefused(
                "download",
                f"gave up after {self.cfg.download_attempts} attempts at "
                f"{have}/{size} bytes: {last_error}",
                transient=True,
            )
        try:
            signing.verify_artifact(part, doc)
        except signing.VerificationError as exc:
            part.unlink(missing_ok=True)
            raise UpdateRefused("checksum", f"downloaded artifact refused: {exc}") from None
        part.chmod(0o555 if doc["runtime"] == "eim" else 0o444)
        os.replace(part, final)
        return final

    def _fetch(self, url, headers, part: Path, have: int, size: int, ref: ModelRef) -> None:
        req = urllib.request.Request(url, headers=headers)
        if have:
            req.add_header("Range", f"bytes={have}-")
            req.add_header("If-Range", f'"{ref.sha256}"')
        try:
            resp = urllib.request.urlopen(req, timeout=self.cfg.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                part.unlink(missing_ok=True)
                raise OSError("416 range not satisfiable; starting over") from None
            if exc.code in (400, 401, 403, 404, 410):
                raise UpdateRefused(
                    "download", f"HTTP {exc.code} {exc.reason} from {url}"
                ) from None
            raise
        with resp:
            self._check_headers(resp, part, size, ref)
            if resp.status == 206:
                if not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
                    raise OSError(f"unexpected Content-Range {resp.headers.get('Content-Range')}")
                mode = "ab"
            else:
                mode, have = "wb", 0
            if have:
                log.info("resuming %s v%d at byte %d of %d", ref.name, ref.version, have, size)
            next_log = 0.0
            with part.open(mode) as fh:
                while block := resp.read(BLOCK):
                    fh.write(block)
                    have += len(block)
                    if have > size:
                        part.unlink(missing_ok=True)
                        raise UpdateRefused(
                            "checksum",
                            f"the server sent more than the signed manifest's {size} bytes",
                        )
                    now = time.monotonic()
                    if now >= next_log or have == size:
                        next_log = now + 1.0
                        log.info(
                            "downloading %s v%d: %d/%d bytes (%.0f%%)",
                            ref.name,
                            ref.version,
                            have,
                            size,
                            100.0 * have / max(size, 1),
                        )
                    if self._stop.is_set():
                        raise UpdateRefused("download", "agent stopping")
                fh.flush()
                os.fsync(fh.fileno())

    def _check_headers(self, resp, part: Path, size: int, ref: ModelRef) -> None:
        """Refuse at once what the response headers already show is another artifact."""
        problem = None
        digest = resp.headers.get("X-Checksum-Sha256")
        if digest and digest.strip().lower() != ref.sha256:
            problem = f"the server's artifact has sha256 {digest.strip()}"
        total = None
        if resp.status == 206:
            crange = resp.headers.get("Content-Range") or ""
            total = crange.rpartition("/")[2]
        elif resp.status == 200:
            total = resp.headers.get("Content-Length")
        if problem is None and total and total.isdigit() and int(total) != size:
            problem = f"the server's artifact is {total} bytes"
        if problem:
            part.unlink(missing_ok=True)
            raise UpdateRefused(
                "checksum", f"{problem}; the signed manifest says {size} bytes, sha256 {ref.sha256}"
            )

    def _labels_file(self, path: Path, doc: dict[str, Any]) -> str | None:
        labels = (doc.get("metadata") or {}).get("labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) and x and "\n" not in x for x in labels)
        ):
            return None
        out = path.with_name(path.name + ".labels.txt")
        out.write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
        return str(out)

    def _budget_ms(self, cam) -> float | None:
        if self.cfg.gate_max_ms is not None:
            return self.cfg.gate_max_ms
        if not cam.latencies:
            return None
        return self.cfg.gate_latency_factor * 1000.0 * statistics.median(cam.latencies)

    def load_and_gate(self, cam, path: Path, labels: str | None):
        from .detectors import ModelError, load_detector
        from .labels import ClassFilter

        c = cam.config
        try:
            detector = load_detector(
                path, labels=labels, threads=c.threads, conf_threshold=c.conf_threshold
            )
        except ModelError as exc:
            raise UpdateRefused("load", str(exc)) from None
        try:
            ClassFilter(c.classes, detector.labels)
        except ValueError as exc:
            detector.close()
            raise UpdateRefused("health_gate", f"the model cannot count: {exc}") from None
        frame = cam.last_frame
        if frame is None:
            frame = np.full((480, 640, 3), 114, np.uint8)
        budget = self._budget_ms(cam)
        times = []
        try:
            for _ in range(GATE_RUNS):
                t0 = time.perf_counter()
                detector.detect(frame)
                times.append(1000.0 * (time.perf_counter() - t0))
        except Exception as exc:
            detector.close()
            raise UpdateRefused(
                "health_gate", f"sanity inference failed: {type(exc).__name__}: {exc}"
            ) from None
        ms = statistics.median(times)
        if budget is not None and ms > budget:
            detector.close()
            raise UpdateRefused(
                "health_gate",
                f"sanity inference took {ms:.1f} ms, over the latency budget of {budget:.1f} ms",
            )
        return detector, ms, "none" if budget is None else f"{budget:.1f} ms"

    def activate(self, cam, ref: ModelRef, path: Path, labels, detector, desired, message):
        name = cam.config.name
        previous = self.active.get(name) or {
            "model": None,
            "version": None,
            "sha256": None,
            "path": cam.model_path,
            "labels": cam.labels_path,
        }
        previous = {k: v for k, v in previous.items() if k != "previous"}
        with cam.lock:
            pipeline = cam.pipeline
            if pipeline is not None:
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
                    on_trip=lambda p, n=name: self._jobs.put(("trip", n, p)),
                    on_pass=lambda p, n=name: self._jobs.put(("pass", n, p)),
                )
                install_detector(pipeline, probe, cam.config.classes)
                cam.classes = tuple(pipeline.counted_classes)
            cam.model_path, cam.labels_path = str(path), labels
            if cam.drift is not None:
                cam.drift.model = path.name
        if pipeline is None:
            detector.close()  # the camera is not running: its next start loads the file
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

    def _rollback(self, name: str, probe: ProbationDetector) -> None:
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
                if cam.drift is not None:
                    cam.drift.model = Path(cam.model_path).name
                if prev.get("model"):
                    self.active[name] = prev
                else:
                    self.active.pop(name, None)
                self._save()
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
            f"{ref.name} v{ref.version} raised {probe.errors} times in its first "
            f"{probe.seen + probe.errors} frames (last: {probe.last_error}); camera {name} "
            f"runs {Path(cam.model_path).name} again",
            desired=self.applied_version or 1,
            reason="crashed",
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
        keep = set()
        with self._lock:
            for rec in self.active.values():
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
