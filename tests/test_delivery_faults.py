"""Faults against real processes: nothing counted is lost, and nobody fails silently.

- The broker is SIGKILLed six times while the registry is offline and a real agent
  counts a real video, and each time its persistence file is deleted (a broker that
  loses its disk): the end-to-end acknowledgement brings every bin to the registry,
  whose totals then equal the agent's exactly.
- The registry's SQLite write lock is held by another connection for 14 s while a
  valid bin arrives: the bin is not dead-lettered; it is stored once the lock goes.
- An agent configured with another device's id (broker user cam-a, device_id cam-b)
  behind the generated ACL: the refused publishes are logged as an error naming the
  topic and the agent's identity, and the bins stay in its outbox.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress
from flowfleet.provisioning.mosquitto import Broker, BrokerSecurity, render_acl, write_password_file
from flowfleet.registry.fleet.ingest import DEFERRED
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.http.web import devices
from flowfleet.registry.store import db as regdb

from .factories import count_bin
from .test_agent_process import (
    CLEAN,
    PERSON_FRAMES,
    Agent,
    agent_state,
    bin_seqs,
    conflicts,
    registry_lines,
    state_db,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

ACK_SETTINGS = """
[outbox]
confirm_timeout_s = 1
confirm_timeout_max_s = 4
"""


def broker_took(tmp_path: Path) -> int:
    """Count bins the broker acknowledged that await the registry (agent's outbox)."""
    try:
        with state_db(tmp_path) as db:
            return db.execute(
                "SELECT COUNT(*) FROM outbox WHERE stream = 'counts' AND sent_at IS NOT NULL"
            ).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def kill_and_lose_disk(broker: Broker) -> None:
    broker.proc.kill()
    broker.proc.wait(10)
    broker.proc = None
    for f in broker.data_dir.glob("mosquitto.db*"):
        f.unlink()
    broker.start()


def test_broker_killed_and_its_disk_lost_six_times_loses_no_count(
    tmp_path, broker, person_clip, int8_model
):
    device = "crash-cam"
    address = BrokerAddress(broker.host, broker.port)
    registry = IngestWorker(tmp_path / "registry.sqlite", address, Topics())
    assert registry.start(wait=10), "registry did not connect"
    registry.stop()  # offline: its persistent session queues on the broker (for a while)

    config = write_config(
        tmp_path, broker, person_clip, int8_model, device=device, extra=ACK_SETTINGS
    )
    agent = Agent(config, tmp_path / "agent.log")
    kills = 0
    try:
        while kills < 6:
            took = broker_took(tmp_path)
            wait_for(lambda t=took: broker_took(tmp_path) > t, 60, "the broker to take a bin")
            time.sleep(0.3)
            kill_and_lose_disk(broker)
            kills += 1
        wait_for(lambda: agent_state(tmp_path)["pos"] >= PERSON_FRAMES, 180, "the end of the video")
        registry = IngestWorker(tmp_path / "registry.sqlite", address, Topics())
        assert registry.start(wait=10), "registry did not reconnect"
        try:
            # Every bin the broker lost is sent again (overdue, or missing below a later
            # one the registry has) until the registry confirms all of them.
            wait_for(lambda: agent_state(tmp_path)["depth"] == 0, 90, "every bin confirmed")
            assert agent.terminate() == 0, agent.log()[-3000:]
        finally:
            registry.stop()
    finally:
        agent.close()
    state = agent_state(tmp_path)
    assert {k: v for k, v in state["lines"].items() if v != (0, 0)} == CLEAN
    assert registry_lines(device) == state["lines"]  # exactly: nothing lost or doubled
    assert bin_seqs(device) == list(range(1, state["seq"] + 1))
    assert state["seq"] >= 10 and conflicts() == []
    dev = next(d for d in devices() if d["device"] == device)
    assert dev["gaps"] == 0


def test_a_locked_database_delays_a_bin_and_never_dead_letters_it(tmp_path, broker):
    from .test_registry_ingest import Publisher, wait_subscribed

    path = tmp_path / "registry.sqlite"
    worker = IngestWorker(path, BrokerAddress(broker.host, broker.port), Topics(), retry_s=2)
    assert worker.start(wait=10)
    pub = Publisher(broker)
    try:
        wait_subscribed(pub, "lock-cam")
        locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock for 14 s
        release = threading.Timer(14.0, lambda: locker.execute("COMMIT"))
        release.start()
        try:
            pub.publish(Topics().counts("lock-cam"), count_bin("lock-cam", 1).to_json())
            time.sleep(1.0)
            # Under the lock nothing is written, not even a dead letter.
            wait_for(lambda: not release.is_alive(), 20, "the lock to go")
            wait_for(lambda: bin_seqs("lock-cam") == [1], 30, "the bin to be stored")
        finally:
            release.cancel()
            locker.close()
        assert regdb.DeadLetter.select().count() == 0
        assert worker.outcomes[DEFERRED] >= 1, "the 14 s lock outlasted one retry budget"
        assert [d["device"] for d in devices()] == ["lock-cam"]
    finally:
        pub.close()
        worker.stop()


def test_an_agent_with_another_devices_id_says_the_broker_refuses_it(
    tmp_path, person_clip, int8_model
):
    passwd = write_password_file(tmp_path / "passwd", {"cam-a": "cam-a-secret"})
    acl = tmp_path / "acl"
    acl.write_text(render_acl())
    (tmp_path / "cam-a.password").write_text("cam-a-secret\n")
    security = BrokerSecurity(password_file=passwd, acl_file=acl)
    with Broker(tmp_path / "broker", security=security) as broker:
        extra = f"""
[broker]
host = "{broker.host}"
port = {broker.port}
username = "cam-a"
password_file = "{tmp_path / "cam-a.password"}"
reconnect_min_s = 0.5
reconnect_max_s = 2
"""
        config = write_config(tmp_path, broker, person_clip, int8_model, device="cam-b", extra="")
        text = config.read_text()
        start = text.index("[broker]")
        end = text.index("[[cameras]]")
        config.write_text(text[:start] + extra + "\n" + text[end:])
        agent = Agent(config, tmp_path / "agent.log")
        try:
            expected = (
                "broker refused publish to flowfleet/v1/devices/cam-b/"
                " by device cam-b (broker identity cam-a)"
            )
            wait_for(lambda: "broker refused publish" in agent.log(), 60, "the refusal logged")
            log = agent.log()
            line = next(x for x in log.splitlines() if "broker refused publish" in x)
            assert "ERROR" in line and "Not authorized" in line, line
            topic_part, identity_part = expected.split(" by ")
            assert topic_part in line and identity_part in line, line
            assert "differs from broker.username 'cam-a'" in line, line
            wait_for(lambda: agent_state(tmp_path)["seq"] >= 2, 60, "bins to be counted")
            assert agent_state(tmp_path)["unsent"] >= 2  # kept, never silently dropped
            assert log.count("broker refused publish to") == 1, "one error per refusal streak"
            assert "event publish_refused" in log  # queued for the registry
        finally:
            agent.terminate()
