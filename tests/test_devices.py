"""Devices as records: hardware and camera geometry from the agent's online status,
registration (accept), presence with staleness, editing through the API and CLI, and
deployments refused when the device's hardware cannot run the model. Real SQLite and
PostgreSQL (the ``registry`` fixture), real ingest, the app's test client."""

# The deployment tests' fixtures are imported below; pytest injects them by name.
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from flowfleet import contract, contract_device
from flowfleet.agent import hardware as hw
from flowfleet.agent.config import AgentConfig
from flowfleet.agent.service import camera_geometry
from flowfleet.cli import main
from flowfleet.contract import ContractError, Topics, parse_payload
from flowfleet.registry.catalog.modelreg import RegistryError
from flowfleet.registry.fleet import devices, groups
from flowfleet.registry.fleet.ingest import STORED, Ingestor
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store.db import AuditEntry, Device
from flowfleet.registry.testing import release
from tests.factories import count_bin, hardware, valid_payload
from tests.test_registry_deploy import TFLITE, bearer, tokens  # noqa: F401 - fixture

TOPICS = Topics()
NOW = time.time()


def status_msg(device="cam-1", **changes) -> bytes:
    body = valid_payload("status", device, now=NOW)
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


# -- contract -------------------------------------------------------------------------


def test_the_device_contract_module_agrees_with_the_contract():
    assert contract_device.NAME_PATTERN == contract.NAME_PATTERN
    assert contract_device._NO_NUL == contract._NO_NUL


def test_an_older_status_and_the_last_will_stay_valid():
    old = {"schema": 1, "kind": "status", "device": "cam-1", "state": "online", "ts": NOW}
    assert parse_payload("status", json.dumps(old).encode()).hardware is None
    will = contract.Status(device="cam-1", state="offline").to_json()
    assert json.loads(will) == {
        "schema": 1,
        "kind": "status",
        "device": "cam-1",
        "state": "offline",
    }
    full = parse_payload("status", status_msg())
    assert full.hardware.arch == "aarch64" and full.cameras[0].lines[0].name == "door"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hardware": hardware(arch="x 86")}, "hardware.arch"),
        ({"hardware": hardware(board="a\x00b")}, "hardware.board"),
        ({"hardware": hardware(board="x" * 129)}, "hardware.board"),
        ({"hardware": hardware(accelerators="edgetpu")}, "hardware.accelerators"),
        ({"hardware": hardware(runtimes={"tflite": 2})}, "hardware.runtimes.tflite"),
        ({"hardware": {**hardware(), "gpu": "x"}}, "hardware.gpu"),
        ({"cameras": [{"camera": "a"}, {"camera": "a"}]}, "cameras"),
        (
            {"cameras": [{"camera": "a", "zones": [{"name": "z", "points": [[0, 0], [1, 1]]}]}]},
            "cameras.0.zones.0.points",
        ),
        (
            {"cameras": [{"camera": "a", "lines": [{"name": "l", "points": [[0, 1e6], [1, 1]]}]}]},
            "cameras.0.lines.0.points.0.1",
        ),
        ({"cameras": [{"camera": "a/b"}]}, "cameras.0.camera"),
    ],
)
def test_bad_hardware_or_geometry_is_refused_naming_the_field(change, field):
    with pytest.raises(ContractError, match=f"field '{field}"):
        parse_payload("status", status_msg(**change), device="cam-1")


# -- agent ----------------------------------------------------------------------------


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


@pytest.mark.parametrize(
    ("files", "board", "board_id", "accelerators"),
    [
        (
            {
                "proc/device-tree/model": b"Raspberry Pi 5 Model B Rev 1.0\x00",
                "sys/bus/usb/devices/2-1/idVendor": b"18d1\n",
                "sys/bus/usb/devices/2-1/idProduct": b"9302\n",
            },
            "Raspberry Pi 5 Model B Rev 1.0",
            "rpi5",
            ("edgetpu",),
        ),
        (
            {"proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00"},
            "NVIDIA Jetson Orin Nano Developer Kit",
            "jetson-orin",
            ("cuda",),
        ),
        (
            {
                "sys/class/dmi/id/sys_vendor": b"LENOVO\n",
                "sys/class/dmi/id/product_name": b"ThinkCentre M75q\n",
                "dev/apex_0": b"",
                "dev/hailo0": b"",
            },
            "LENOVO ThinkCentre M75q",
            None,
            ("edgetpu", "hailo"),
        ),
        ({}, None, None, ()),
    ],
)
def test_the_agent_reads_its_hardware_from_files(tmp_path, files, board, board_id, accelerators):
    _tree(tmp_path, {"etc/os-release": b'NAME="Debian"\nPRETTY_NAME="Debian 12"\n', **files})
    found = hw.probe(tmp_path)
    assert (found.board, found.board_id, found.accelerators) == (board, board_id, accelerators)
    assert found.os == "Debian 12" and found.arch and found.python
    # The runtimes come from package metadata (nothing imported): this venv has them.
    assert found.runtimes["tflite"].startswith(("ai-edge-litert ", "tflite-runtime "))


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("arm64", "aarch64"),
        ("armv7l", "arm"),
        ("i686", "x86"),
        ("", None),
    ],
)
def test_cpu_architectures_use_the_registry_names(machine, arch):
    assert hw.normalise_arch(machine) == arch


def test_the_agent_reports_its_cameras_geometry():
    config = AgentConfig.model_validate(
        {
            "device_id": "cam-1",
            "cameras": [
                {
                    "name": "front",
                    "source": "x.mp4",
                    "model": "m.tflite",
                    "lines": [{"name": "door", "points": [[0, 10], [100, 10]]}],
                    "zones": [{"name": "hall", "points": [[0, 0], [5, 0], [5, 5]]}],
                }
            ],
        }
    )
    (cam,) = camera_geometry(config)
    assert (cam.camera, cam.lines[0].points, cam.zones[0].name, cam.speed) == (
        "front",
        ((0.0, 10.0), (100.0, 10.0)),
        "hall",
        False,
    )


# -- ingest: the record from the status -------------------------------------------------


@pytest.fixture
def ingestor(registry):
    return Ingestor(registry.db, TOPICS)


def test_a_device_first_seen_through_telemetry_is_unregistered_until_accepted(registry, ingestor):
    assert ingestor.handle(TOPICS.counts("cam-1"), count_bin("cam-1").to_json()) == STORED
    assert ingestor.handle(TOPICS.status("cam-1"), status_msg()) == STORED
    dev = Device.get_by_id("cam-1")
    record = devices.device_dict(dev, time.time(), 180)
    assert record["registration"] == "unregistered" and record["accepted_at"] is None
    assert record["hardware"] == hardware()
    assert record["cameras"][0]["zones"][0]["points"] == [[0, 0], [320, 0], [320, 240]]
    assert record["reported_at"] is not None

    # The Last Will (no hardware) and count bins leave the record as it is.
    will = contract.Status(device="cam-1", state="offline").to_json()
    assert ingestor.handle(TOPICS.status("cam-1"), will) == STORED
    assert ingestor.handle(TOPICS.counts("cam-1"), count_bin("cam-1", 2).to_json()) == STORED
    dev = Device.get_by_id("cam-1")
    assert dev.state == "offline" and json.loads(dev.hardware) == hardware()

    devices.accept_device(registry.db, "cam-1", actor="user:op", reason="installed")
    devices.accept_device(registry.db, "cam-1", actor="user:op")  # again: no change
    dev = Device.get_by_id("cam-1")
    assert dev.accepted_by == "user:op"
    trail = AuditEntry.select().where(AuditEntry.action == "device.accept")
    assert [(e.target, e.reason) for e in trail] == [("device:cam-1", "installed")]


@pytest.mark.parametrize(
    ("state", "silent_s", "presence"),
    [
        ("online", 10, "online"),
        ("online", 181, "stale"),
        ("unknown", 181, "stale"),
        ("unknown", 10, "unknown"),
        ("offline", 10_000, "offline"),
    ],
)
def test_presence_is_stale_when_messages_stop_without_rewriting_the_state(
    state, silent_s, presence
):
    assert devices.presence(state, NOW - silent_s, NOW, 180.0) == presence


def test_the_api_shows_a_silent_online_device_as_stale(registry, ingestor, tokens):
    ingestor.handle(TOPICS.status("cam-1"), status_msg())
    Device.update(last_seen=time.time() - 600).where(Device.id == "cam-1").execute()
    client = create_app(registry.db, registry=registry, stale_after_s=300).test_client()
    (item,) = client.get("/api/devices", headers=bearer(tokens["viewer"])).get_json()["devices"]
    assert (item["state"], item["presence"], item["stale_after_s"]) == ("online", "stale", 300)
    assert Device.get_by_id("cam-1").state == "online"  # nothing rewritten
    client = create_app(registry.db, registry=registry, stale_after_s=900).test_client()
    got = client.get("/api/devices/cam-1", headers=bearer(tokens["viewer"])).get_json()
    assert got["presence"] == "online"


# -- API ------------------------------------------------------------------------------


@pytest.fixture
def client(registry):
    return create_app(registry.db, registry=registry).test_client()


def test_devices_are_registered_edited_accepted_and_listed_through_the_api(
    client,
    ingestor,
    tokens,
):
    op, viewer = bearer(tokens["operator"]), bearer(tokens["viewer"])
    ingestor.handle(TOPICS.status("cam-new"), status_msg("cam-new"))
    resp = client.post(
        "/api/devices",
        json={"device": "cam-pre", "name": "Gate", "site": "paris", "reason": "ordered"},
        headers=op,
    )
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["registration"] == "registered"
    assert client.post("/api/devices", json={"device": "cam-pre"}, headers=op).status_code == 409

    def listed(registration):
        body = client.get(f"/api/devices?registration={registration}", headers=viewer).get_json()
        return [d["device"] for d in body["devices"]]

    assert listed("unregistered") == ["cam-new"] and listed("registered") == ["cam-pre"]

    patch = {
        "name": "Front door",
        "description": "above the main entrance",
        "tags": ["lobby", "outdoor", "lobby"],
        "site": "paris",
        "location": {"latitude": 48.8584, "longitude": 2.2945},
        "reason": "survey",
    }
    resp = client.patch("/api/devices/cam-new", json=patch, headers=op)
    assert resp.status_code == 200, resp.get_json()
    got = resp.get_json()
    assert (got["name"], got["tags"], got["location"]) == (
        "Front door",
        ["lobby", "outdoor"],
        {"latitude": 48.8584, "longitude": 2.2945},
    )
    resp = client.patch("/api/devices/cam-new", json={"location": None, "tags": None}, headers=op)
    assert (resp.get_json()["location"], resp.get_json()["tags"]) == (None, [])
    assert resp.get_json()["name"] == "Front door"  # left out: kept

    resp = client.post("/api/devices/cam-new/accept?reason=checked", headers=op)
    assert resp.status_code == 200 and resp.get_json()["registration"] == "registered"
    assert listed("unregistered") == []

    trail = client.get("/api/audit?target=device:cam-new", headers=op).get_json()["entries"]
    assert [e["action"] for e in reversed(trail)] == [
        "device.update",
        "device.update",
        "device.accept",
    ]
    assert trail[-1]["details"]["changes"]["name"] == [None, "Front door"]


@pytest.mark.parametrize(
    ("method", "path", "body", "role", "status", "field"),
    [
        ("patch", "/api/devices/cam-1", {"name": "x"}, "viewer", 403, None),
        ("post", "/api/devices/cam-1/accept", None, "viewer", 403, None),
        ("patch", "/api/devices/cam-1", {"name": "x"}, None, 401, None),
        ("patch", "/api/devices/nope", {"name": "x"}, "operator", 404, "device"),
        ("post", "/api/devices/nope/accept", None, "operator", 404, "device"),
        ("get", "/api/devices/nope", None, "viewer", 404, "device"),
        ("patch", "/api/devices/cam-1", {"colour": "red"}, "operator", 400, "colour"),
        ("patch", "/api/devices/cam-1", {"name": 5}, "operator", 400, "name"),
        ("patch", "/api/devices/cam-1", {"name": "x" * 129}, "operator", 400, "name"),
        ("patch", "/api/devices/cam-1", {"tags": ["ok", "no way"]}, "operator", 400, "tags"),
        ("patch", "/api/devices/cam-1", {"tags": "lobby"}, "operator", 400, "tags"),
        ("patch", "/api/devices/cam-1", {"site": "a/b"}, "operator", 400, "site"),
        (
            "patch",
            "/api/devices/cam-1",
            {"location": {"latitude": 91, "longitude": 0}},
            "operator",
            400,
            "location.latitude",
        ),
        (
            "patch",
            "/api/devices/cam-1",
            {"location": {"latitude": 1}},
            "operator",
            400,
            "location",
        ),
        (
            "patch",
            "/api/devices/cam-1",
            {"name": "ok", "location": {"latitude": 1, "longitude": True}},
            "operator",
            400,
            "location.longitude",
        ),
        ("post", "/api/devices", {"name": "x"}, "operator", 400, "device"),
        ("post", "/api/devices", {"device": "../x"}, "operator", 400, "device"),
        ("get", "/api/devices?registration=maybe", None, "viewer", 400, "registration"),
    ],
)
def test_bad_device_requests_are_refused_naming_the_field_and_change_nothing(
    client,
    ingestor,
    tokens,
    method,
    path,
    body,
    role,
    status,
    field,
):
    ingestor.handle(TOPICS.status("cam-1"), status_msg())
    before = Device.get_by_id("cam-1").__data__
    headers = bearer(tokens[role]) if role else {}
    kwargs = {"json": body} if body is not None else {}
    resp = getattr(client, method)(path, headers=headers, **kwargs)
    assert resp.status_code == status, resp.get_json()
    if field is not None:
        assert resp.get_json()["error"]["field"] == field
    assert Device.get_by_id("cam-1").__data__ == before
    assert not AuditEntry.select().where(AuditEntry.action.startswith("device.")).exists()


# -- hardware match ---------------------------------------------------------------------


def _elf(tmp_path: Path, machine: int) -> Path:
    """An ELF executable (this system's `true`) with its e_machine set to ``machine``."""
    data = bytearray(Path(shutil.which("true")).read_bytes())
    data[18:20] = machine.to_bytes(2, "little")
    path = tmp_path / f"m{machine}.eim"
    path.write_bytes(bytes(data))
    return path


MODELS = {
    # name: (file, target)
    "eim-arm64": (lambda d, t: _elf(t, 183), None),
    "eim-x86": (lambda d, t: _elf(t, 62), None),
    "tpu": (lambda d, t: d / "models" / TFLITE, ["edgetpu"]),
    "onnx": (lambda d, t: d / "models" / "yolov8n_int8.onnx", None),
    "jetson": (lambda d, t: d / "models" / "yolov8n_int8_dynamic.tflite", ["jetson-orin"]),
}


@pytest.fixture
def models(registry, data, tmp_path):
    for name, (path, target) in MODELS.items():
        src = path(data, tmp_path)
        registry.add_version(src, name=name, filename=src.name, actor="test", target=target)
    return registry


@pytest.mark.parametrize(
    ("model", "reported", "refused"),
    [
        ("eim-arm64", hardware(runtimes={"eim": "edge_impulse_linux 1.2"}), None),
        ("eim-x86", hardware(runtimes={"eim": "edge_impulse_linux 1.2"}), "built for x86_64"),
        ("eim-arm64", hardware(arch="x86_64", runtimes={"eim": "e 1"}), "the device is x86_64"),
        ("tpu", hardware(), "needs edgetpu, the device reports no accelerator"),
        ("tpu", hardware(accelerators=["edgetpu"]), None),
        ("tpu", hardware(accelerators=None), None),  # not probed: not refused
        ("onnx", hardware(), "needs the onnx runtime, the device reports tflite"),
        ("onnx", hardware(runtimes={"onnx": "onnxruntime 1.19", "tflite": "x"}), None),
        ("onnx", hardware(runtimes=None), None),
        ("jetson", hardware(), "its target is jetson-orin, the device is rpi5"),
        ("jetson", hardware(board_id="jetson-orin"), None),
        ("jetson", hardware(board_id=None), None),
        ("onnx", None, None),  # never reported its hardware
    ],
)
def test_a_deployment_the_hardware_cannot_run_is_refused_with_the_reason(
    models, ingestor, model, reported, refused
):
    ingestor.handle(TOPICS.status("cam-1"), status_msg(hardware=reported))
    if refused is None:
        models.deploy("cam-1", "front", model, 1, actor="test")
        entry = AuditEntry.get(AuditEntry.action == "deployment.set")
        note = json.loads(entry.details)["hardware"]
        partial = reported is None or reported.keys() != hardware().keys()
        assert f"{model} v1" in note and ("not checked" in note) == partial, note
        return
    with pytest.raises(RegistryError) as exc:
        models.deploy("cam-1", "front", model, 1, actor="test")
    assert exc.value.status == 409 and exc.value.code == "hardware_mismatch"
    assert exc.value.message.startswith(f"device cam-1 cannot run {model} v1")
    assert refused in exc.value.message
    assert not AuditEntry.select().where(AuditEntry.action == "deployment.set").exists()


def test_a_group_deployment_refuses_only_the_devices_that_cannot_run_it(models, ingestor):
    ingestor.handle(TOPICS.status("cam-1"), status_msg("cam-1"))
    ingestor.handle(
        TOPICS.status("cam-2"),
        status_msg("cam-2", hardware=hardware(runtimes={"onnx": "onnxruntime 1.19"})),
    )
    groups.set_group(models.db, "lobby", ["cam-1", "cam-2"], actor="test")
    result = groups.deploy_to_group(models, "lobby", "front", "onnx", 1, actor="test")
    assert [r["device"] for r in result["deployed"]] == ["cam-2"]
    (failed,) = result["failed"]
    assert failed["device"] == "cam-1" and "needs the onnx runtime" in failed["error"]


# -- CLI ------------------------------------------------------------------------------


def test_the_cli_lists_edits_and_accepts_devices(registry, ingestor, db_url, tmp_path, capsys):
    ingestor.handle(TOPICS.status("cam-1"), status_msg())
    release()

    def run(*argv):
        release()
        rc = main(["registry", "devices", *argv, "--db", db_url, "--state-dir", str(tmp_path)])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = run("list", "--unregistered")
    assert rc == 0 and out.startswith("cam-1\tonline\tunregistered\tsite -\trpi5")
    rc, out, _ = run(
        "edit", "cam-1", "--name", "Door", "--tag", "lobby", "--location", "48.85,2.29", "--json"
    )
    assert rc == 0 and json.loads(out)["location"] == {"latitude": 48.85, "longitude": 2.29}
    rc, _, err = run("edit", "cam-1", "--location", "48.85")
    assert rc == 2 and "--location" in err
    rc, _, err = run("edit", "cam-1", "--location", "91,0")
    assert rc == 2 and "location.latitude" in err
    rc, _, err = run("edit", "nope", "--name", "x")
    assert rc == 1 and "no device 'nope'" in err
    rc, out, _ = run("accept", "cam-1", "--reason", "seen it")
    assert rc == 0 and "registered" in out
    rc, out, _ = run("add", "cam-2", "--site", "lyon", "--json")
    assert rc == 0 and json.loads(out)["registration"] == "registered"
    rc, _, err = run("add", "cam-2")
    assert rc == 1 and "already known" in err
    rc, out, _ = run("show", "cam-1")
    shown = json.loads(out)
    assert (shown["name"], shown["tags"], shown["accepted_by"][:4]) == ("Door", ["lobby"], "cli:")
    rc, out, _ = run("list", "--json")
    assert [d["device"] for d in json.loads(out)] == ["cam-1", "cam-2"]
