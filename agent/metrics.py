"""Prometheus endpoint for the agent (``prometheus-client``), off unless configured.

Figures are read from the running service at scrape time (nothing is counted
twice): the same values as the health beat plus cumulative counts per line, zone
and class from the outbox's persisted totals. Names follow Prometheus conventions:
``flowfleet_agent_`` prefix, base units (seconds, bytes, ratios), ``_total`` for
counters.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import AgentService

log = logging.getLogger(__name__)


class MetricsUnavailable(RuntimeError):
    pass


def _families():
    try:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )
    except ImportError:  # pragma: no cover - depends on the install
        raise MetricsUnavailable(
            "metrics.port is set but prometheus-client is not installed "
            "(pip install prometheus-client)"
        ) from None
    return CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily


class AgentCollector:
    def __init__(self, service: AgentService) -> None:
        self.service = service
        _families()

    def collect(self):
        Counter, Gauge, Info = _families()
        s = self.service
        p = "flowfleet_agent_"
        info = Info(p + "build", "agent version and device id")
        info.add_metric([], {"device": s.device, "version": s.version})
        yield info
        yield Gauge(p + "uptime_seconds", "seconds since the agent started", value=s.uptime())

        cam_labels = ["camera"]
        up = Gauge(p + "camera_up", "1 while the camera's pipeline runs", labels=cam_labels)
        fps = Gauge(p + "camera_fps", "frames processed per second", labels=cam_labels)
        infer = Gauge(
            p + "inference_seconds", "mean detector time per frame (recent)", labels=cam_labels
        )
        frames = Counter(p + "frames", "frames processed", labels=cam_labels)
        dropped = Counter(p + "dropped_frames", "frames the source dropped", labels=cam_labels)
        restarts = Counter(p + "camera_restarts", "pipeline restarts", labels=cam_labels)
        for name, cam in s.cameras.items():
            up.add_metric([name], 1.0 if cam.state == "running" else 0.0)
            fps.add_metric([name], cam.fps)
            infer.add_metric([name], cam.inference_ms / 1000.0)
            frames.add_metric([name], cam.frames)
            dropped.add_metric([name], cam.dropped_frames)
            restarts.add_metric([name], cam.restarts)
        yield from (up, fps, infer, frames, dropped, restarts)

        depth = Gauge(
            p + "outbox_messages",
            "messages not yet acknowledged (count bins: by the registry)",
            labels=["stream"],
        )
        for stream in ("counts", "health", "events", "drift", "shadow"):
            depth.add_metric([stream], s.outbox.depth(stream))
        yield depth
        drops = Counter(
            p + "outbox_dropped", "messages dropped by the outbox cap", labels=["stream"]
        )
        for key, n in s.outbox.counters().items():
            if key.startswith("dropped."):
                drops.add_metric([key.split(".", 1)[1]], n)
        yield drops
        yield Counter(p + "mqtt_published", "publishes handed to MQTT", value=s.publisher.sent)
        yield Counter(
            p + "mqtt_acknowledged", "publishes the broker acknowledged", value=s.publisher.acked
        )
        yield Counter(p + "mqtt_refused", "publishes the broker refused", value=s.publisher.refused)
        yield Gauge(
            p + "outbox_unconfirmed",
            "count bins the broker took that the registry has not confirmed yet",
            value=s.outbox.unconfirmed(),
        )
        yield Gauge(
            p + "mqtt_connected",
            "1 while the broker session is up",
            value=1.0 if s.connection.connected.is_set() else 0.0,
        )
        yield Counter(p + "mqtt_connects", "broker sessions opened", value=s.connection.connects)
        yield Counter(p + "count_bins", "count bins enqueued", value=s.outbox.last_seq("counts"))

        crossings = Counter(
            p + "line_crossings",
            "objects that crossed a line (persisted cumulative)",
            labels=["camera", "line", "class", "direction"],
        )
        for (cam, line, cls), (n_in, n_out) in sorted(s.outbox.line_totals().items()):
            crossings.add_metric([cam, line, cls, "in"], n_in)
            crossings.add_metric([cam, line, cls, "out"], n_out)
        yield crossings
        entries = Counter(p + "zone_entries", "zone entries", labels=["camera", "zone", "class"])
        exits = Counter(p + "zone_exits", "zone exits", labels=["camera", "zone", "class"])
        for (cam, zone, cls), (n_entries, n_exits) in sorted(s.outbox.zone_totals().items()):
            entries.add_metric([cam, zone, cls], n_entries)
            exits.add_metric([cam, zone, cls], n_exits)
        yield from (entries, exits)

        sysh = s.last_system
        if sysh is not None:
            figures = {
                "load1": (sysh.load_1m, "1-minute load average"),
                "cpu_utilization_ratio": (
                    None if sysh.cpu_percent is None else sysh.cpu_percent / 100.0,
                    "busy share of all CPUs since the previous sample",
                ),
                "memory_available_bytes": (sysh.mem_available_bytes, "memory available"),
                "memory_total_bytes": (sysh.mem_total_bytes, "memory installed"),
                "resident_memory_bytes": (sysh.process_rss_bytes, "agent resident memory"),
                "disk_free_bytes": (sysh.disk_free_bytes, "free space under the state folder"),
                "soc_temperature_celsius": (sysh.soc_temp_c, "SoC temperature"),
                "throttled_flags": (sysh.throttled, "Raspberry Pi get_throttled mask"),
                "gpu_utilization_ratio": (
                    None if sysh.gpu_percent is None else sysh.gpu_percent / 100.0,
                    "GPU load (Jetson)",
                ),
                "gpu_temperature_celsius": (sysh.gpu_temp_c, "GPU temperature (Jetson)"),
            }
            for name, (value, doc) in figures.items():
                if value is not None:
                    yield Gauge(p + name, doc, value=float(value))


class MetricsServer:
    """Serves /metrics on (host, port) from a private registry; `close()` stops it."""

    def __init__(self, service: AgentService, host: str, port: int) -> None:
        _families()
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(service))
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None
        self.address = (host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
