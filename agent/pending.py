"""Updates waiting for a camera that is down: held, then gated on its next frame.

A model update is only ever activated after its health gate ran on a fresh frame of
the camera (see `ModelUpdater`). When the camera delivers none (failed and retrying,
a stream reconnecting, not started yet), the verified model is held *pending*:
persisted in ``active.json`` (so a restart, which skips the already applied desired
state, still completes it), reported (``model_pending`` event, reported state
``verified`` with reason ``pending``), and gated on the updater's thread as soon as
the camera thread reports a frame (`on_frame`). Meanwhile the camera counts with
its current model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flowfleet.contract import ModelRef

from .download import UpdateRefused, sha256_file

log = logging.getLogger("flowfleet.agent.updater")  # one logger for the whole update path


class PendingUpdates:
    """`ModelUpdater`'s part for pending updates (a mixin: it uses the updater's
    ``service``, ``pending``, ``_gating``, ``_jobs``, ``_lock``, ``cfg``, ``_save``,
    ``_report``
    and ``_gate_and_activate``)."""

    pending: dict[str, dict[str, Any]]
    _gating: set[str]

    def has_fresh_frame(self, cam) -> bool:
        """Whether the camera runs and delivered a frame recently enough to gate on."""
        with cam.lock:
            running = cam.pipeline is not None
        return (
            running
            and cam.last_frame is not None
            and time.monotonic() - cam.last_frame_at <= self.cfg.gate_frame_max_age_s
        )

    def _hold(self, cam, ref: ModelRef, path: Path, labels, desired: int) -> None:
        """Keep a verified update until the camera delivers a frame (`on_frame`).

        Persisted, so a restart (which skips the already applied desired state)
        still gates and activates it; the camera counts on with its current model.
        """
        name = cam.config.name
        with self._lock:
            self.pending[name] = {
                "ref": ref.model_dump(mode="json"),
                "path": str(path),
                "labels": labels,
                "desired": desired,
                "since": round(time.time(), 3),
            }
            self._save()
        state, error = self.service._camera_state(name, cam)  # "starting" if reconnecting
        why = error or state
        self._report(
            name,
            ref,
            "verified",
            f"camera {name} delivers no frames ({why}); {ref.name} v{ref.version} waits "
            f"to be health-gated on its next frame, {Path(cam.model_path).name} stays active",
            desired=desired,
            reason="pending",
            event="model_pending",
        )
        if self.has_fresh_frame(cam):  # it came back meanwhile: no frame would wake us
            self.on_frame(cam)

    def _drop_pending(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            dropped = self.pending.pop(name, None)
            if dropped is not None:
                self._save()
        return dropped

    def on_frame(self, cam) -> None:
        """Camera thread, after each frame: wake the updater for a pending update."""
        name = cam.config.name
        if name in self.pending and name not in self._gating:
            self._gating.add(name)
            self._jobs.put(("gate", name))

    def _gate_pending(self, name: str) -> None:
        """Updater thread: gate a pending update on the frame that just arrived."""
        cam = self.service.cameras.get(name)
        with self._lock:
            p = self.pending.pop(name, None)
        self._gating.discard(name)
        if p is None or cam is None:
            return
        ref = ModelRef.model_validate(p["ref"])
        path, labels, desired = Path(p["path"]), p["labels"], p["desired"]
        if not self.has_fresh_frame(cam):  # down again already: the next frame retries
            with self._lock:
                self.pending.setdefault(name, p)
            return
        try:
            try:
                intact = sha256_file(path) == ref.sha256
            except OSError as exc:
                raise UpdateRefused("load", f"{path}: {exc.strerror or exc}") from None
            if not intact:
                raise UpdateRefused("checksum", f"{path} changed on disk while pending")
            self._gate_and_activate(cam, ref, path, labels, desired)
        except UpdateRefused as exc:
            self._save()
            self._report(
                name, ref, "failed", str(exc), desired=desired, reason=exc.reason, severity="error"
            )
        except Exception as exc:
            log.exception("pending model update of camera %s failed", name)
            self._save()
            self._report(
                name,
                ref,
                "failed",
                f"{type(exc).__name__}: {exc}",
                desired=desired,
                reason="internal",
                severity="error",
            )
