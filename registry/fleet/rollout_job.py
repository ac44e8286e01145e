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
import uuid

from ..background import BackgroundLoop, thread_connection
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


class RolloutJob(BackgroundLoop):
    """Runs ``stepper`` every ``tick_s`` while holding the lease (see the module)."""

    thread_name = "registry-rollouts"
    what = "rollouts: a step"

    def __init__(
        self,
        stepper: RolloutStepper,
        *,
        tick_s: float = 5.0,
        lease_s: float | None = None,
        holder: str | None = None,
    ) -> None:
        super().__init__()
        self.stepper = stepper
        self.db = stepper.db
        self.tick_s = tick_s
        self.lease_s = lease_s if lease_s is not None else max(3 * tick_s, 1.0)
        self.holder = holder or default_holder()
        self.ticks = 0  # ticks that held the lease

    def stop(self, *, release: bool = True) -> None:
        """Stop the loop; ``release`` gives the lease up (False: as if it had died)."""
        self.stop_thread()
        if release:
            try:
                with thread_connection(self.db):
                    leases.release(self.db, LEASE, self.holder)
            except Exception:
                log.exception("rollouts: could not give the lease up")

    def join_s(self) -> float:
        return 30.0

    def wait_s(self) -> float:
        return self.tick_s

    def tick(self) -> int:
        """One pass: take the lease, then step every active rollout; returns how many
        changed (0 without the lease)."""
        with thread_connection(self.db):
            if not leases.acquire(self.db, LEASE, self.holder, self.lease_s):
                return 0
            self.ticks += 1
            return self.stepper.step_all()

    def run_pass(self) -> bool:
        self.tick()
        return False
