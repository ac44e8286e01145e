"""Two ingest workers on a shared subscription, one of them SIGKILLed mid-stream.

Real Mosquitto with the generated config, real worker processes
(`flowfleet.registry.fleet.worker.run_worker_process`, as `WorkerPool` starts them),
SQLite and PostgreSQL: 20,000 count bins from 200 devices are published at QoS 1 while
one worker is killed and restarted; afterwards every bin is stored exactly once, the
raw rows and the rollups add up to what was sent, and every device's end-to-end ack
covers all its bins.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import paho.mqtt.client as mqtt
import peewee as pw
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowfleet.contract import CountBin, LineCount, Topics
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.fleet.worker import INGEST_GROUP, run_worker_process
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import KINDS, temporary_database

TOPICS = Topics()
DEVICES = 200
PER_DEVICE = 100
ALL = DEVICES * PER_DEVICE
CLIENTS = ("flowfleet-registry-t-1", "flowfleet-registry-t-2")


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )


def _connect(client: mqtt.Client, broker, clean: bool) -> None:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=clean, properties=props)


def make_session(broker, client_id: str) -> None:
    """The worker's persistent session, subscribed to the shared filter, offline: the
    broker queues its share from the first message on."""
    c = _client(client_id)
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    _connect(c, broker, True)
    c.loop_start()
    c.subscribe(f"$share/{INGEST_GROUP}/{TOPICS.all_devices()}", qos=1)
    assert subscribed.wait(10)
    c.disconnect()
    c.loop_stop()


def bins(now: float):
    """Every device's bins, interleaved as a fleet sends them; line ``in`` = seq % 5."""
    for seq in range(1, PER_DEVICE + 1):
        for d in range(DEVICES):
            device = f"w-{d:03d}"
            start = now - 2 * 86400 + seq * 60 * 17  # spread across hours and days
            row = LineCount(camera="c", line="l", class_="person", in_=seq % 5, out=1)
            body = CountBin(device=device, seq=seq, start=start, end=start + 60, lines=(row,))
            yield TOPICS.device(device, "counts"), body.to_json()


def publish_all(broker, done: threading.Event) -> None:
    pub = _client("w-publisher")
    pub.max_inflight_messages_set(200)
    _connect(pub, broker, True)
    pub.loop_start()
    infos = [pub.publish(t, p, qos=1) for t, p in bins(time.time())]
    for info in infos:
        info.wait_for_publish(120)
    pub.disconnect()
    pub.loop_stop()
    done.set()


def start_worker(ctx, url: str, broker, client_id: str):
    """A worker process; the one the test kills stores in a child process of its own
    (SIGKILL leaves that child orphaned mid-batch), the other on a thread."""
    stop = ctx.Event()
    store = "process" if client_id == CLIENTS[1] else "thread"
    args = (url, BrokerAddress(broker.host, broker.port), TOPICS.root, client_id, "UTC")
    proc = ctx.Process(target=run_worker_process, args=(*args, 500, 0.02, stop, store))
    proc.start()
    return proc, stop


def stored(db: pw.Database) -> int:
    return regdb.CountBin.select().count(db)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.parametrize("kind", KINDS)
def test_two_workers_one_killed_store_every_bin_once(kind, tmp_path, broker):
    ctx = multiprocessing.get_context("spawn")
    with temporary_database(kind, tmp_path) as url:
        db = regdb.open_database(url)  # migrated before the workers start
        for client_id in CLIENTS:
            make_session(broker, client_id)
        workers = {cid: start_worker(ctx, url, broker, cid) for cid in CLIENTS}
        published = threading.Event()
        publisher = threading.Thread(target=publish_all, args=(broker, published), daemon=True)
        publisher.start()
        try:
            wait_for(lambda: stored(db) >= ALL // 4, 180, "a quarter of the bins stored")
            victim, _ = workers[CLIENTS[1]]
            os.kill(victim.pid, signal.SIGKILL)  # mid-batch, acks withheld
            victim.join(10)
            at_kill = stored(db)
            assert at_kill < ALL, "the stream ended before the kill"
            time.sleep(1.0)
            workers[CLIENTS[1]] = start_worker(ctx, url, broker, CLIENTS[1])
            wait_for(published.is_set, 240, "every bin published")
            wait_for(lambda: stored(db) >= ALL, 240, "every bin stored")
            acks = regdb.Device.select(pw.fn.MIN(regdb.Device.counts_acked)).scalar()
            wait_for(
                lambda: (
                    regdb.Device.select(pw.fn.MIN(regdb.Device.counts_acked)).scalar() == PER_DEVICE
                ),
                30,
                f"every device acked through {PER_DEVICE} (min {acks})",
            )
        finally:
            for _, stop in workers.values():
                stop.set()
            for proc, _ in workers.values():
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
        # Exactly once: the raw rows (unique per device and seq), their line rows and
        # every rollup step add up to what was sent.
        assert stored(db) == ALL
        assert regdb.CountBin.select(regdb.CountBin.device).distinct().count() == DEVICES
        expected_in = DEVICES * sum(seq % 5 for seq in range(1, PER_DEVICE + 1))
        assert regdb.LineTotal.select(pw.fn.SUM(regdb.LineTotal.count_in)).scalar() == expected_in
        assert regdb.LineTotal.select().count() == ALL
        for step in ("m", "h", "d"):
            rollup = regdb.LineRollup.select(
                pw.fn.SUM(regdb.LineRollup.count_in), pw.fn.SUM(regdb.LineRollup.bins)
            ).where(regdb.LineRollup.step == step)
            total_in, total_bins = rollup.tuples().get()
            assert (int(total_in), int(total_bins)) == (expected_in, ALL), step
        assert regdb.DeadLetter.select().count() == 0


def test_sessions_of_workers_no_longer_configured_are_retired(tmp_path, broker):
    """Going from two workers to one: worker 2's session would keep a share of the
    messages; the registry's start discards it, and worker 1 then gets them all."""
    from flowfleet.registry.fleet.worker import IngestWorker, retire_workers

    base = "flowfleet-registry-r"
    address = BrokerAddress(broker.host, broker.port)
    make_session(broker, f"{base}-2")  # left over from a two-worker configuration
    assert retire_workers(address, base, 1, upto=4) == [f"{base}-2"]
    assert retire_workers(address, base, 1, upto=4) == []  # nothing left to retire
    with temporary_database("sqlite", tmp_path) as url:
        worker = IngestWorker(url, address, TOPICS, client_id=base, shared=True)
        assert worker.start(wait=10)
        try:
            pub = _client("r-publisher")
            _connect(pub, broker, True)
            pub.loop_start()
            sent = [pub.publish(t, p, qos=1) for t, p in list(bins(time.time()))[:50]]
            for info in sent:
                info.wait_for_publish(10)
            wait_for(lambda: worker.processed() >= 50, 30, "all 50 bins at worker 1")
            pub.disconnect()
            pub.loop_stop()
        finally:
            worker.stop()
        assert worker.outcomes["stored"] == 50
