"""The watch folder: slow writers, restarts mid-copy, duplicates, corrupt files, sidecars.

Runs the real watcher thread (watchdog + polling) with short settle times.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from flowfleet.registry.catalog.watch import WatchFolder
from flowfleet.registry.store import db as regdb

TFLITE = "yolov8n_full_integer_quant.tflite"
ONNX = "yolov8n_int8.onnx"
SETTLE = 0.6


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path / "drop"


def watcher(registry, folder, **kw) -> WatchFolder:
    return WatchFolder(registry, folder, settle_s=SETTLE, poll_s=0.1, closed_settle_s=0.3, **kw)


def versions(registry) -> list[tuple[str, int, str]]:
    with registry.db.connection_context():
        q = (
            regdb.ModelVersion.select(
                regdb.RegistryModel.name, regdb.ModelVersion.version, regdb.ModelVersion.sha256
            )
            .join(regdb.RegistryModel)
            .order_by(regdb.RegistryModel.name, regdb.ModelVersion.version)
        )
        return list(q.tuples())


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.exists() else set()


def test_a_dropped_model_with_sidecar_is_registered_and_moved(registry, folder, data):
    folder.mkdir()
    (folder / "door.tflite.json").write_text(
        json.dumps({"name": "door", "alias": "staging", "tags": ["int8"], "notes": "drop"})
    )
    with watcher(registry, folder):
        (folder / "door.tflite").write_bytes((data / "models" / TFLITE).read_bytes())
        wait_for(lambda: "door.tflite" in names(folder / "processed"), what="processed")
    assert names(folder / "processed") == {"door.tflite", "door.tflite.json"}
    assert names(folder) == {"processed", "failed"}
    ((name, number, _),) = versions(registry)
    assert (name, number) == ("door", 1)
    with registry.db.connection_context():
        v = registry.version("door", "staging")
        assert (v.notes, json.loads(v.tags), v.created_by) == ("drop", ["int8"], "watch-folder")
        entries, _ = registry.audit_log(target="model:door")
    assert {e["actor"] for e in entries} == {"watch-folder"}


def test_a_slow_writer_is_waited_for(registry, folder, data):
    raw = (data / "models" / ONNX).read_bytes()
    folder.mkdir()
    with watcher(registry, folder):
        with open(folder / "slow.onnx", "wb") as fh:  # one open handle, written slowly
            for i in range(0, len(raw), len(raw) // 5 + 1):
                fh.write(raw[i : i + len(raw) // 5 + 1])
                fh.flush()
                time.sleep(0.25)  # < SETTLE: still being written
                assert versions(registry) == [], "taken before the copy finished"
        wait_for(lambda: "slow.onnx" in names(folder / "processed"), what="processed")
    ((name, number, sha),) = versions(registry)
    import hashlib

    assert (name, number, sha) == ("slow", 1, hashlib.sha256(raw).hexdigest())
    assert names(folder / "failed") == set()


def test_a_partial_file_at_restart_is_finished_then_registered_once(registry, folder, data):
    raw = (data / "models" / TFLITE).read_bytes()
    folder.mkdir()
    first = watcher(registry, folder)
    first.start()
    fh = open(folder / "big.tflite", "wb")  # noqa: SIM115
    fh.write(raw[: len(raw) // 2])
    fh.flush()
    first.stop()  # the registry goes down mid-copy

    second = watcher(registry, folder)
    second.start()
    try:
        time.sleep(SETTLE / 2)
        fh.write(raw[len(raw) // 2 :])  # the copy goes on after the restart
        fh.close()
        wait_for(lambda: "big.tflite" in names(folder / "processed"), what="processed")
    finally:
        second.stop()
    assert len(versions(registry)) == 1
    assert names(folder / "failed") == set()


def test_duplicates_and_concurrent_drops(registry, folder, data):
    folder.mkdir()
    files = {
        "a.tflite": (data / "models" / TFLITE).read_bytes(),
        "b.onnx": (data / "models" / ONNX).read_bytes(),
        "a-copy.tflite": (data / "models" / TFLITE).read_bytes(),  # same bytes as a.tflite
        "c.tflite": (data / "models" / "yolov8n_int8_dynamic.tflite").read_bytes(),
    }
    with watcher(registry, folder):
        threads = [
            threading.Thread(target=(folder / n).write_bytes, args=(b,)) for n, b in files.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: set(files) <= names(folder / "processed"), what="all processed")
    got = versions(registry)
    assert len(got) == 3, got  # a and a-copy are one version
    assert {n for n, _, _ in got} <= {"a", "a-copy", "b", "c"}


@pytest.mark.parametrize(
    ("file", "content", "sidecar", "reason"),
    [
        ("cut.tflite", "truncated", None, "truncated or corrupt"),
        ("notes.onnx", b"just some text\n" * 10, None, "not a model file"),
        ("ok.tflite", "valid", "{not json", "not valid JSON"),
        ("ok.tflite", "valid", json.dumps({"colour": "red"}), "unknown key(s) colour"),
        ("ok.tflite", "valid", json.dumps({"name": "../x"}), "not a valid model name"),
        ("ok.tflite", "valid", json.dumps({"target": "rpi5"}), "'target' must be a list"),
        ("ok.tflite", "valid", json.dumps({"target": ["a b"]}), "target hardware name"),
        ("ok.tflite", "valid", json.dumps({"group": "lobby"}), "no 'camera'"),
        (
            "ok.tflite",
            "valid",
            json.dumps({"group": "lobby", "camera": "door"}),
            "no command publisher",
        ),
    ],
)
def test_refused_files_go_to_failed_with_the_reason(
    registry, folder, data, file, content, sidecar, reason
):
    raw = (data / "models" / TFLITE).read_bytes()
    body = {"truncated": raw[:100_000], "valid": raw}.get(content, content)
    folder.mkdir()
    if sidecar is not None:
        (folder / f"{file}.json").write_text(sidecar)
    with watcher(registry, folder):
        (folder / file).write_bytes(body)
        wait_for(lambda: f"{file}.error.txt" in names(folder / "failed"), what="failed")
    assert file in names(folder / "failed")
    assert reason in (folder / "failed" / f"{file}.error.txt").read_text()
    assert versions(registry) == []


def test_temporary_names_are_ignored_until_renamed(registry, folder, data):
    folder.mkdir()
    with watcher(registry, folder) as w:
        (folder / "m.tflite.part").write_bytes((data / "models" / TFLITE).read_bytes())
        (folder / ".hidden.tflite").write_bytes(b"x")
        time.sleep(SETTLE * 1.5)
        assert versions(registry) == []
        (folder / "m.tflite.part").rename(folder / "m.tflite")
        wait_for(lambda: "m.tflite" in names(folder / "processed"), what="processed")
        assert w.scan() == []
    assert names(folder) == {"processed", "failed", ".hidden.tflite"}


def test_a_sidecar_with_target_hardware_and_a_device_group_deploys_to_the_group(
    registry, folder, data, broker
):
    """The sidecar's target hardware is signed into the version's metadata and its
    group gets the new version: each member's retained desired state names it."""
    from flowfleet.contract import Topics, parse_payload
    from flowfleet.mqtt import BrokerAddress, MqttConnection
    from flowfleet.registry.fleet import groups
    from flowfleet.registry.fleet.commands import CommandPublisher

    from .test_registry_deploy import Subscriber

    with registry.db.connection_context():
        groups.set_group(registry.db, "lobby", ["cam-a", "cam-b"], actor="t")
        groups.set_group(registry.db, "empty", [], actor="t")
    conn = MqttConnection("test-watch", BrokerAddress(broker.host, broker.port))
    conn.start()
    assert conn.wait_connected(10)
    folder.mkdir()
    (folder / "door.tflite.json").write_text(
        json.dumps({"target": ["rpi5", "jetson-orin"], "group": "lobby", "camera": "door"})
    )
    (folder / "bad.tflite.json").write_text(json.dumps({"group": "empty", "camera": "door"}))
    raw = (data / "models" / TFLITE).read_bytes()
    publisher = CommandPublisher(registry.db, conn, tick_s=0.2)
    publisher.start()
    try:
        with watcher(registry, folder, commands=publisher, topics=Topics()):
            (folder / "door.tflite").write_bytes(raw)
            (folder / "bad.tflite").write_bytes(raw)
            wait_for(lambda: "door.tflite" in names(folder / "processed"), what="processed")
            wait_for(lambda: "bad.tflite.error.txt" in names(folder / "failed"), what="failed")
        for device in ("cam-a", "cam-b"):
            sub = Subscriber(broker, device)
            try:
                (msg,) = sub.wait(1)
            finally:
                sub.close()
            desired = parse_payload("desired", msg.payload, device=device)
            assert (desired.models["door"].name, desired.models["door"].version) == ("door", 1)
    finally:
        publisher.stop()
        conn.stop()
    assert (
        "group 'empty' has no devices" in (folder / "failed" / "bad.tflite.error.txt").read_text()
    )
    with registry.db.connection_context():
        v = registry.version("door", 1)
        assert json.loads(v.metadata)["target"] == ["jetson-orin", "rpi5"]
        assert '"target":["jetson-orin","rpi5"]' in v.manifest  # signed
        assert registry.version_dict(v)["target"] == ["jetson-orin", "rpi5"]


ROLLOUT_SIDECAR = """
camera = "door"
reason = "night model"
[targets]
groups = ["lobby"]
[plan]
waves = 2
soak_s = 120
canary = { count = 1 }
"""


def test_a_rollout_sidecar_creates_a_staged_rollout(registry, folder, data):
    """``door.tflite.rollout.toml`` asks for a rollout of the version it brings: the
    version is registered and a rollout of it created with that plan (the registry's
    rollout job moves it on); both sidecars move with the file."""
    from flowfleet.registry.fleet import groups, rollouts
    from flowfleet.registry.store.db import AuditEntry

    with registry.db.connection_context():
        groups.set_group(registry.db, "lobby", ["cam-a", "cam-b", "cam-c"], actor="t")
    folder.mkdir()
    (folder / "door.tflite.json").write_text(json.dumps({"name": "door"}))
    (folder / "door.tflite.rollout.toml").write_text(ROLLOUT_SIDECAR)
    with watcher(registry, folder):
        (folder / "door.tflite").write_bytes((data / "models" / TFLITE).read_bytes())
        wait_for(lambda: "door.tflite" in names(folder / "processed"), what="processed")
    assert names(folder / "processed") == {
        "door.tflite",
        "door.tflite.json",
        "door.tflite.rollout.toml",
    }
    assert [v[:2] for v in versions(registry)] == [("door", 1)]
    with registry.db.connection_context():
        (r,) = rollouts.list_rollouts()
        full = rollouts.get_rollout(r["id"])
        assert (full["model"], full["version"], full["camera"]) == ("door", 1, "door")
        assert full["plan"]["waves"] == 2 and full["plan"]["soak_s"] == 120
        assert full["plan"]["canary"] == {"devices": None, "count": 1, "percent": None}
        assert full["targets"] == {"groups": ["lobby"]}
        assert sum(len(w["devices"]) for w in full["waves"]) == 3
        assert len(full["waves"][0]["devices"]) == 1  # the canary
        entry = AuditEntry.get(AuditEntry.action == "rollout.create")
        assert (entry.actor, entry.reason) == ("watch-folder", "night model")


@pytest.mark.parametrize(
    ("toml", "json_sidecar", "reason"),
    [
        ("camera = 'door'\n[targets]\nall = true\nwaves = 3\n", None, "targets.waves"),
        ("camera = 'door'\ncolour = 'red'\n[targets]\nall = true\n", None, "unknown key(s) colour"),
        ("[targets]\ngroups = ['lobby']\n", None, "'camera' is required"),
        ("camera = 'door'\n", None, "'targets' is required"),
        (
            "camera = 'door'\n[targets]\ngroups = ['lobby']\n[plan]\nsoak_s = -1\n",
            None,
            "plan.soak_s",
        ),
        (
            "camera = 'door'\n[targets]\ngroups = ['lobby']\n"
            "[plan.canary]\ncount = 1\npercent = 5\n",
            None,
            "plan.canary",
        ),
        ("camera = 'door'\n[targets]\ngroups = ['nowhere']\n", None, "nowhere"),
        ("camera = 'door'\n[targets]\ntags = ['unused-tag']\n", None, "name no device"),
        ("camera = 'a b'\n[targets]\ngroups = ['lobby']\n", None, "camera"),
        ("camera = = 'door'\n", None, "not valid TOML"),
        (ROLLOUT_SIDECAR, {"group": "lobby", "camera": "door"}, "give one of them"),
    ],
)
def test_a_bad_rollout_sidecar_is_refused_naming_the_file_and_key(
    registry, folder, data, toml, json_sidecar, reason
):
    """Validated before anything is registered: the file goes to failed/ with an
    error naming the sidecar and the key; no version, no rollout."""
    from flowfleet.registry.fleet import groups, rollouts

    with registry.db.connection_context():
        groups.set_group(registry.db, "lobby", ["cam-a"], actor="t")
    folder.mkdir()
    (folder / "ok.tflite.rollout.toml").write_text(toml)
    if json_sidecar is not None:
        (folder / "ok.tflite.json").write_text(json.dumps(json_sidecar))
    with watcher(registry, folder):
        (folder / "ok.tflite").write_bytes((data / "models" / TFLITE).read_bytes())
        wait_for(lambda: "ok.tflite.error.txt" in names(folder / "failed"), what="failed")
    error = (folder / "failed" / "ok.tflite.error.txt").read_text()
    assert reason in error, error
    assert "ok.tflite.rollout.toml" in error or "ok.tflite.json" in error
    assert "ok.tflite.rollout.toml" in names(folder / "failed")
    assert versions(registry) == []
    with registry.db.connection_context():
        assert rollouts.list_rollouts() == []
