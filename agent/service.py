"""The long-running agent: cameras -> count bins -> outbox -> MQTT.

Each camera runs its pipeline on its own thread; all cameras share one open bin,
one outbox and one MQTT connection. Every ``bin_seconds`` (aligned to the wall
clock) the open bin is closed and enqueued with the next count sequence number, and
every ``health_seconds`` a health beat is enqueued. A camera that fails is reported
in the health beat and restarted with exponential backoff while the others count on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flowfleet import __version__
from flowfleet.contract import CameraHealth, CountBin, Health, Status, Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection, Will

from .config import AgentConfig, CameraConfig
from .pipeline import CameraPipeline, build_pipeline
from .publisher import Publisher
from .sources import VideoFileSource
from .tally import Tally

log = logging.getLogger(__name__)


@dataclass
class CameraState:
    config: CameraConfig
    state: str = "starting"
    error: str | None = None
    frames: int = 0
    fps: float = 0.0
    inference_ms: float = 0.0
    restarts: int = 0
    classes: tuple[str, ...] = ()  # what the camera counts, known once its model loaded


class AgentService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device = config.device_id
        self.topics = Topics(config.broker.topic_root)
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        # Imported here so `flowfleet count` never opens a database.
        from .outbox import Outbox

        self.outbox = Outbox(state_dir / "outbox.sqlite")
        self.publisher = Publisher(self.outbox)
        self.cameras = {c.name: CameraState(c) for c in config.cameras}
        self._tally = Tally()
        self._tally_lock = threading.Lock()
        self._bin_start = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: dict[str, VideoFileSource] = {}
        self.started = time.monotonic()
        self.connection = self._make_connection()

    # -- wiring ----------------------------------------------------------------------

    def _make_connection(self) -> MqttConnection:
        b = self.config.broker
        password = None
        if b.password_file:
            password = Path(b.password_file).read_text().strip()
        address = BrokerAddress(
            b.host, b.port, b.username, password, b.ca_file, b.cert_file, b.key_file
        )
        offline = Status(device=self.device, state="offline").to_json()
        conn = MqttConnection(
            f"flowfleet-agent-{self.device}",
            address,
            will=Will(self.topics.status(self.device), offline),
            on_connect=self._on_connect,
        )
        self.publisher.attach(conn)
        return conn

    def _on_connect(self) -> None:
        online = Status(
            device=self.device, state="online", ts=time.time(), agent_version=__version__
        )
        self.connection.publish(self.topics.status(self.device), online.to_json(), retain=True)
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
        self.connection.start()
        self.publisher.start()
        for cam in self.cameras.values():
            self._spawn(self._camera_loop, cam, name=f"camera-{cam.config.name}")
        self._spawn(self._bin_loop, name="bins")
        self._spawn(self._health_loop, name="health")

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

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Finish frames, enqueue the open bin, send what we can, disconnect cleanly."""
        self._stop.set()
        for src in list(self._sources.values()):
            src.stop()
        for t in self._threads:
            t.join(10)
        self.close_bin()
        if self.connection.connected.is_set():
            self.publisher.wait_drained(drain_timeout)
            offline = Status(device=self.device, state="offline", ts=time.time())
            self.connection.publish(self.topics.status(self.device), offline.to_json(), retain=True)
        self.publisher.stop()
        self.connection.stop()
        self.outbox.close()
        log.info("agent %s stopped", self.device)

    # -- bins and health -------------------------------------------------------------

    def close_bin(self) -> CountBin | None:
        """Enqueue the open bin (even if empty: zero is a count) and open the next."""
        now = time.time()
        with self._tally_lock:
            tally, self._tally = self._tally, Tally()
            start, self._bin_start = self._bin_start, now
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
            ),
        )
        self.publisher.notify()
        return count_bin

    def _declare_zero_rows(self, tally: Tally) -> None:
        """A quiet line reports explicit zeros, so "nothing passed" differs from "no data"."""
        for cam in self.cameras.values():
            for line in cam.config.lines:
                tally.declare_line(cam.config.name, line.name, list(cam.classes))

    def _bin_loop(self) -> None:
        period = self.config.bin_seconds
        while True:
            now = time.time()
            boundary = math.floor(now / period) * period + period
            if self._stop.wait(boundary - now):
                return
            self.close_bin()

    def health(self) -> Health:
        cams = tuple(
            CameraHealth(
                camera=name,
                state=c.state,
                fps=round(c.fps, 2),
                inference_ms=round(c.inference_ms, 2),
                frames=c.frames,
                model=Path(c.config.model).name,
                error=c.error,
            )
            for name, c in self.cameras.items()
        )
        return Health(
            device=self.device,
            seq=1,
            ts=time.time(),
            uptime_s=round(time.monotonic() - self.started, 1),
            outbox_depth=self.outbox.depth(),
            cameras=cams,
        )

    def _health_loop(self) -> None:
        while not self._stop.wait(self.config.health_seconds):
            beat = self.health()
            self.outbox.enqueue(
                "health",
                self.topics.health(self.device),
                lambda seq, beat=beat: beat.model_copy(update={"seq": seq}).to_json(),
            )
            self.publisher.notify()

    # -- cameras ---------------------------------------------------------------------

    def _camera_loop(self, cam: CameraState) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._run_camera(cam)
                if not cam.config.loop:
                    cam.state = "stopped"
                    return
            except Exception as exc:  # one camera's failure must not stop the others
                cam.state, cam.error = "failed", f"{type(exc).__name__}: {exc}"
                cam.restarts += 1
                log.error("camera %s failed: %s; retrying in %.0fs", cam.config.name, exc, backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 60.0)

    def _run_camera(self, cam: CameraState) -> None:
        c = cam.config
        source = VideoFileSource(c.source, loop=c.loop, realtime=c.realtime, fps_cap=c.fps_cap)
        self._sources[c.name] = source
        pipeline: CameraPipeline = build_pipeline(
            c.name,
            model=c.model,
            lines=c.lines,
            zones=c.zones,
            classes=c.classes,
            labels=c.labels,
            anchor=c.anchor,
            threads=c.threads,
            conf_threshold=c.conf_threshold,
            fps=source.delivered_fps,
        )
        cam.classes = tuple(pipeline.counted_classes)
        cam.state, cam.error = "running", None
        log.info("camera %s running: %s with %s", c.name, c.source, Path(c.model).name)
        window_t, window_n = time.monotonic(), 0
        try:
            for frame in source:
                if self._stop.is_set():
                    break
                result = pipeline.process(frame.image, frame.ts)
                if result.crossings or result.zone_events or result.occupancy:
                    with self._tally_lock:
                        for ev in result.crossings:
                            self._tally.add_crossing(c.name, ev)
                        for ev in result.zone_events:
                            self._tally.add_zone_event(c.name, ev)
                        for zone, by_class in result.occupancy.items():
                            self._tally.note_occupancy(c.name, zone, by_class)
                cam.frames += 1
                cam.inference_ms = 0.9 * cam.inference_ms + 100 * result.inference_s
                window_n += 1
                elapsed = time.monotonic() - window_t
                if elapsed >= 2.0:
                    cam.fps, window_t, window_n = window_n / elapsed, time.monotonic(), 0
        finally:
            source.stop()
            pipeline.detector.close()
