"""The enrolled agent as its own process (`flowfleet agent`) on its mTLS identity,
on the fleet of `tests.enrollment_fleet`: model updates with tampered references,
and certificate renewal inside the running agent.

One module-scoped fleet; the tests run in order.
"""

from __future__ import annotations

import base64
import datetime as dt
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowfleet import signing
from flowfleet.agent.enroll import enroll
from flowfleet.contract import Desired
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.authority import certificate_info

from .enrollment_fleet import (
    ADMIN_PW,
    Fleet,
    T,
    agent_template,
    api,
    assert_no_secrets_in_logs,
    devices,
    running_fleet,
    wait_for,
)
from .test_agent_update import ref_of


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, videos: Path, int8_model: Path):
    with running_fleet(tmp_path_factory.mktemp("enroll-agent"), videos, int8_model) as f:
        yield f


def agent_process(fleet: Fleet, folder: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """`flowfleet agent --config FOLDER/agent.toml` as its own process, logging to
    ``agent-NAME.log`` under the fleet's root."""
    log = fleet.root / f"agent-{name}.log"
    command = [sys.executable, "-m", "flowfleet.cli", "agent"]
    with open(log, "wb") as fh:
        agent = subprocess.Popen(
            [*command, "--config", str(folder / "agent.toml")],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    return agent, log


def test_an_enrolled_agent_refuses_tampered_updates_and_applies_a_good_one(
    fleet: Fleet, int8_model: Path
):
    """The enrolled agent, as its own process on its mTLS identity, receives desired
    states for an artifact with a flipped byte, one signed by another key and a
    downgrade to a version not deployed to it: it refuses each, keeps counting with
    its current model and reports why; then a good deployment is applied."""
    template = agent_template(fleet, "u")
    folder = fleet.root / "cam-u"
    enroll(
        fleet.url, fleet.token("--auto-accept", "--agent-template", str(template)), "cam-u", folder
    )
    # people v1: the model the agent starts with; v2: the dynamic-range one.
    dynamic = str(int8_model.parent / "yolov8n_int8_dynamic.tflite")
    for path in (str(int8_model), dynamic):
        fleet.cli("registry", "models", "add", path, "--name", "people", "--db", fleet.db)
    # The update gate's latency budget: generous on a shared, busy test machine.
    with (folder / "agent.toml").open("a") as fh:
        fh.write("gate_latency_factor = 20.0\n")
    people = {v["version"]: v for v in api(fleet, "GET", "/api/models/people/versions")["versions"]}
    v2 = people[2]
    stored = next(fleet.root.glob(f"registry*-data/artifacts/sha256/*/{v2['sha256']}"))
    stored.chmod(0o644)
    original = stored.read_bytes()

    def events(after: int) -> list[dict]:
        items = api(fleet, "GET", "/api/events?device=cam-u&limit=200")["events"]
        return [e for e in items if e["seq"] > after]

    def refused_as(version: int, after: int) -> dict:
        def seen():
            failed = [e for e in events(after) if e["type"] == "model_failed"]
            return next((e for e in failed if e["data"].get("desired_version") == version), None)

        return wait_for(seen, 60, f"the refusal of desired state {version}")

    def running() -> dict:
        return devices(fleet)["cam-u"]["reported"]["cameras"][0]

    admin = MqttConnection(
        "ignored", BrokerAddress("127.0.0.1", fleet.broker.port, "registry-1", ADMIN_PW)
    )
    agent, log = agent_process(fleet, folder, "u")
    admin.start()
    try:
        assert admin.wait_connected(10)
        wait_for(lambda: (devices(fleet)["cam-u"]["reported"] or {}).get("cameras"), 60, "cam-u")
        before = running()
        assert (before["file"], before["model"]) == (int8_model.name, None)  # the config's

        # (a) A flipped byte in the stored artifact of the deployed version.
        data = bytearray(original)
        data[1000] ^= 0xFF
        stored.write_bytes(bytes(data))
        deployed = api(
            fleet, "POST", "/api/devices/cam-u/deployments",
            {"camera": "table", "model": "people", "version": 2},
        )  # fmt: skip
        first = deployed["desired"]["version"]
        ev = refused_as(first, 0)
        assert ev["data"]["reason"] == "checksum", ev
        stored.write_bytes(original)

        # (b) The same model signed by another key; (c) a downgrade to v1, which is
        # signed by the registry but not deployed to this device (its token may not
        # download it). Published as another registry identity would.
        good = Desired.model_validate(deployed["desired"]).models["table"]
        forged = good.model_copy(
            update={
                "signature": signing.sign(
                    signing.Ed25519PrivateKey.generate(), base64.b64decode(good.manifest)
                )
            }
        )
        older = ref_of(api(fleet, "GET", "/api/models/people/versions/1"))
        for n, (ref, reason) in enumerate(((forged, "signature"), (older, "download")), 1):
            bins = devices(fleet)["cam-u"]["bins"]
            payload = Desired(device="cam-u", version=first + n, models={"table": ref})
            admin.publish(T.desired("cam-u"), payload.to_json(), retain=True)
            ev = refused_as(first + n, 0)
            assert ev["data"]["reason"] == reason, ev
            # It keeps its current model and keeps counting.
            now_ = running()
            assert (now_["file"], now_["model"]) == (before["file"], None)
            wait_for(lambda b=bins: devices(fleet)["cam-u"]["bins"] > b, 30, "cam-u counting")
        assert "HTTP 403" in ev["message"], ev  # the device token may not download v1

        # The registry's next desired state counts past the forged ones (as if it had
        # published them); the good deployment is applied.
        with sqlite3.connect(fleet.db) as con:
            con.execute(
                "UPDATE desired_counter SET last_version = ? WHERE device = ?",
                (first + 2, "cam-u"),
            )
        again = api(
            fleet, "POST", "/api/devices/cam-u/deployments",
            {"camera": "table", "model": "people", "version": 2},
        )  # fmt: skip
        assert again["desired"]["version"] == first + 3

        def applied():
            cam = running()
            return cam if cam.get("version") == 2 and cam.get("update") == "activated" else None

        cam = wait_for(applied, 90, "people v2 activated on cam-u")
        assert cam["sha256"] == v2["sha256"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()[-3000:]
    finally:
        admin.stop()
        stored.write_bytes(original)
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    fleet.outputs.append(log.read_text())


def short_lived(fleet: Fleet, cert_file: Path, seconds: float) -> dict:
    """Replace ``cert_file`` with a certificate of the fleet CA for the same key and
    name, valid from now for ``seconds`` (as a registry with very short certificates
    would issue); returns its info."""

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(fleet.ca.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(fleet.ca.ca.key.read_bytes(), password=None)
    t = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca_cert.subject)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(seconds=1))
        .not_valid_after(t + dt.timedelta(seconds=seconds))
    )
    for ext in current.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(pem)
    return certificate_info(pem)


def test_the_agent_renews_its_certificate_in_process_and_keeps_counting(fleet: Fleet):
    """A short-lived certificate: the running agent renews it at 2/3 of its lifetime,
    reconnects with the new one and counts on past the old one's expiry; no count bin
    is missing in the registry."""
    template = agent_template(fleet, "r")
    folder = fleet.root / "cam-r"
    token = fleet.token("--auto-accept", "--agent-template", str(template))
    enroll(fleet.url, token, "cam-r", folder)
    # 90 s: renewed after 60 s, which leaves a busy test machine time to start the agent.
    old = short_lived(fleet, folder / "device.crt", 90)
    agent, log = agent_process(fleet, folder, "r")
    try:
        wait_for(lambda: devices(fleet)["cam-r"]["bins"] >= 1, 90, "cam-r's first bin")
        renewed = wait_for(
            lambda: (
                (info := certificate_info(folder / "device.crt"))["serial"] != old["serial"]
                and info
            ),
            90,
            "the agent to renew its certificate",
        )
        # Renewed before expiry, with the registry's lifetime (10 days here).
        assert renewed["not_after"] - time.time() > 9 * 86400
        assert time.time() < old["not_after"]
        wait_for(lambda: time.time() > old["not_after"] + 1, 90, "the old certificate to expire")
        # Make it reconnect now (another connection under its identity takes over its
        # session): with the expired certificate the handshake would fail.
        takeover = MqttConnection("ignored", fleet.device_address(folder))
        takeover.start()
        try:
            assert takeover.wait_connected(10)
        finally:
            takeover.stop()
        bins = devices(fleet)["cam-r"]["bins"]
        wait_for(lambda: devices(fleet)["cam-r"]["bins"] >= bins + 3, 60, "cam-r counting on")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    text = log.read_text()
    fleet.outputs.append(text)
    assert text.count("device certificate renewed") == 1, text[-3000:]
    dev = devices(fleet)["cam-r"]
    assert dev["gaps"] == 0 and dev["bins"] == dev["highest_seq"]


def test_secrets_never_reach_the_logs(fleet: Fleet):
    assert_no_secrets_in_logs(fleet)
