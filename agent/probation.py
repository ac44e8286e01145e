"""Probation of a newly activated detector: the previous one stays loaded as a fallback.

`ProbationDetector` sits where the camera's detector was (under the drift recorder,
if any) for the new model's first ``frames`` frames and trips, handing every later
frame to the previous detector, when the new model

* raises ``max_errors`` times (each failing frame is answered by the previous model,
  so no frame is lost), reason ``crashed``; or
* turns out slow: the median of its last ``latency_frames`` inference times exceeds
  the latency budget the health gate used, reason ``slow``. A median over a window,
  not one frame, so a single hiccup (a page fault, a busy core) never rolls back.

The updater does the actual swap back (or, after ``frames`` clean frames, releases
the previous detector) on its own thread, through ``on_trip`` / ``on_pass``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from pathlib import Path

from .download import UpdateRefused
from .drift import RecordingDetector

log = logging.getLogger("flowfleet.agent.updater")  # one logger for the whole update path

GATE_RUNS = 3  # sanity inferences in the health gate (median taken)


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

    ``budget_ms`` is the latency budget (None: no latency check) and
    ``latency_frames`` how many of the latest inference times its median is taken
    over (0: no latency check). ``state`` goes ``probation`` -> ``tripped`` |
    ``passed`` | ``replaced`` (by a newer update); after a trip ``trip_reason``
    (``crashed`` or ``slow``) and ``trip_message`` say why.
    """

    def __init__(
        self,
        inner,
        fallback,
        *,
        frames: int,
        max_errors: int,
        on_trip,
        on_pass,
        budget_ms: float | None = None,
        latency_frames: int = 0,
    ):
        self.inner = inner
        self.fallback = fallback
        self.frames = frames
        self.max_errors = max_errors
        self.on_trip = on_trip
        self.on_pass = on_pass
        self.budget_ms = budget_ms
        self.latency_frames = latency_frames if budget_ms is not None else 0
        self.latencies_ms: deque[float] = deque(maxlen=max(1, self.latency_frames))
        self.seen = 0
        self.errors = 0
        self.last_error: str | None = None
        self.trip_reason: str | None = None
        self.trip_message: str | None = None
        self.state = "probation"

    def detect(self, frame_bgr):
        if self.state == "tripped":
            return self.fallback.detect(frame_bgr)
        t0 = time.perf_counter()
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
                self._trip(
                    "crashed",
                    f"raised {self.errors} times in its first {self.seen + self.errors} "
                    f"frames (last: {self.last_error})",
                )
            return self.fallback.detect(frame_bgr)
        if self.state != "probation":
            return dets
        self.seen += 1
        if self.latency_frames:
            self.latencies_ms.append(1000.0 * (time.perf_counter() - t0))
            if len(self.latencies_ms) >= self.latency_frames:
                median = statistics.median(self.latencies_ms)
                if median > self.budget_ms:
                    self._trip(
                        "slow",
                        f"median inference {median:.0f} ms over {len(self.latencies_ms)} "
                        f"probation frames exceeds the {self.budget_ms:.0f} ms budget",
                    )
                    # From the trip on every frame is the previous model's, this one
                    # included, so the drift window opened at the trip holds only it.
                    return self.fallback.detect(frame_bgr)
        if self.seen >= self.frames:
            self.state = "passed"
            self.on_pass(self)
        return dets

    def _trip(self, reason: str, message: str) -> None:
        self.state = "tripped"
        self.trip_reason, self.trip_message = reason, message
        log.warning("new model tripped its probation (%s): %s", reason, message)
        self.on_trip(self)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- the health gate, before a model counts -------------------------------------------


def latency_budget_ms(cam, cfg) -> float | None:
    """Latency budget of a new model: ``gate_max_ms``, else ``gate_latency_factor``
    times the current model's median (None: nothing to compare with yet)."""
    if cfg.gate_max_ms is not None:
        return cfg.gate_max_ms
    if not cam.latencies:
        return None
    return cfg.gate_latency_factor * 1000.0 * statistics.median(cam.latencies)


def load_for(cam, path: Path, labels: str | None):
    """Load ``path`` into a new detector that can count the camera's classes."""
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
    return detector


def load_and_gate(cam, path: Path, labels: str | None, cfg):
    """(detector, gate median ms, budget ms or None) for a model that passed the gate.

    The sanity inference runs on the camera's newest frame; callers make sure
    there is a fresh one (`has_fresh_frame`), otherwise the update is pending.
    """
    frame = cam.last_frame
    if frame is None:  # callers check has_fresh_frame first; never gate on nothing
        raise UpdateRefused("health_gate", "no frame from the camera to gate on")
    detector = load_for(cam, path, labels)
    budget = latency_budget_ms(cam, cfg)
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
    return detector, ms, budget
