"""The rollout job: steps every active rollout, in one registry process at a time.

Every ``tick_s`` the job takes (or renews) the lease ``rollouts`` (`store.leases`);
the process that holds it runs `RolloutStepper.step_all`. Another process waits for
the lease to expire (``lease_s``, a few ticks) before it takes over, so a registry
that stops or dies mid-rollout is replaced, and a restarted registry resumes from the
rows. A clean stop gives the lease up at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ..store import leases
from .rollout_steps import RolloutStepper

log = logging.getLogger(__name__)

LEASE = "rollouts"


def default_holder() -> str:
    """A lease holder name that says which process holds it: ``registry-<host>-<pid>-<random>``
    (the random part tells apart two registries that reuse one pid, in containers)."""
    host = socket.gethostname().split(".")[0][:48] or "host"
    return f"registry-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def holder_pid(holder: str) -> int | None:
    """The process id in a `default_holder` name (None for another form)."""
    parts = holder.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class RolloutJob:
    """Runs ``stepper`` every ``tick_s`` while holding the lease (see the module)."""

    def __init__(
        self,
        stepper: RolloutStepper,
        *,
        tick_s: float = 5.0,
        lease_s: float | None = None,
        holder: str | None = None,
    ) -> None:
        self.stepper = stepper
        self.db = stepper.db
        self.tick_s = tick_s
        self.lease_s = lease_s if lease_s is not None else max(3 * tick_s, 1.0)
        self.holder = holder or default_holder()
        self.ticks = 0  # ticks that held the lease
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="registry-rollouts", daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop the loop; ``release`` gives the lease up (False: as if it had died)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if release:
            try:
                with self._connection():
                    leases.release(self.db, LEASE, self.holder)
            except Exception:
                log.exception("rollouts: could not give the lease up")

    def wake(self) -> None:
        """Step now rather than at the next tick (a rollout was created or changed)."""
        self._wake.set()

    def tick(self) -> int:
        """One pass: take the lease, then step every active rollout; returns how many
        changed (0 without the lease)."""
        with self._connection():
            if not leases.acquire(self.db, LEASE, self.holder, self.lease_s):
                return 0
            self.ticks += 1
            return self.stepper.step_all()

    @contextmanager
    def _connection(self) -> Iterator[None]:
        opened = self.db.connect(reuse_if_open=True)
        try:
            yield
        finally:
            if opened:
                self.db.close()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.tick()
                failing = False
            except Exception:
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "rollouts: a step failed; retrying",
                    exc_info=True,
                )
                failing = True
            self._wake.wait(self.tick_s)
            self._wake.clear()
