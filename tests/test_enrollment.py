"""Enrollment by claim, end to end, on the fleet of `tests.enrollment_fleet`: the
real `flowfleet agent enroll` and `flowfleet agent` commands against the real
registry and Mosquitto, and the `flowfleet provision` commands an operator runs.

One module-scoped fleet; the tests run in order (the first enrolls cam-a).
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flowfleet import signing
from flowfleet.agent.config import load_agent_config
from flowfleet.agent.download import Downloader, UpdateRefused, verify_manifest
from flowfleet.agent.enroll import EnrollError, enroll, renew
from flowfleet.contract import parse_payload
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.authority import Authority, certificate_info
from flowfleet.provisioning.broker_files import refresh_crl

from .enrollment_fleet import (
    Fleet,
    T,
    as_device,
    assert_no_secrets_in_logs,
    devices,
    flowfleet_process,
    refused,
    running_fleet,
    wait_for,
)
from .factories import count_bin


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, videos: Path, int8_model: Path):
    with running_fleet(tmp_path_factory.mktemp("enroll"), videos, int8_model) as f:
        yield f


def test_a_device_enrolls_with_a_token_and_counts_over_mtls(fleet: Fleet):
    token = fleet.token("--group", "lobby", "--agent-template", str(fleet.root / "template.toml"))
    folder = fleet.root / "cam-a"
    # The one command on the device, as its own process.
    out = flowfleet_process(
        "agent", "enroll", "--registry", fleet.url, "--token", token,
        "--device", "cam-a", "--dir", str(folder),
    )  # fmt: skip
    fleet.outputs += [out.stdout, out.stderr]
    assert out.returncode == 0, out.stderr
    assert "enrolled cam-a" in out.stdout and "unregistered" in out.stdout
    assert (folder / "device.key").stat().st_mode & 0o777 == 0o600
    cert = Authority(fleet.ca.folder).records()[-1]
    assert (cert.cn, cert.kind) == ("cam-a", "device")
    assert cert.not_after - time.time() == pytest.approx(10 * 86400, abs=600)
    # Its device token downloads the models deployed to it, and nothing else.
    assert (folder / "registry.token").stat().st_mode & 0o777 == 0o600
    token_a = (folder / "registry.token").read_text().strip()
    fleet.secrets.append(token_a)
    assert as_device(fleet, token_a, "/api/devices/cam-a/deployments") == 200
    assert as_device(fleet, token_a, "/api/devices/cam-b/deployments") == 403
    keys = json.loads((folder / "keys.json").read_text())
    assert keys["keys"] and keys["keys"][0]["public_key"]
    # The device arrives unregistered, in the token's group.
    dev = devices(fleet)["cam-a"]
    assert dev["registration"] == "unregistered"
    groups = fleet.cli("registry", "groups", "list", "--db", fleet.db).stdout
    assert "lobby" in groups and "cam-a" in groups

    # The one config the registry wrote runs the agent on its own certificate.
    check = fleet.cli("agent", "check-config", "--config", str(folder / "agent.toml"))
    assert "device cam-a" in check.stdout
    log = fleet.root / "agent-a.log"
    with open(log, "wb") as fh:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowfleet.cli",
                "agent",
                "--config",
                str(folder / "agent.toml"),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: devices(fleet)["cam-a"]["bins"] >= 2, 60, "count bins from cam-a")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
    fleet.outputs.append(log.read_text())
    # Over the mutual-TLS listener: the only broker address the written config has.
    assert f"port = {fleet.broker.tls_port}" in (folder / "agent.toml").read_text()

    # The single-use token is spent: a second device is refused, nothing is written.
    other = fleet.root / "cam-b"
    refused = fleet.cli(
        "agent", "enroll", "--registry", fleet.url, "--token", token,
        "--device", "cam-b", "--dir", str(other), check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "used up" in refused.stderr
    assert not other.exists() or not any(other.iterdir())
    assert "cam-b" not in devices(fleet)


def test_the_enrolled_identity_gets_only_signed_deployed_models(fleet: Fleet, int8_model):
    """What enrollment wrote (certificate, keys.json, registry.token, [registry]) is
    what model updates need: the desired state arrives over mTLS, the manifest
    verifies against the registry's keys, the artifact downloads with the device
    token; a flipped byte, another key's signature and a version not deployed to the
    device are refused."""
    folder = fleet.root / "cam-a"
    fleet.cli("registry", "models", "add", str(int8_model), "--name", "people", "--db", fleet.db)
    dynamic = str(int8_model.parent / "yolov8n_int8_dynamic.tflite")
    fleet.cli("registry", "models", "add", dynamic, "--name", "people", "--db", fleet.db)  # v2
    body = json.dumps({"camera": "table", "model": "people", "version": 1}).encode()
    req = urllib.request.Request(
        fleet.url + "/api/devices/cam-a/deployments",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {fleet.admin()}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201

    got: list[bytes] = []
    conn = MqttConnection("ignored", fleet.device_address(folder))
    conn.subscribe(T.desired("cam-a"), lambda topic, payload: got.append(payload))
    conn.start()
    try:
        assert conn.wait_connected(10)
        wait_for(lambda: got, 10, "cam-a's desired state")
    finally:
        conn.stop()
    ref = parse_payload("desired", got[-1], device="cam-a").models["table"]
    config = load_agent_config(folder / "agent.toml")
    doc = verify_manifest(ref, config.registry.keys_file)
    models = fleet.root / "cam-a-models"
    models.mkdir()
    path = Downloader(models, threading.Event()).download(ref, doc, config.registry)
    assert path.read_bytes() == int8_model.read_bytes()

    other_key = signing.Ed25519PrivateKey.generate()
    forged = ref.model_copy(
        update={"signature": signing.sign(other_key, base64.b64decode(ref.manifest))}
    )
    with pytest.raises(UpdateRefused) as err:
        verify_manifest(forged, config.registry.keys_file)
    assert err.value.reason == "signature"
    # The stored artifact with a flipped byte: the download does not match the manifest.
    path.unlink()
    stored = next((fleet.root).glob(f"registry*-data/artifacts/sha256/*/{ref.sha256}"))
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(UpdateRefused) as err:
        Downloader(models, threading.Event()).download(ref, doc, config.registry)
    assert err.value.reason == "checksum"
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))
    # A version not deployed to this device (v2: a sideways move or a downgrade): refused.
    token = (folder / "registry.token").read_text().strip()
    assert as_device(fleet, token, "/api/models/people/versions/2/artifact") == 403
    assert as_device(fleet, token, ref.url) == 200


def test_expired_revoked_tokens_and_existing_ids_are_refused(fleet: Fleet):
    folder = fleet.root / "claims"
    short = fleet.token("--ttl-hours", str(0.3 / 3600))
    time.sleep(0.4)
    with pytest.raises(EnrollError, match="expired") as err:
        enroll(fleet.url, short, "cam-late", folder / "late")
    assert err.value.status == 401

    revoked = fleet.token("--uses", "5")
    listed = json.loads(fleet.cli("provision", "tokens", "list", "--db", fleet.db, "--json").stdout)
    token_id = next(t["id"] for t in listed["tokens"] if revoked.startswith(t["prefix"]))
    assert revoked not in json.dumps(listed)
    fleet.cli("provision", "tokens", "revoke", str(token_id), "--db", fleet.db)
    with pytest.raises(EnrollError, match="revoked"):
        enroll(fleet.url, revoked, "cam-rev", folder / "rev")
    with pytest.raises(EnrollError, match="unknown"):
        enroll(fleet.url, "ffe_" + "x" * 43, "cam-x", folder / "x")

    # cam-a exists: a new token cannot claim it until an operator allows it, once.
    multi = fleet.token("--uses", "3", "--auto-accept")
    with pytest.raises(EnrollError, match="exists") as err:
        enroll(fleet.url, multi, "cam-a", folder / "again")
    assert err.value.status == 409
    fleet.cli("provision", "tokens", "allow-reenroll", "cam-a", "--db", fleet.db)
    done = enroll(fleet.url, multi, "cam-a", folder / "again")
    assert done.registration == "unregistered"  # re-enrolling does not accept it
    first = (fleet.root / "cam-a" / "registry.token").read_text().strip()
    assert as_device(fleet, first, "/api/devices/cam-a/deployments") == 401  # replaced
    with pytest.raises(EnrollError, match="exists"):
        enroll(fleet.url, multi, "cam-a", folder / "third", force=True)
    # An auto-accepting token registers a new device at once.
    assert enroll(fleet.url, multi, "cam-c", folder / "c").registration == "registered"
    assert devices(fleet)["cam-c"]["registration"] == "registered"
    # Refusals wrote nothing beside the device key they never kept.
    assert not (folder / "late").exists() or not any((folder / "late").iterdir())


def test_a_device_renews_its_certificate_with_its_own_key(fleet: Fleet):
    folder = fleet.root / "claims" / "c"
    before = certificate_info(folder / "device.crt")
    key = (folder / "device.key").read_bytes()
    config = str(folder / "agent.toml")
    ran = fleet.cli("agent", "renew", "--config", config, "--registry", fleet.url, "--json")
    assert json.loads(ran.stdout)["renewed"] is False  # 10 days left: not due
    ran = fleet.cli(
        "agent", "renew", "--config", config, "--registry", fleet.url, "--days-before", "30"
    )
    assert "renewed" in ran.stdout
    after = certificate_info(folder / "device.crt")
    assert after["serial"] != before["serial"] and after["cn"] == "cam-c"
    assert (folder / "device.key").read_bytes() == key  # the key never changed hands
    assert not refused(fleet.device_address(folder))
    # A certificate from another CA cannot renew itself here.
    other = Authority.create(fleet.root / "other-ca")
    forged, _ = other.issue("device", "cam-c", fleet.root / "forged")
    with pytest.raises(EnrollError, match="not issued by this fleet CA") as err:
        renew(fleet.url, forged.cert, forged.key, days_before=1000)
    assert err.value.status == 401


def test_a_device_cannot_speak_for_another_and_revocation_takes_effect(fleet: Fleet):
    folder = fleet.root / "cam-a"
    got: list[bytes] = []
    conn = MqttConnection("ignored", fleet.device_address(folder))
    conn.subscribe(T.ack("cam-a"), lambda topic, payload: got.append(payload))
    conn.start()
    try:
        assert conn.wait_connected(10), "cam-a's enrolled certificate was refused"
        dev = devices(fleet)["cam-a"]
        before, seq = dev["bins"], dev["highest_seq"] + 1
        # Under cam-c's topic (the ACL drops it), then under its own.
        conn.publish(T.counts("cam-c"), count_bin("cam-c", 1).to_json())
        conn.publish(T.counts("cam-a"), count_bin("cam-a", seq).to_json())
        wait_for(lambda: devices(fleet)["cam-a"]["bins"] > before, 15, "cam-a's own bin")
        assert devices(fleet)["cam-c"]["bins"] == 0
    finally:
        conn.stop()

    # The doctor on the enrolled device: every check passes.
    doctor = ("doctor", "--config", str(folder / "agent.toml"), "--registry", fleet.url)
    doctor += ("--timeout", "3")
    ran = fleet.cli(*doctor, "--json")
    checks = {c["name"]: c for c in json.loads(ran.stdout)["checks"]}
    assert [c for c in checks.values() if c["status"] != "ok"] == []
    assert {"certificate", "broker", "clock", "model table", "camera table"} <= set(checks)
    assert "signing keys" in checks

    # An admin revokes cam-a through the registry's API: the registry revokes its
    # certificates in the CA, copies the CRL to the broker and reloads it.
    admin = fleet.admin()
    req = urllib.request.Request(
        fleet.url + "/api/devices/cam-a/revoke?reason=stolen",
        method="POST",
        headers={"Authorization": f"Bearer {admin}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert len(answer["revoked"]) == 2  # the first enrollment's and the re-enrollment's
    assert answer["broker_reloaded"]
    # The re-enrolled device's token replaced the first one; the revocation ended it.
    token_a2 = (fleet.root / "claims" / "again" / "registry.token").read_text().strip()
    fleet.secrets.append(token_a2)
    assert as_device(fleet, token_a2, "/api/devices/cam-a/deployments") == 401
    listing = json.loads(
        fleet.cli("provision", "cert", "list", "--ca", str(fleet.ca.folder), "--json").stdout
    )
    states = {(c["cn"], c["state"]) for c in listing["certificates"]}
    assert ("cam-a", "revoked") in states and ("cam-c", "valid") in states
    # The same certificate connected above; now the reloaded CRL refuses it.
    wait_for(lambda: refused(fleet.device_address(folder)), 10, "cam-a refused")
    with pytest.raises(EnrollError, match="revoked"):  # nor renew itself
        renew(fleet.url, folder / "device.crt", folder / "device.key", days_before=1000)
    ran = fleet.cli(*doctor, check=False)
    assert ran.returncode == 1
    assert "fail  broker" in ran.stdout and "fix:" in ran.stdout
    # cam-c keeps its access.
    assert not refused(fleet.device_address(fleet.root / "claims" / "c"))

    # The operator's way: `provision cert revoke --reload-pidfile` on the CA itself.
    out = fleet.cli(
        "provision", "cert", "revoke", "cam-c", "--ca", str(fleet.ca.folder),
        "--reload-pidfile", str(fleet.root / "broker.pid"), "--json",
    )  # fmt: skip
    assert json.loads(out.stdout)["reloaded_pid"] == fleet.broker.proc.pid
    refresh_crl(fleet.ca, fleet.root / "broker-files", fleet.root / "broker.pid")
    wait_for(lambda: refused(fleet.device_address(fleet.root / "claims" / "c")), 10, "cam-c")


def test_a_password_device_gets_its_password_from_the_registry_until_revoked(fleet: Fleet):
    """A device that cannot do client certificates enrolls for the password listener:
    the registry issues its password (handed over once, stored hashed), writes it into
    the broker's password file and the device into the ACL, and reloads the broker;
    revoking it takes both out again, and the broker refuses it."""
    files = fleet.root / "broker-files"
    token = fleet.token("--auto-accept", "--agent-template", str(fleet.root / "template.toml"))
    folder = fleet.root / "cam-p"
    done = enroll(fleet.url, token, "cam-p", folder, auth="password")
    assert done.registration == "registered"
    secret = (folder / "broker.password").read_text().strip()
    fleet.secrets.append(secret)
    assert (folder / "broker.password").stat().st_mode & 0o777 == 0o600
    config = load_agent_config(folder / "agent.toml")
    assert config.broker.username == "cam-p"
    assert config.broker.port == fleet.broker.config.security.password_tls_port
    assert config.broker.cert_file is None  # the password is its identity here
    # Only the hash reached the broker's file and the database.
    passwd = (files / "devices.passwd").read_text()
    assert "cam-p:$7$" in passwd and secret not in passwd
    assert passwd.startswith((fleet.root / "registry.passwd").read_text())
    assert secret not in Path(fleet.db).read_bytes().decode("latin-1")
    acl = (files / "devices.acl").read_text()
    assert "user cam-p\ntopic write flowfleet/v1/devices/cam-p/#" in acl

    # The written config connects (TLS, password) and its counts reach the registry.
    address = BrokerAddress(
        "127.0.0.1", config.broker.port, "cam-p", secret, ca_file=str(folder / "ca.crt")
    )
    wait_for(lambda: not refused(address), 10, "cam-p's password to be accepted")
    conn = MqttConnection("ignored", address)
    conn.start()
    try:
        assert conn.wait_connected(10)
        conn.publish(T.counts("cam-p"), count_bin("cam-p", 1).to_json())
        wait_for(lambda: devices(fleet)["cam-p"]["bins"] == 1, 15, "cam-p's bin")
        # The doctor on the device agrees.
        doctor = ("doctor", "--config", str(folder / "agent.toml"), "--timeout", "3", "--json")
        checks = {c["name"]: c for c in json.loads(fleet.cli(*doctor).stdout)["checks"]}
        assert checks["broker"]["status"] == "ok"

        req = urllib.request.Request(
            fleet.url + "/api/devices/cam-p/revoke?reason=lost",
            method="POST",
            headers={"Authorization": f"Bearer {fleet.admin()}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["password_revoked"] and answer["broker_reloaded"]
        assert "cam-p:" not in (files / "devices.passwd").read_text()
        assert "user cam-p" not in (files / "devices.acl").read_text()
        # Mosquitto re-checks open connections on reload: this one is cut off too.
        wait_for(lambda: not conn.connected.is_set(), 10, "cam-p's open connection to end")
    finally:
        conn.stop()
    wait_for(lambda: refused(address), 10, "cam-p's password to be refused")
    ran = fleet.cli(*doctor[:-1], check=False)
    assert ran.returncode == 1 and "fail  broker" in ran.stdout
    # The revoked device gets no new password, until it is enrolled again.
    req = urllib.request.Request(
        fleet.url + "/api/devices/cam-p/broker-password",
        method="POST",
        headers={"Authorization": f"Bearer {fleet.admin()}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 409
    # A device added on the command line gets its ACL entry there too (same config).
    conf = str(fleet.root / "registry.toml")
    added = fleet.cli("registry", "devices", "add", "cam-q", "--config", conf)
    assert "broker files devices.acl regenerated; broker reloaded: yes" in added.stderr
    assert "user cam-q\n" in (files / "devices.acl").read_text()
    # The operator's command regenerates the same files: nothing to change.
    done = json.loads(fleet.cli("provision", "broker-sync", "--config", conf, "--json").stdout)
    assert done == {"changed": [], "reloaded": False}


def test_secrets_never_reach_the_logs(fleet: Fleet):
    assert_no_secrets_in_logs(fleet)
