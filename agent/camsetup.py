"""Camera set-up from the registry: pushed lines and zones, calibration snapshots.

The updater hands every desired state it accepts (and, after a restart, the retained
one it had applied) to `CameraSetup.apply`:

* ``geometry`` (camera -> lines and zones): checked with the agent's own config
  models (`LineSpec`, `ZoneSpec`), then swapped into the running pipeline between two
  frames, under the camera's lock, without restarting the camera. A line or zone
  whose name and points are unchanged keeps its counter object (and so its per-track
  state: a track half-way across still counts once); a line keeps its configured
  hysteresis by name. A removed zone's open visits are closed (their exits counted).
  The geometry is persisted in ``<state_dir>/geometry.json``, so a restarted agent
  counts with it before the broker is back, and reported in the reported state's
  ``geometry``. Events: ``geometry_applied``, ``geometry_failed``.
* ``snapshot`` (camera -> request id): for each id newer than the last one served,
  one JPEG of the camera's newest frame is sent to the registry over HTTP with the
  device token (``PUT /api/devices/<id>/cameras/<camera>/snapshot?request=N``). No
  image ever leaves the device without such a request; ids served are persisted, so
  a retained desired state delivered again after a restart sends nothing. Events:
  ``snapshot_sent``, ``snapshot_failed``.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import ValidationError

from flowfleet.contract import Desired
from flowfleet.contract_device import CameraGeometry, Homography, LineGeometry, ZoneGeometry

from .config import CameraConfig, LineSpec, ZoneSpec, read_token
from .counting import LineCounter, ZoneCounter
from .speed import GroundPlane, HomographySpec, SpeedEstimator, SpeedSpec
from .state_file import load_state, save_state

log = logging.getLogger(__name__)

GEOMETRY_FILE = "geometry.json"
MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024  # the registry's cap (registry.fleet.camsetup)
SNAPSHOT_FRAME_WAIT_S = 30.0  # a camera without a frame yet: wait this long for one


def geometry_of(c: CameraConfig) -> CameraGeometry:
    """One camera's lines, zones and speed calibration in the contract's form
    (ValueError when outside the contract's bounds)."""
    h = c.speed.homography if c.speed is not None else None
    return CameraGeometry(
        camera=c.name,
        lines=tuple(LineGeometry(name=x.name, points=x.points) for x in c.lines),
        zones=tuple(ZoneGeometry(name=x.name, points=x.points) for x in c.zones),
        speed=c.speed is not None,
        homography=None if h is None else Homography(image=h.image, ground=h.ground),
    )


class CameraSetup:
    """Geometry and snapshots of one `AgentService` (see the module docstring)."""

    def __init__(self, service) -> None:
        self.service = service
        self._path = Path(service.config.state_dir) / GEOMETRY_FILE
        self._lock = threading.Lock()
        doc = self._load()
        self.served: dict[str, int] = dict(doc.get("snapshots", {}))
        self.pushed: dict[str, dict] = dict(doc.get("cameras", {}))
        for name, geo in self.pushed.items():  # before any pipeline is built
            cam = service.cameras.get(name)
            if cam is None:
                continue
            try:
                lines, zones, speed = self._specs(cam.config, geo)
            except (ValidationError, ValueError) as exc:
                log.error(
                    "%s: camera %s geometry unusable (%s); using the config's",
                    self._path,
                    name,
                    exc,
                )
                continue
            update = {"lines": lines, "zones": zones, "speed": speed}
            cam.config = cam.config.model_copy(update=update)

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> dict:
        return load_state(self._path, "cameras start with their configured geometry")

    def _save(self) -> None:
        with self._lock:
            save_state(self._path, {"cameras": self.pushed, "snapshots": self.served})

    # -- reported ------------------------------------------------------------------------

    def reported(self) -> tuple[CameraGeometry, ...] | None:
        """Each camera's lines and zones as it counts now (None when out of bounds)."""
        try:
            return tuple(geometry_of(c.config) for c in self.service.cameras.values())
        except ValueError as exc:
            log.warning("camera geometry left out of the reported state: %s", exc)
            return None

    # -- desired state -------------------------------------------------------------------

    def apply(self, desired: Desired) -> None:
        """Apply the desired geometry, then answer new snapshot requests."""
        changed = False
        for camera, geo in sorted((desired.geometry or {}).items()):
            doc = geo.model_dump(mode="json")
            if self.pushed.get(camera) == doc and camera in self.service.cameras:
                continue  # applied already (a retained copy after a restart)
            try:
                self.apply_camera(camera, doc)
            except (ValidationError, ValueError, KeyError) as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._event(
                    "geometry_failed",
                    f"camera {camera}: geometry of desired state {desired.version} refused: {why}",
                    camera,
                    severity="error",
                    desired_version=desired.version,
                )
                continue
            self.pushed[camera] = doc
            changed = True
            self._event(
                "geometry_applied",
                f"camera {camera} counts with {len(geo.lines)} line(s) and {len(geo.zones)} "
                f"zone(s) from desired state {desired.version}",
                camera,
                desired_version=desired.version,
            )
        if changed:
            self._save()
        for camera, request_id in sorted((desired.snapshot or {}).items()):
            if request_id > self.served.get(camera, 0):
                self.served[camera] = request_id  # asked once, sent at most once
                self._save()
                threading.Thread(
                    target=self._snapshot,
                    args=(camera, request_id),
                    name=f"snapshot-{camera}",
                    daemon=True,
                ).start()

    @staticmethod
    def _specs(
        config, geo: dict
    ) -> tuple[tuple[LineSpec, ...], tuple[ZoneSpec, ...], SpeedSpec | None]:
        hysteresis = {ln.name: ln.hysteresis for ln in config.lines}
        lines = tuple(
            LineSpec(
                name=ln["name"],
                points=ln["points"],
                **({"hysteresis": hysteresis[ln["name"]]} if ln["name"] in hysteresis else {}),
            )
            for ln in geo.get("lines", [])
        )
        zones = tuple(ZoneSpec(name=z["name"], points=z["points"]) for z in geo.get("zones", []))
        for ln in lines:  # the counter's own check (a line under a pixel long)
            LineCounter(ln.name, ln.points[0], ln.points[1])
        speed = config.speed
        if geo.get("homography") is not None:
            h = HomographySpec.model_validate(geo["homography"])  # refuses degenerate ones
            speed = (
                SpeedSpec(homography=h)
                if speed is None
                else speed.model_copy(update={"homography": h})
            )
        return lines, zones, speed

    def apply_camera(self, camera: str, geo: dict) -> None:
        """Swap ``camera``'s lines and zones between two frames (see the module)."""
        s = self.service
        cam = s.cameras.get(camera)
        if cam is None:
            raise KeyError(f"this device has no camera {camera!r}")
        lines, zones, speed = self._specs(cam.config, geo)
        flushed, flushed_speeds = [], []
        with cam.lock:
            pipeline = cam.pipeline
            if pipeline is not None:
                anchor = cam.config.anchor
                old_lines = {c.name: c for c in pipeline.lines}
                new_lines = []
                for spec in lines:
                    old = old_lines.get(spec.name)
                    same = (
                        old is not None
                        and tuple(map(tuple, (old.a, old.b))) == spec.points
                        and old.hysteresis == spec.hysteresis
                    )
                    new_lines.append(
                        old
                        if same
                        else LineCounter(
                            spec.name,
                            spec.points[0],
                            spec.points[1],
                            hysteresis=spec.hysteresis,
                            anchor=anchor,
                        )
                    )
                old_zones = {z.name: z for z in pipeline.zones}
                exit_after = next(iter(old_zones.values())).exit_after_s if old_zones else None
                if exit_after is None:
                    cfg = pipeline.tracker.config
                    fps = float(
                        getattr(s._sources.get(camera), "delivered_fps", 0) or cam.config.fps
                    )
                    exit_after = cfg.lost_buffer / fps
                new_zones = []
                for spec in zones:
                    old = old_zones.get(spec.name)
                    if old is not None and tuple(map(tuple, old.polygon)) == spec.points:
                        new_zones.append(old)
                    else:
                        new_zones.append(
                            ZoneCounter(
                                spec.name, list(spec.points), anchor=anchor, exit_after_s=exit_after
                            )
                        )
                kept = {id(z) for z in new_zones}
                for zone in pipeline.zones:
                    if id(zone) not in kept:  # removed or moved: close its open visits
                        flushed.extend(zone.flush(time.time()))
                pipeline.lines, pipeline.zones = new_lines, new_zones
                if speed is not None and speed != cam.config.speed:
                    flushed_speeds = self._swap_speed(pipeline, speed, anchor, exit_after)
            cam.config = cam.config.model_copy(
                update={"lines": lines, "zones": zones, "speed": speed}
            )
        if flushed or flushed_speeds:
            with s._tally_lock:
                for ev in flushed:
                    s._tally.add_zone_event(camera, ev)
                for ev in flushed_speeds:
                    s._tally.add_speed(camera, ev)
        log.info(
            "camera %s: geometry replaced (%d lines, %d zones)", camera, len(lines), len(zones)
        )

    @staticmethod
    def _swap_speed(pipeline, speed: SpeedSpec, anchor: str, lost_s: float) -> list:
        """A new calibration: tracks measured so far end with their speeds (on the old
        plane), and new measurements start on the new one."""
        est = pipeline.speed
        if est is None:
            pipeline.speed = SpeedEstimator(speed, anchor=anchor, forget_after_s=max(lost_s, 0.5))
            return []
        ended = est.flush(time.time())
        est.spec, est.plane = speed, GroundPlane(speed.homography)
        return ended

    # -- snapshots -----------------------------------------------------------------------

    def _snapshot(self, camera: str, request_id: int) -> None:
        try:
            size = self.send_snapshot(camera, request_id)
        except Exception as exc:
            self._event(
                "snapshot_failed",
                f"camera {camera}: snapshot {request_id} not sent: {exc}",
                camera,
                severity="warning",
                request=request_id,
            )
            return
        self._event(
            "snapshot_sent",
            f"camera {camera}: snapshot {request_id} sent ({size} bytes)",
            camera,
            request=request_id,
            bytes=size,
        )

    def send_snapshot(self, camera: str, request_id: int) -> int:
        """Encode the camera's newest frame as JPEG and PUT it; returns its size."""
        import cv2

        s = self.service
        cam = s.cameras.get(camera)
        if cam is None:
            raise ValueError(f"this device has no camera {camera!r}")
        deadline = time.monotonic() + SNAPSHOT_FRAME_WAIT_S
        while cam.last_frame is None:
            if time.monotonic() > deadline or s._stop.wait(0.1):
                raise ValueError("the camera delivered no frame")
        image = cam.last_frame
        quality = 85
        while True:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError("JPEG encoding failed")
            data = buf.tobytes()
            if len(data) <= MAX_SNAPSHOT_BYTES:
                break
            quality -= 15  # a huge frame: lower the quality until it fits the cap
            if quality < 20:
                raise ValueError(f"the frame does not fit {MAX_SNAPSHOT_BYTES} bytes as JPEG")
        cfg = s.config.registry
        url = (
            f"{cfg.url.rstrip('/')}/api/devices/{s.device}/cameras/{camera}/snapshot"
            f"?request={request_id}"
        )
        headers = {"Content-Type": "image/jpeg"}
        token = read_token(cfg)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=data, headers=headers, method="PUT")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()[:300].decode("utf-8", "replace")
            raise ValueError(f"the registry answered {exc.code}: {body}") from None
        return len(data)

    def _event(self, type_: str, message: str, camera: str, *, severity="info", **data) -> None:
        try:
            self.service.event(type_, message, severity=severity, camera=camera, **data)
        except Exception:
            log.exception("could not record the %s event", type_)
