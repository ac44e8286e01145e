"""An ingest worker's storing half, in a process of its own.

Receiving (paho's network thread, decoding MQTT packets) and storing (validating
payloads, rollups, SQL) are both Python work; in one process they share one core
through the interpreter lock, so each slows the other. `StoreProcess` runs the
`Ingestor` in a child process: the worker's writer thread sends it a batch of raw
(topic, payload, received_at) messages over a pipe and blocks on the answer, with
the interpreter lock released, while paho goes on receiving the next batch on the
parent's core. The child answers with the outcomes (in order), the device acks the
batch committed, and the metric increments it made, which the parent applies to its
own counters so /metrics stays whole.

Nothing about custody changes: the parent acknowledges a message to the broker only
after the child answered that its batch committed. If the child dies mid-batch, the
batch is unacknowledged (the broker resends it), and the next batch starts a new
child.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence

from flowfleet.contract import Topics

from .. import metrics
from .ingest import Ingestor

log = logging.getLogger(__name__)

# Counters the Ingestor increments while storing; the child reports their growth.
_COUNTERS = {
    "ingest": metrics.INGEST,
    "dead_letters": metrics.DEAD_LETTERS,
    "rollbacks": metrics.ROLLBACKS,
}

MetricDeltas = list[tuple[str, dict[str, str], float]]


class StoreProcessDied(RuntimeError):
    """The child process ended before it answered for a batch (nothing acknowledged)."""


def _counter_values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for key, counter in _COUNTERS.items():
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[(key, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _deltas(before: dict, after: dict) -> MetricDeltas:
    out = []
    for (key, labels), value in after.items():
        grown = value - before.get((key, labels), 0.0)
        if grown > 0:
            out.append((key, dict(labels), grown))
    return out


def apply_deltas(deltas: MetricDeltas) -> None:
    """Add a child's counter growth to this process's counters."""
    for key, labels, amount in deltas:
        counter = _COUNTERS[key]
        (counter.labels(**labels) if labels else counter).inc(amount)


def _serve(
    conn, db_path: str, topics_root: str, retry_s: float, site_timezone: str, relay_routes
) -> None:
    """The child: store each batch it is sent until it gets None or the pipe closes."""
    from ..store.db import open_database

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s ingest-store %(name)s: %(message)s"
    )
    parent = os.getppid()
    ingestor = Ingestor(
        open_database(db_path),
        Topics(topics_root),
        retry_s=retry_s,
        site_timezone=site_timezone,
        relay_routes=relay_routes,
    )
    before = _counter_values()
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if items is None or os.getppid() != parent:
            return
        queued = ingestor.relays_queued
        outcomes = ingestor.handle_batch(items)
        after = _counter_values()
        relayed = ingestor.relays_queued - queued
        try:
            conn.send((outcomes, ingestor.take_acks(), relayed, _deltas(before, after)))
        except OSError:  # the parent died mid-batch: its broker session resends the batch
            return
        before = after


class StoreProcess:
    """Stores batches through an `Ingestor` in a child process (see the module doc).

    Args mirror `Ingestor`'s, with the database as a path or URL the child opens.
    One batch is in flight at a time; `handle_batch` is called from one thread.
    """

    def __init__(
        self,
        db_path: str,
        topics: Topics,
        *,
        retry_s: float = 15.0,
        site_timezone: str = "UTC",
        relay_routes: tuple = (),
    ) -> None:
        self._args = (str(db_path), topics.root, retry_s, site_timezone, tuple(relay_routes))
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.restarts = 0

    def start(self) -> None:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._spawn()

    def _spawn(self) -> None:
        if self._proc is not None:
            self.restarts += 1
            self._proc.join(1)
        parent_end, child_end = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_serve,
            args=(child_end, *self._args),
            name="flowfleet-ingest-store",
            daemon=True,
        )
        self._proc.start()
        child_end.close()
        self._conn = parent_end
        log.info("ingest store process started (pid %d)", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def handle_batch(
        self, items: Sequence[tuple[str, bytes, float]]
    ) -> tuple[list[str], dict[str, tuple[int, int]], int]:
        """Store ``items`` in the child; returns (outcomes in order, acks to publish,
        rows it queued for the cloud relays).

        Raises StoreProcessDied when the child ended before answering: nothing of the
        batch may be acknowledged; the next call starts a new child.
        """
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._spawn()
            try:
                self._conn.send(list(items))
                outcomes, acks, relayed, deltas = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._conn.close()
                raise StoreProcessDied(
                    f"the ingest store process (pid {self._proc.pid}) ended mid-batch "
                    f"(exit code {self._proc.exitcode})"
                ) from exc
        apply_deltas(deltas)
        return outcomes, acks, relayed

    def stop(self, timeout: float = 30.0) -> None:
        """Let the child finish its batch and exit."""
        with self._lock:
            if self._proc is None:
                return
            with contextlib.suppress(OSError):  # BrokenPipeError: the child is gone
                self._conn.send(None)
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.warning("ingest store process did not stop in time; terminating it")
                self._proc.terminate()
                self._proc.join(5)
            self._conn.close()
            self._proc = None
