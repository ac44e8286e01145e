"""The enrollment tests' fleet: a real Mosquitto with the generated config (mTLS
listener with the fleet CA's CRL, a password-over-TLS listener, the password file and
ACL the registry generates from its device records), the real registry process
(`flowfleet registry --config`) with an ``[enrollment]`` section, and helpers to run
the `flowfleet` commands an operator or a device runs. Used by `test_enrollment`
and `test_enrollment_agent`, each with one module-scoped fleet.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from flowfleet.cli import main
from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.authority import Authority
from flowfleet.provisioning.broker_files import refresh_crl
from flowfleet.provisioning.mosquitto import (
    Broker,
    BrokerSecurity,
    free_port,
    render_device_acl,
    write_password_file,
)

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


@contextlib.contextmanager
def running_fleet(root: Path, videos: Path, int8_model: Path):
    """A broker and a registry as in the module docstring, under ``root``."""
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


def refused(address: BrokerAddress) -> bool:
    conn = MqttConnection("ignored", address)
    conn.start()
    try:
        return not conn.wait_connected(2)
    finally:
        conn.stop()


def api(fleet: Fleet, method: str, path: str, body: dict | None = None) -> dict:
    """An admin's call to the registry's API."""
    headers = {"Authorization": f"Bearer {fleet.admin()}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(fleet.url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def agent_template(fleet: Fleet, name: str) -> Path:
    """The fleet's agent template with its own state folder, looping in real time
    (an agent that keeps counting until it is stopped)."""
    template = fleet.root / f"template-{name}.toml"
    template.write_text(
        (fleet.root / "template.toml")
        .read_text()
        .replace("agent-state", f"agent-{name}-state")
        .replace("loop = false", "loop = true")
        .replace("realtime = false", "realtime = true\nfps = 4")
    )
    return template


def assert_no_secrets_in_logs(fleet: Fleet) -> None:
    """Neither the tokens, passwords and device keys the tests used, nor the
    registry's passwords, appear in any log or command output the tests captured."""
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
