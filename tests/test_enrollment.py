"""Enrollment by claim, end to end: a real Mosquitto with the generated config (mTLS
listener with the fleet CA's CRL, password listener for the registry, generated ACL),
the real registry process (`flowfleet registry --config`) with an ``[enrollment]``
section, the real `flowfleet agent enroll` and `flowfleet agent` commands, and the
`flowfleet provision` commands an operator runs.

One module-scoped fleet; the tests run in order (the first enrolls cam-a).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pytest

from flowfleet import signing
from flowfleet.agent.config import load_agent_config
from flowfleet.agent.download import Downloader, UpdateRefused, verify_manifest
from flowfleet.agent.enroll import EnrollError, enroll, renew
from flowfleet.cli import main
from flowfleet.contract import Topics, parse_payload
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.authority import Authority, certificate_info
from flowfleet.provisioning.broker_files import refresh_crl
from flowfleet.provisioning.mosquitto import (
    Broker,
    BrokerSecurity,
    free_port,
    render_device_acl,
    write_password_file,
)

from .factories import count_bin

T = Topics()
REGISTRY_PW = "enroll-registry-pw-4c1d"
# A second registry identity (an ACL admin): publishes desired states in the update
# test as a compromised registry worker would, without taking the registry's session.
ADMIN_PW = "enroll-registry-1-pw-77e2"
CLIP_FRAMES = 40


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def flowfleet(*args: str, check: bool = True) -> Ran:
    """The `flowfleet` command line in this process (a Python start-up per operator
    command would cost a second or two each on a busy machine)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    ran = Ran(code, out.getvalue(), err.getvalue())
    if check:
        assert ran.returncode == 0, ran.stderr
    return ran


def flowfleet_process(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLOWFLEET_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "flowfleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@dataclass
class Fleet:
    root: Path
    ca: Authority
    broker: Broker
    db: str
    url: str
    registry_log: Path
    outputs: list[str] = field(default_factory=list)  # every CLI output, for the scan
    secrets: list[str] = field(default_factory=list)
    admin_token: str = ""

    def cli(self, *args: str, check: bool = True) -> Ran:
        proc = flowfleet(*args, check=check)
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def token(self, *extra: str) -> str:
        # stdout is the token itself (shown once, by design); stderr is scanned.
        out = flowfleet("provision", "tokens", "create", "--db", self.db, *extra)
        self.outputs.append(out.stderr)
        secret = out.stdout.strip()
        self.secrets.append(secret)
        return secret

    def admin(self) -> str:
        """An admin API token (made once)."""
        if not self.admin_token:
            flowfleet("registry", "users", "add", "root", "--role", "admin", "--db", self.db)
            made = flowfleet("registry", "tokens", "create", "root", "--db", self.db)
            self.outputs.append(made.stderr)  # stdout is the token itself, shown once
            self.admin_token = made.stdout.strip()
            self.secrets.append(self.admin_token)
        return self.admin_token

    def device_address(self, folder: Path) -> BrokerAddress:
        return BrokerAddress(
            "127.0.0.1",
            self.broker.tls_port,
            ca_file=str(folder / "ca.crt"),
            cert_file=str(folder / "device.crt"),
            key_file=str(folder / "device.key"),
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, videos: Path, int8_model: Path):
    root = tmp_path_factory.mktemp("enroll")
    ca = Authority.create(root / "ca")
    server, _ = ca.issue("broker", "broker", root / "server", hosts=("127.0.0.1",))
    # The registry generates the password file and the ACL from its device records
    # ([enrollment] broker_auth); the operator keeps only the registry's own line.
    files = root / "broker-files"
    files.mkdir()
    base = write_password_file(
        root / "registry.passwd", {"registry": REGISTRY_PW, "registry-1": ADMIN_PW}
    )
    (files / "devices.passwd").write_bytes(base.read_bytes())
    (files / "devices.acl").write_text(render_device_acl([], admins=("registry", "registry-1")))
    security = BrokerSecurity(
        password_file=files / "devices.passwd",
        acl_file=files / "devices.acl",
        tls_port=free_port(),
        cafile=ca.ca.cert,
        certfile=server.cert,
        keyfile=server.key,
        require_certificate=True,
        use_identity_as_username=True,
        crlfile=files / "crl.pem",  # the copy the registry refreshes
        password_tls_port=free_port(),  # devices that cannot do client certificates
    )
    refresh_crl(ca, files, None)
    clip = root / "clip"
    clip.mkdir()
    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    try:
        for i in range(CLIP_FRAMES):
            ok, image = cap.read()
            assert ok, f"the person video ended at frame {i}"
            cv2.imwrite(str(clip / f"{i:05d}.jpg"), image)
    finally:
        cap.release()
    (root / "template.toml").write_text(
        f'state_dir = "{root / "agent-state"}"\nbin_seconds = 1\nhealth_seconds = 1\n\n'
        f'[[cameras]]\nname = "table"\nsource = "{clip}"\nmodel = "{int8_model}"\n'
        'realtime = false\nloop = false\nclasses = ["person"]\n'
        '[[cameras.lines]]\nname = "approach"\npoints = [[768, 415], [0, 415]]\n'
    )
    pw = root / "registry.pw"
    pw.write_text(REGISTRY_PW + "\n")
    pw.chmod(0o600)
    db = str(root / "registry.sqlite")
    port = free_port()
    with Broker(root / "broker", security=security) as broker:
        (root / "broker.pid").write_text(f"{broker.proc.pid}\n")
        (root / "registry.toml").write_text(
            f'[database]\nurl = "{db}"\n[http]\nport = {port}\nthreads = 4\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "registry"\n'
            f'password_file = "{pw}"\n'
            f'[enrollment]\nca_dir = "{ca.folder}"\nbroker_host = "127.0.0.1"\n'
            f"broker_port = {broker.tls_port}\ncert_days = 10\n"
            f'broker_dir = "{files}"\nbroker_pidfile = "{root / "broker.pid"}"\n'
            f'broker_auth = true\nbroker_password_base = "{base}"\n'
            'broker_admins = ["registry", "registry-1"]\n'
            f"broker_password_port = {security.password_tls_port}\n"
        )
        log = root / "registry.log"
        conf = root / "registry.toml"
        env = {k: v for k, v in os.environ.items() if k != "FLOWFLEET_DATABASE_URL"}
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowfleet.cli", "registry", "--config", str(conf)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        url = f"http://127.0.0.1:{port}"
        try:

            def ready():
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    return get(url + "/healthz")["ingest"]["connected"]
                except OSError:
                    return False

            wait_for(ready, 30, "the registry")
            yield Fleet(root, ca, broker, db, url, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def devices(fleet: Fleet) -> dict[str, dict]:
    return {d["device"]: d for d in get(fleet.url + "/api/devices")["devices"]}


def as_device(fleet: Fleet, token: str, path: str) -> int:
    req = urllib.request.Request(fleet.url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


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


def refused(address: BrokerAddress) -> bool:
    conn = MqttConnection("ignored", address)
    conn.start()
    try:
        return not conn.wait_connected(2)
    finally:
        conn.stop()


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
    # The operator's command regenerates the same files: nothing to change.
    conf = str(fleet.root / "registry.toml")
    done = json.loads(fleet.cli("provision", "broker-sync", "--config", conf, "--json").stdout)
    assert done == {"changed": [], "reloaded": False}


def api(fleet: Fleet, method: str, path: str, body: dict | None = None) -> dict:
    """An admin's call to the registry's API."""
    headers = {"Authorization": f"Bearer {fleet.admin()}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(fleet.url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_an_enrolled_agent_refuses_tampered_updates_and_applies_a_good_one(
    fleet: Fleet, int8_model: Path
):
    """The enrolled agent, as its own process on its mTLS identity, receives desired
    states for an artifact with a flipped byte, one signed by another key and a
    downgrade to a version not deployed to it: it refuses each, keeps counting with
    its current model and reports why; then a good deployment is applied."""
    from flowfleet.contract import Desired
    from tests.test_agent_update import ref_of

    template = fleet.root / "template-u.toml"
    template.write_text(
        (fleet.root / "template.toml")
        .read_text()
        .replace("agent-state", "agent-u-state")
        .replace("loop = false", "loop = true")
        .replace("realtime = false", "realtime = true\nfps = 4")
    )
    folder = fleet.root / "cam-u"
    enroll(
        fleet.url, fleet.token("--auto-accept", "--agent-template", str(template)), "cam-u", folder
    )
    # The update gate's latency budget: generous on a shared, busy test machine.
    with (folder / "agent.toml").open("a") as fh:
        fh.write("gate_latency_factor = 20.0\n")
    people = {v["version"]: v for v in api(fleet, "GET", "/api/models/people/versions")["versions"]}
    assert {1, 2} <= set(people), "the models test before this one adds people v1 and v2"
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

    log = fleet.root / "agent-u.log"
    admin = MqttConnection(
        "ignored", BrokerAddress("127.0.0.1", fleet.broker.port, "registry-1", ADMIN_PW)
    )
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
    import datetime as dt

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
    template = fleet.root / "template-r.toml"
    template.write_text(
        (fleet.root / "template.toml")
        .read_text()
        .replace("agent-state", "agent-r-state")
        .replace("loop = false", "loop = true")
        .replace("realtime = false", "realtime = true\nfps = 4")
    )
    folder = fleet.root / "cam-r"
    token = fleet.token("--auto-accept", "--agent-template", str(template))
    enroll(fleet.url, token, "cam-r", folder)
    old = short_lived(fleet, folder / "device.crt", 45)
    log = fleet.root / "agent-r.log"
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
        wait_for(lambda: devices(fleet)["cam-r"]["bins"] >= 1, 40, "cam-r's first bin")
        assert certificate_info(folder / "device.crt")["serial"] == old["serial"]
        renewed = wait_for(
            lambda: (
                (info := certificate_info(folder / "device.crt"))["serial"] != old["serial"]
                and info
            ),
            60,
            "the agent to renew its certificate",
        )
        # Renewed before expiry, with the registry's lifetime (10 days here).
        assert renewed["not_after"] - time.time() > 9 * 86400
        assert time.time() < old["not_after"]
        wait_for(lambda: time.time() > old["not_after"] + 1, 60, "the old certificate to expire")
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
    keys = [p.read_text() for p in fleet.root.glob("**/device.key")]
    assert keys and fleet.secrets
    body = [k.split("-----")[2].strip() for k in keys]
    logs = [
        fleet.registry_log.read_text(),
        (fleet.root / "broker" / "mosquitto.log").read_text(),
        *fleet.outputs,
    ]
    for text in logs:
        for secret in [*fleet.secrets, REGISTRY_PW, ADMIN_PW, *body]:
            assert secret not in text
