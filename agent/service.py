"""The long-running agent: cameras -> count bins -> outbox -> MQTT.

Each camera runs its pipeline on its own thread; all cameras share one open bin,
one outbox and one MQTT connection. Every ``bin_seconds`` (aligned to the wall
clock) the open bin is closed and enqueued with the next count sequence number,
together with how far each file camera had read (so a restarted agent resumes there
instead of counting the file again), and every ``health_seconds`` a health beat is
enqueued. A camera that fails is reported (health beat and event) and restarted with
exponential backoff while the others count on.

A housekeeping thread applies the outbox cap once a second (reporting every drop as
a log line, an ``outbox_dropped`` event and the health beat's ``outbox_dropped``),
and pings the systemd watchdog while the agent's threads are alive.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from flowfleet import __version__
from flowfleet.contract import (
    MAX_WINDOW_S,
    CameraHealth,
    CountBin,
    DriftSummary,
    Event,
    Health,
    Status,
    SystemHealth,
    Topics,
    TrackerThresholds,
)
from flowfleet.contract_device import CameraGeometry
from flowfleet.mqtt import BrokerAddress, MqttConnection, Will

from .camsetup import geometry_of
from .config import AgentConfig, CameraConfig, read_password
from .delivery import Delivery
from .drift import DriftWindow, RecordingDetector
from .outbox import Position
from .pipeline import CameraPipeline, build_pipeline
from .publisher import Publisher
from .resume import is_resumable, open_camera_source, source_size
from .sdnotify import Notifier
from .system_stats import SystemStats
from .tally import Tally

log = logging.getLogger(__name__)


def camera_geometry(config: AgentConfig) -> tuple[CameraGeometry, ...] | None:
    """Each camera's counting lines and zones, for the online status; None (left out,
    logged) when the config holds geometry outside the contract's bounds."""
    try:
        return tuple(geometry_of(c) for c in config.cameras)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        log.warning("camera geometry left out of the status: %s", exc)
        return None


@dataclass
class CameraState:
    config: CameraConfig
    state: str = "starting"
    error: str | None = None
    frames: int = 0
    dropped_frames: int = 0
    fps: float = 0.0
    inference_ms: float = 0.0
    restarts: int = 0
    classes: tuple[str, ...] = ()  # what the camera counts, known once its model loaded
    position: Position | None = None  # next frame to read once the open bin is stored
    latencies: deque = field(default_factory=lambda: deque(maxlen=512))
    drift: DriftWindow | None = None
    # The model file the camera runs (the config's, or one a model update activated),
    # the running pipeline, and the lock a model swap takes between two frames.
    model_path: str = ""
    labels_path: str | None = None
    pipeline: CameraPipeline | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_frame: object = None  # the newest frame, for a new model's health gate
    last_frame_at: float = 0.0  # time.monotonic() of last_frame (0: none yet)
    shadow: object = None  # a ShadowRunner comparing a candidate model (agent.shadow)

    def p95_ms(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(1000.0 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2)


class AgentService:
    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.device = config.device_id
        self.version = __version__
        self.topics = Topics(config.broker.topic_root)
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        # Imported here so `flowfleet count` never opens a database.
        from .outbox import Outbox

        self.outbox = Outbox(state_dir / "outbox.sqlite")
        ob = config.outbox
        self.publisher = Publisher(
            self.outbox,
            window=ob.inflight,
            rate=ob.send_rate,
            confirm_counts=ob.confirm == "registry",
            confirm_timeout_s=ob.confirm_timeout_s,
            confirm_timeout_max_s=ob.confirm_timeout_max_s,
            on_refused=lambda topic, reason: self.delivery.on_publish_refused(topic, reason),
        )
        self.delivery = Delivery(config, self.outbox, self.publisher, self.event)
        self.cameras = {c.name: CameraState(c) for c in config.cameras}
        self._saved_positions = self.outbox.positions()
        self._tally = Tally()
        self._tally_lock = threading.Lock()
        self._bin_start = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: dict[str, object] = {}
        self.started = time.monotonic()
        self.notifier = notifier or Notifier()
        self.system = SystemStats(state_dir)
        from .hardware import probe

        self.hardware = probe()  # once: the online status reports it on every connect
        self.last_system: SystemHealth | None = None
        self.metrics = None
        self.connection = self._make_connection()
        from .updater import ModelUpdater

        self.updater = ModelUpdater(self)
        from .shadow_control import ShadowManager

        self.shadows = ShadowManager(self)
        from .camsetup import CameraSetup

        self.setup = CameraSetup(self)  # pushed geometry replaces the config's here
        from .renewal import CertificateRenewer

        self.renewer = CertificateRenewer(self)
        for cam in self.cameras.values():
            cam.model_path, cam.labels_path = self.updater.model_for(cam.config)

    # -- wiring ----------------------------------------------------------------------

    def _make_connection(self) -> MqttConnection:
        b = self.config.broker
        address = BrokerAddress(
            b.host, b.port, b.username, read_password(b), b.ca_file, b.cert_file, b.key_file
        )
        offline = Status(device=self.device, state="offline").to_json()
        conn = MqttConnection(
            f"flowfleet-agent-{self.device}",
            address,
            will=Will(self.topics.status(self.device), offline),
            on_connect=self._on_connect,
            keepalive=b.keepalive_s,
            max_inflight=self.config.outbox.inflight,
            reconnect_min_s=b.reconnect_min_s,
            reconnect_max_s=b.reconnect_max_s,
        )
        self.publisher.attach(conn)
        return conn

    def _on_connect(self) -> None:
        self.delivery.on_connect()
        online = Status(
            device=self.device,
            state="online",
            ts=time.time(),
            agent_version=__version__,
            hardware=self.hardware,
            cameras=camera_geometry(
                self.config.model_copy(
                    update={"cameras": tuple(c.config for c in self.cameras.values())}
                )
            ),
        )
        self.connection.publish(self.topics.status(self.device), online.to_json(), retain=True)
        self.updater.publish_reported()
        self.publisher.on_connect()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        log.info(
            "agent %s starting: %d camera(s), broker %s, outbox depth %d, next count seq %d",
            self.device,
            len(self.cameras),
            self.connection.address,
            self.outbox.depth(),
            self.outbox.last_seq("counts") + 1,
        )
        b = self.config.broker
        if b.username and b.username != self.device:
            log.warning(
                "broker.username %r differs from device_id %r: a broker with flowfleet's "
                "generated ACL lets a device publish only under its own username",
                b.username,
                self.device,
            )
        if self.config.metrics.port:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self, self.config.metrics.host, self.config.metrics.port)
        if self.config.outbox.confirm == "registry":
            # Retained: the broker hands over the registry's latest ack on subscribe.
            self.connection.subscribe(self.topics.ack(self.device), self.delivery.on_registry_ack)
        if self.updater.enabled:
            # Retained: the broker hands over the current desired state on subscribe.
            self.connection.subscribe(self.topics.desired(self.device), self.updater.on_desired)
            self.updater.start()
            self.shadows.start()
        self.connection.start()
        self.publisher.start()
        for cam in self.cameras.values():
            self._spawn(self._camera_loop, cam, name=f"camera-{cam.config.name}")
        self._spawn(self._bin_loop, name="bins")
        self._spawn(self._health_loop, name="health")
        if self.config.drift_seconds:
            self._spawn(self._drift_loop, name="drift")
        self._spawn(self._housekeeping_loop, name="housekeeping")
        self.renewer.start(self._stop)
        self.notifier.ready(f"counting with {len(self.cameras)} camera(s)")

    def _spawn(self, target, *args, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Finish the current frames, enqueue the open bin, send what we can, disconnect.

        The clean disconnect means the broker does not publish the Last Will; the
        agent publishes its retained ``offline`` status itself.
        """
        self.notifier.stopping("flushing the open bin")
        self._stop.set()
        self.updater.stop()
        for src in list(self._sources.values()):
            src.stop()
        for t in self._threads:
            t.join(10)
        self.close_bin()
        if self.config.drift_seconds:
            self.close_drift_windows()
        self.shadows.stop()
        self.delivery.report_drops(force=True)
        if self.connection.connected.is_set():
            # Until the registry confirmed the last bins too, so a clean stop leaves
            # nothing to resend; bins still unconfirmed at the timeout stay (the
            # registry's retained ack settles them after the next start).
            self.publisher.wait_drained(
                drain_timeout, confirmed=self.config.outbox.confirm == "registry"
            )
            offline = Status(device=self.device, state="offline", ts=time.time())
            mid = self.connection.publish(
                self.topics.status(self.device), offline.to_json(), retain=True
            )
            if mid is not None:
                time.sleep(0.1)  # let paho's thread write it before the DISCONNECT
        self.publisher.stop()
        self.connection.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.outbox.close()
        self.notifier.close()
        log.info("agent %s stopped", self.device)

    # -- bins, events and health -------------------------------------------------------

    def close_bin(self) -> CountBin | None:
        """Enqueue the open bin (even if empty: zero is a count) and open the next.

        The bin, the cumulative totals and each file camera's read position are
        committed (fsync) in one transaction.
        """
        now = time.time()
        with self._tally_lock:
            tally, self._tally = self._tally, Tally()
            start, self._bin_start = self._bin_start, now
            positions = {name: cam.position for name, cam in self.cameras.items() if cam.position}
        # A clock that jumped (a Pi without a real-time clock syncing NTP) must not make
        # the window invalid: the counts are real, their window is what we know of it.
        if not now - MAX_WINDOW_S <= start <= now:
            log.warning(
                "the clock jumped: bin window %.3f..%.3f clamped to at most %.0f s",
                start,
                now,
                MAX_WINDOW_S,
            )
            start = min(max(start, now - MAX_WINDOW_S), now)
        self._declare_zero_rows(tally)
        count_bin = self.outbox.enqueue_bin(
            self.topics.counts(self.device),
            lambda seq: CountBin(
                device=self.device,
                seq=seq,
                start=round(start, 3),
                end=round(now, 3),
                lines=tally.line_counts(),
                zones=tally.zone_counts(),
                speeds=tally.speed_counts(),
            ),
            positions=positions,
        )
        self.publisher.notify()
        return count_bin

    def _declare_zero_rows(self, tally: Tally) -> None:
        """A quiet line reports explicit zeros, so "nothing passed" differs from "no data"."""
        for cam in self.cameras.values():
            for line in cam.config.lines:
                tally.declare_line(cam.config.name, line.name, list(cam.classes))

    def event(
        self,
        type_: str,
        message: str,
        *,
        severity: str = "info",
        camera: str | None = None,
        **data,
    ) -> int:
        """Log an event and enqueue it for the registry; returns its seq."""
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        log.log(level, "event %s: %s", type_, message)
        ts = time.time()
        seq = self.outbox.enqueue(
            "events",
            self.topics.events(self.device),
            lambda seq: Event(
                device=self.device,
                seq=seq,
                ts=round(ts, 3),
                type=type_,
                severity=severity,
                camera=camera,
                message=message[:1024],
                data=data,
            ).to_json(),
        )
        self.publisher.notify()
        return seq

    def _bin_loop(self) -> None:
        period = self.config.bin_seconds
        while True:
            now = time.time()
            boundary = math.floor(now / period) * period + period
            if self._stop.wait(boundary - now):
                return
            try:
                self.close_bin()
            except Exception:  # a full disk must not kill the loop; the next bin retries
                log.exception("could not enqueue the count bin; its counts move to the next")

    def close_drift_windows(self) -> int:
        """Enqueue each camera's drift summary for the window now ending; returns how many."""
        now = time.time()
        n = 0
        for cam in self.cameras.values():
            summary = cam.drift.take(self.device, now) if cam.drift else None
            if summary is not None:
                self.enqueue_drift(summary, notify=False)
                n += 1
        if n:
            self.publisher.notify()
        return n

    def enqueue_drift(self, summary: DriftSummary, *, notify: bool = True) -> None:
        """Enqueue one drift summary (its seq is assigned here)."""
        self.outbox.enqueue(
            "drift",
            self.topics.drift(self.device),
            lambda seq, s=summary: s.model_copy(update={"seq": seq}).to_json(),
        )
        if notify:
            self.publisher.notify()

    def _drift_loop(self) -> None:
        period = self.config.drift_seconds
        while True:
            now = time.time()
            boundary = math.floor(now / period) * period + period
            if self._stop.wait(boundary - now):
                return
            try:
                self.close_drift_windows()
            except Exception:
                log.exception("could not enqueue drift summaries")

    def _camera_state(self, name: str, cam: CameraState) -> tuple[str, str | None]:
        """A live stream that is (re)connecting reports `starting` with the reason."""
        source = self._sources.get(name)
        live_state = getattr(source, "state", None)
        if cam.state == "running" and live_state in ("connecting", "reconnecting"):
            return "starting", getattr(source, "error", None) or live_state
        return cam.state, cam.error

    def health(self) -> Health:
        states = {name: self._camera_state(name, c) for name, c in self.cameras.items()}
        cams = tuple(
            CameraHealth(
                camera=name,
                state=states[name][0],
                fps=round(c.fps, 2),
                inference_ms=round(c.inference_ms, 2),
                inference_p95_ms=c.p95_ms(),
                frames=c.frames,
                dropped_frames=c.dropped_frames,
                model=Path(c.model_path).name,
                error=states[name][1],
                restarts=c.restarts,
                thresholds=_thresholds(c),
            )
            for name, c in self.cameras.items()
        )
        try:
            self.last_system = self.system.sample()
        except Exception:  # odd /proc contents must not cost the beat
            log.debug("system stats failed", exc_info=True)
        dropped = sum(n for k, n in self.outbox.counters().items() if k.startswith("dropped."))
        return Health(
            device=self.device,
            seq=1,
            ts=round(time.time(), 3),
            uptime_s=round(self.uptime(), 1),
            outbox_depth=self.outbox.depth(),
            outbox_dropped=dropped,
            publish_refused=self.publisher.refused or None,
            error=self.delivery.last_error,
            cameras=cams,
            system=self.last_system,
            agent_version=self.version,
        )

    def _health_loop(self) -> None:
        # The first beat goes out as soon as every camera has started (or failed),
        # at most 2 s after start, so the fleet sees a new agent at once.
        first_by = time.monotonic() + min(2.0, self.config.health_seconds)
        while time.monotonic() < first_by and any(
            c.state == "starting" for c in self.cameras.values()
        ):
            if self._stop.wait(0.05):
                return
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.config.health_seconds
            try:
                beat = self.health()
                self.outbox.enqueue(
                    "health",
                    self.topics.health(self.device),
                    lambda seq, beat=beat: beat.model_copy(update={"seq": seq}).to_json(),
                )
                self.publisher.notify()
            except Exception:
                log.exception("could not enqueue a health beat")

    # -- watchdog --------------------------------------------------------------------------

    def _alive(self) -> bool:
        """The loops the watchdog vouches for: bins, health and the publisher."""
        named = {t.name: t for t in self._threads}
        publisher = self.publisher._thread
        return (
            all(named[n].is_alive() for n in ("bins", "health") if n in named)
            and publisher is not None
            and publisher.is_alive()
        )

    def _housekeeping_loop(self) -> None:
        wd = self.notifier.watchdog_s
        interval = min(1.0, wd / 3) if wd else 1.0
        while not self._stop.wait(interval):
            try:
                self.delivery.enforce_limits()
            except Exception:
                log.exception("outbox housekeeping failed")
            if wd and self._alive():
                self.notifier.watchdog()

    # -- cameras ---------------------------------------------------------------------

    def _camera_loop(self, cam: CameraState) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            frames_before = cam.frames
            try:
                self._run_camera(cam)
                if not cam.config.loop:
                    cam.state = "stopped"
                    return
            except Exception as exc:  # one camera's failure must not stop the others
                previous = cam.error
                cam.state, cam.error = "failed", f"{type(exc).__name__}: {exc}"
                cam.restarts += 1
                if cam.frames > frames_before:
                    backoff = 1.0  # it ran since the last failure: start the backoff over
                log.error("camera %s failed: %s; retrying in %.0fs", cam.config.name, exc, backoff)
                # An event for a new error, then every 10th retry of the same one.
                if cam.error != previous or cam.restarts % 10 == 0:
                    self._camera_failed_event(cam, backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 60.0)

    def _camera_failed_event(self, cam: CameraState, backoff: float) -> None:
        try:
            self.event(
                "camera_failed",
                f"camera {cam.config.name} failed: {cam.error}; retrying in {backoff:.0f}s",
                severity="error",
                camera=cam.config.name,
                restarts=cam.restarts,
            )
        except Exception:
            log.exception("could not record the camera failure event")

    def _start_position(self, cam: CameraState) -> int:
        """Where to start reading: the open bin's position, else the persisted one."""
        c = cam.config
        size = source_size(c.source)
        current = cam.position or self._saved_positions.get(c.name)
        if current is None:
            return 0
        if current.source != c.source or current.source_size != size:
            log.info("camera %s: source changed since the last run; starting over", c.name)
            return 0
        return current.pos

    def _run_camera(self, cam: CameraState) -> None:
        c = cam.config
        start_frame = self._start_position(cam)
        source = open_camera_source(
            c.source,
            start_frame=start_frame,
            loop=c.loop,
            realtime=c.realtime,
            fps_cap=c.fps_cap,
            fps=c.fps,
        )
        self._sources[c.name] = source
        resumable = is_resumable(source)
        pipeline: CameraPipeline = build_pipeline(
            c.name,
            model=cam.model_path,
            lines=c.lines,
            zones=c.zones,
            classes=c.classes,
            labels=cam.labels_path,
            anchor=c.anchor,
            threads=c.threads,
            conf_threshold=c.conf_threshold,
            fps=source.delivered_fps,
            speed=c.speed,
            stationary=c.stationary,
            tracker=c.tracker,
        )
        cam.classes = tuple(pipeline.counted_classes)
        recorder = None
        if self.config.drift_seconds:
            recorder = RecordingDetector(pipeline.detector)
            pipeline.detector = recorder
            if cam.drift is None:
                cam.drift = DriftWindow(c.name, Path(cam.model_path).name, time.time())
        was_failed = cam.state == "failed"
        cam.state, cam.error = "running", None
        size = source_size(c.source)
        if resumable and start_frame:
            log.info(
                "camera %s resuming %s at frame %d of %s",
                c.name,
                c.source,
                start_frame,
                source.frame_count or "?",
            )
            with self._tally_lock:
                cam.position = Position(c.source, size, start_frame)
        with cam.lock:
            cam.pipeline = pipeline
        log.info("camera %s running: %s with %s", c.name, c.source, Path(cam.model_path).name)
        if given := c.tracker.given():  # what differs from the defaults, for the log
            log.info("camera %s tracker settings: %s", c.name, given)
        if was_failed:
            self.event("camera_running", f"camera {c.name} runs again", camera=c.name)
        window_t, window_n = time.monotonic(), 0
        last_ts = time.time()
        try:
            for frame in source:
                if self._stop.is_set():
                    break
                last_ts = frame.ts
                with cam.lock:  # a model swap happens between frames, never within one
                    result = pipeline.process(frame.image, frame.ts)
                    # Under the lock too: a swap closes the drift window, and this
                    # frame belongs to the window of the model that answered it.
                    if recorder is not None:
                        cam.drift.add(recorder.last, frame.image, result.inference_s)
                    if cam.shadow is not None:  # a candidate beside it; never counts
                        self.shadows.on_frame(cam, frame.image, frame.ts, result)
                cam.last_frame, cam.last_frame_at = frame.image, time.monotonic()
                self.updater.on_frame(cam)
                with self._tally_lock:
                    for ev in result.crossings:
                        self._tally.add_crossing(c.name, ev)
                    for ev in result.zone_events:
                        self._tally.add_zone_event(c.name, ev)
                    for zone, by_class in result.occupancy.items():
                        self._tally.note_occupancy(c.name, zone, by_class)
                    for ev in result.speeds:
                        self._tally.add_speed(c.name, ev)
                    if resumable:
                        cam.position = Position(c.source, size, frame.index + 1)
                cam.frames += 1
                cam.dropped_frames = int(getattr(source, "dropped_frames", 0))
                cam.inference_ms = 0.9 * cam.inference_ms + 100 * result.inference_s
                cam.latencies.append(result.inference_s)
                window_n += 1
                elapsed = time.monotonic() - window_t
                if elapsed >= 2.0:
                    cam.fps, window_t, window_n = window_n / elapsed, time.monotonic(), 0
            # End of the file or shutdown: close open zone visits and speed tracks so
            # entries are matched by exits and measured speeds reach the last bin.
            with cam.lock:
                rest = pipeline.finish(last_ts)  # frames held back by the warm-up
            with self._tally_lock:
                if rest is not None:
                    for ev in rest.crossings:
                        self._tally.add_crossing(c.name, ev)
                    for ev in rest.zone_events:
                        self._tally.add_zone_event(c.name, ev)
                    for ev in rest.speeds:
                        self._tally.add_speed(c.name, ev)
                for ev in pipeline.flush(last_ts):
                    self._tally.add_zone_event(c.name, ev)
                for ev in pipeline.flush_speeds(last_ts):
                    self._tally.add_speed(c.name, ev)
        finally:
            source.stop()
            with cam.lock:
                cam.pipeline = None
            pipeline.detector.close()


def _thresholds(cam: CameraState) -> TrackerThresholds | None:
    """The running pipeline's tracker score thresholds, for the health beat."""
    pipeline = cam.pipeline
    if pipeline is None:
        return None
    return TrackerThresholds(**pipeline.thresholds())
