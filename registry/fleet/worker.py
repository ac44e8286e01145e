"""Ingest workers: MQTT sessions that feed an `Ingestor` in batches.

An `IngestWorker` holds a persistent MQTT session, so the broker queues device
messages while it is down and delivers them on restart. Its handler on paho's network
thread only queues each message; a writer thread takes them in batches (up to
``batch_max`` messages, or what arrived within ``batch_wait_s`` of the first) and
stores each batch in one transaction (`Ingestor.handle_batch`). A QoS 1 message is
acknowledged to the broker only after its batch committed (paho's manual ack), in the
order the messages arrived: a worker killed mid-batch leaves the batch
unacknowledged, and the broker delivers it again, to this session when it comes back.
Storage is idempotent on (device, kind, seq), so a redelivery is a duplicate.

Several workers share the load through an MQTT 5 shared subscription
(``$share/<group>/<root>/devices/+/+``): the broker hands each message to one member.
Each worker needs its own client id (and, where the broker binds client ids to
usernames, its own username; see `worker_identity`). Mosquitto keeps queueing a
stopped member's share in its session until it returns, so every worker of a group
must come back (or its session be removed) for its share to be stored.

How many messages wait for a commit at once is bounded by the broker's inflight
window for the session (Mosquitto ``max_inflight_messages``, which the generated
config sets; see docs/operations.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from flowfleet.contract import QOS, Ack, Topics
from flowfleet.mqtt import BrokerAddress, Delivery, MqttConnection, discard_session

from .. import metrics
from ..store.db import now, open_database
from .ingest import DEFERRED, ERROR, OUTCOMES, Ingestor
from .store_process import StoreProcess

# Where an ingest worker stores its batches (see `IngestWorker`).
STORE_MODES = ("process", "thread")

log = logging.getLogger(__name__)

# The shared-subscription group of the registry's ingest workers.
INGEST_GROUP = "flowfleet-ingest"
# Worker indices whose leftover sessions a registry start retires (the config's bound).
MAX_WORKERS = 32
# A batch ends early when no message arrived for this long: the stream paused (or the
# broker's inflight window is full and waits for our acks).
_IDLE_GAP_S = 0.01
_STOP = object()


def worker_identity(broker: BrokerAddress, client_id: str, index: int) -> tuple[BrokerAddress, str]:
    """The broker login and client id of ingest worker ``index`` (1-based).

    Worker 1 is the registry's own session (``client_id``, the configured username).
    Worker n > 1 appends ``-n`` to both: ``flowfleet-registry-2`` and, with a username,
    ``registry-2``, with the same password; brokers that bind the client id to the
    username (the generated Mosquitto config does) need a distinct user per worker.
    These are reserved registry identities (`flowfleet.identity`).
    """
    if index <= 1:
        return broker, client_id
    username = f"{broker.username}-{index}" if broker.username else None
    return replace(broker, username=username), f"{client_id}-{index}"


def retire_workers(
    broker: BrokerAddress, client_id: str, workers: int, upto: int = MAX_WORKERS
) -> list[str]:
    """Discard the broker sessions of ingest workers ``workers + 1 .. upto``.

    A worker's persistent session stays a member of the shared subscription after the
    worker is gone (fewer workers configured than before): the broker would keep
    handing it a share of the devices' messages, stored nowhere until it returned.
    Returns the client ids whose session was discarded (those the broker let in; one
    whose login it refuses could never have held a session).
    """
    retired = []
    for index in range(max(2, workers + 1), upto + 1):
        login, cid = worker_identity(broker, client_id, index)
        if discard_session(login, cid, timeout=2.0):
            retired.append(cid)
    return retired


class IngestWorker:
    """Subscribes to everything devices publish and stores it in batches.

    Args:
        db_path: SQLite path or URL, or a PostgreSQL URL (see `open_database`).
        broker: where the MQTT broker listens, with this worker's login.
        topics: the topic layout.
        client_id: the MQTT client id; keep it stable across restarts.
        ack_interval_s: how often the devices' end-to-end acks are published.
        retry_s: how long a database failure is retried before a batch is left
            unacknowledged for redelivery (see `Ingestor`).
        on_connect_refused: called with the broker's reason and reason code when it
            refuses the session (see `MqttConnection`); the caller reports it.
        site_timezone: the site's IANA timezone, where day rollups start at midnight.
        shared: subscribe as a member of the shared subscription group
            `INGEST_GROUP` (several workers); else a plain subscription (one worker).
        batch_max: most messages per transaction.
        batch_wait_s: how long a batch waits for more messages after its first.
        store: "process" stores in a child process (`StoreProcess`), so receiving
            and storing run on two cores; "thread" stores on a thread of this one.
    """

    def __init__(
        self,
        db_path: str | Path,
        broker: BrokerAddress,
        topics: Topics,
        client_id: str = "flowfleet-registry",
        ack_interval_s: float = 0.2,
        retry_s: float = 15.0,
        on_connect_refused: Callable[[str, int], None] | None = None,
        site_timezone: str = "UTC",
        *,
        shared: bool = False,
        batch_max: int = 1000,
        batch_wait_s: float = 0.05,
        store: str = "thread",
        relay_routes: tuple = (),
        on_relays_queued: Callable[[], None] | None = None,
    ) -> None:
        if store not in STORE_MODES:
            raise ValueError(f"ingest store must be one of {', '.join(STORE_MODES)}, not {store!r}")
        self.db = open_database(db_path)
        self.topics = topics
        self.ingestor = Ingestor(
            self.db,
            topics,
            retry_s=retry_s,
            site_timezone=site_timezone,
            relay_routes=relay_routes,
        )
        self.store_process = (
            StoreProcess(
                db_path,
                topics,
                retry_s=retry_s,
                site_timezone=site_timezone,
                relay_routes=relay_routes,
            )
            if store == "process"
            else None
        )
        # Called after a commit that queued messages for the cloud relays (wakes them).
        self.on_relays_queued = on_relays_queued
        self.connection = MqttConnection(
            client_id, broker, persistent=True, on_connect_refused=on_connect_refused
        )
        plain = topics.all_devices()
        group = f"$share/{INGEST_GROUP}/{plain}"
        # A persistent session keeps the other configuration's subscription: drop it,
        # or each message would arrive twice (once per filter).
        self.connection.drop_subscription(plain if shared else group)
        self.connection.subscribe_deferred(group if shared else plain, self._on_delivery, qos=QOS)
        self.batch_max = max(1, batch_max)
        self.batch_wait_s = batch_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self._lock = threading.Lock()
        self._started = False
        self.ack_interval_s = ack_interval_s
        self._unpublished: dict[str, tuple[int, int]] = {}
        self._ack_stop = threading.Event()
        self._ack_thread: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self.acks_published = 0
        self.batches = 0

    def start(self, wait: float | None = None) -> bool:
        """Connect in the background; with ``wait``, block up to that many seconds
        for the broker to accept the session. Returns whether it is connected."""
        if not self._started:
            if self.store_process is not None:
                self.store_process.start()
            self._writer = threading.Thread(
                target=self._write_loop, name="ingest-writer", daemon=True
            )
            self._writer.start()
            self.connection.start()
            self._started = True
            self._ack_stop.clear()
            self._ack_thread = threading.Thread(
                target=self._ack_loop, name="ingest-acks", daemon=True
            )
            self._ack_thread.start()
        if wait is not None:
            return self.connection.wait_connected(wait)
        return self.connection.connected.is_set()

    def stop(self) -> None:
        """Store and acknowledge what was received, then disconnect cleanly; the
        broker keeps the session and queues for it."""
        if self._started:
            self._queue.put(_STOP)
            if self._writer is not None:
                self._writer.join(30)
            self._ack_stop.set()
            if self._ack_thread is not None:
                self._ack_thread.join(5)
            self.publish_acks()  # what the last batches committed
            self.connection.stop()
            if self.store_process is not None:
                self.store_process.stop()
            self._started = False

    @property
    def connected(self) -> bool:
        """Connected, with every subscription acknowledged: receiving."""
        return self.connection.connected.is_set() and self.connection.subscribed.is_set()

    @property
    def outcomes(self) -> dict[str, int]:
        """A snapshot of how many messages ended in each outcome."""
        with self._lock:
            return dict(self._outcomes)

    def processed(self) -> int:
        """Messages handled so far, whatever the outcome."""
        with self._lock:
            return sum(self._outcomes.values())

    def stats(self) -> dict[str, object]:
        """Counters and connection state, for /healthz and metrics."""
        with self._lock:
            batches, handled = self.batches, sum(self._outcomes.values())
        return {
            "connected": self.connected,
            "outcomes": self.outcomes,
            "batches": batches,
            "mean_batch": round(handled / batches, 1) if batches else 0.0,
            "queued": self._queue.qsize(),
            "store": "thread" if self.store_process is None else "process",
        }

    # -- receiving and storing ------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        # paho's network thread: queue and return; the writer commits and acks.
        self._queue.put(delivery)

    def _next_batch(self) -> tuple[list[Delivery], bool]:
        """Wait for a message, then take more until the batch is full, the wait is
        over or the stream pauses. Returns (batch, stop requested)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self._queue.get(timeout=min(left, _IDLE_GAP_S))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write_loop(self) -> None:
        while True:
            batch, stopping = self._next_batch()
            if stopping:  # store what was received before the stop, then end
                batch += self._drain()
            for i in range(0, len(batch), self.batch_max):
                part = batch[i : i + self.batch_max]
                try:
                    self._write(part)
                except Exception:  # never let the writer die: it stays unacknowledged
                    log.exception("could not store a batch of %d messages", len(part))
                    self.connection.resync()
            if stopping:
                return

    def _drain(self) -> list[Delivery]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not _STOP:
                out.append(item)

    def _write(self, batch: list[Delivery]) -> None:
        items = [(d.topic, d.payload, d.received_at) for d in batch]
        queued = self.ingestor.relays_queued
        if self.store_process is None:
            outcomes = self.ingestor.handle_batch(items)
        else:
            outcomes, acks, relayed = self.store_process.handle_batch(items)
            self.ingestor.add_acks(acks)
            self.ingestor.relays_queued += relayed
        metrics.INGEST_BATCH.observe(len(batch))
        if self.on_relays_queued is not None and self.ingestor.relays_queued != queued:
            self.on_relays_queued()
        with self._lock:
            self._outcomes.update(outcomes)
            self.batches += 1
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if outcome in (DEFERRED, ERROR):
                # Nothing committed (the database failed): withhold this ack and every
                # later one (PUBACKs go in arrival order), and reconnect so the broker
                # delivers them again now rather than after the next network failure
                # (MQTT 5 resends only on a new connection).
                log.error(
                    "not acknowledging %s and the rest of its batch: the database could "
                    "not store it; the broker will resend",
                    delivery.topic,
                )
                self.connection.resync()
                return
            self.connection.ack(delivery)

    # -- end-to-end acks ------------------------------------------------------------

    def publish_acks(self) -> int:
        """Publish each device's latest committed ack (retained, QoS 1); returns how
        many went out. One that cannot go now is kept for the next call."""
        pending = self.ingestor.take_acks()
        with self._lock:
            self._unpublished.update(pending)
            todo, self._unpublished = self._unpublished, {}
        sent = 0
        for device, (acked, top) in todo.items():
            body = Ack(device=device, ts=round(now(), 3), counts=acked, counts_max=top)
            mid = self.connection.publish(self.topics.ack(device), body.to_json(), retain=True)
            if mid is None:
                with self._lock:
                    self._unpublished.setdefault(device, (acked, top))
                continue
            sent += 1
        self.acks_published += sent
        return sent

    def _ack_loop(self) -> None:
        # Coalesces: a backlog of a device's bins is confirmed by one ack per tick.
        while not self._ack_stop.wait(self.ack_interval_s):
            try:
                self.publish_acks()
            except Exception:
                log.exception("could not publish acks")

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_worker_process(
    db_path: str,
    broker: BrokerAddress,
    topics_root: str,
    client_id: str,
    site_timezone: str,
    batch_max: int,
    batch_wait_s: float,
    stop,
    store: str = "thread",
    relay_routes: tuple = (),
) -> None:
    """Body of an extra ingest worker process (`WorkerPool`): one shared-subscription
    session until ``stop`` is set, SIGTERM arrives or the parent registry is gone."""
    import os
    import signal

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {client_id} %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    parent = os.getppid()
    worker = IngestWorker(
        db_path,
        broker,
        Topics(topics_root),
        client_id=client_id,
        site_timezone=site_timezone,
        shared=True,
        batch_max=batch_max,
        batch_wait_s=batch_wait_s,
        store=store,
        relay_routes=relay_routes,
    )
    worker.start()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("the registry process is gone; stopping")
            break
    worker.stop()


class WorkerPool:
    """Ingest workers 2..n of a registry, one process each, restarted if one dies.

    Worker 1 is the registry's own `IngestWorker`; these join it on the shared
    subscription with the identities of `worker_identity`. A process per worker, not
    a thread: storing is Python work, and one interpreter runs it on one core.
    """

    RESTART_DELAY_S = 5.0

    def __init__(
        self,
        workers: int,
        db_path: str | Path,
        broker: BrokerAddress,
        topics_root: str,
        client_id: str,
        site_timezone: str = "UTC",
        batch_max: int = 1000,
        batch_wait_s: float = 0.05,
        store: str = "thread",
        relay_routes: tuple = (),
    ) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._args = {}
        for index in range(2, workers + 1):
            login, cid = worker_identity(broker, client_id, index)
            self._args[index] = (
                str(db_path),
                login,
                topics_root,
                cid,
                site_timezone,
                batch_max,
                batch_wait_s,
            )
        self._store = store
        self._relay_routes = tuple(relay_routes)
        self._procs: dict[int, object] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=run_worker_process,
            args=(*self._args[index], self._stop, self._store, self._relay_routes),
            name=f"flowfleet-ingest-{index}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc
        log.info("ingest worker %d started (pid %d)", index, proc.pid)

    def start(self) -> None:
        for index in self._args:
            self._spawn(index)
        self._thread = threading.Thread(target=self._supervise, name="ingest-pool", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for index, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                log.error(
                    "ingest worker %d exited with %s; restarting it in %.0f s (its share of "
                    "messages waits in its broker session)",
                    index,
                    proc.exitcode,
                    self.RESTART_DELAY_S,
                )
                if self._stopping.wait(self.RESTART_DELAY_S):
                    return
                self.restarts += 1
                self._spawn(index)

    def alive(self) -> int:
        """Worker processes running now."""
        return sum(1 for p in self._procs.values() if p.is_alive())

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every worker to store what it received and disconnect; wait for them."""
        self._stopping.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        deadline = time.monotonic() + timeout
        for index, proc in self._procs.items():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("ingest worker %d did not stop in time; terminating it", index)
                proc.terminate()
                proc.join(5)
