"""`flowfleet provision` (CA, certificates, device bundles) and `flowfleet agent install`
into a temporary root, through the command line in this process; the enrollment API's
access rules on a real registry app (SQLite)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from cryptography import x509

from flowfleet.cli import main
from flowfleet.provisioning.authority import Authority, make_csr, make_device_key, revoked_serials


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    code, out, _ = run("provision", "ca", "create", str(tmp_path / "ca"), "--json")
    assert code == 0
    assert "offline" in json.loads(out)["advice"]
    return tmp_path / "ca"


def test_ca_create_refuses_to_overwrite_and_keeps_the_key_private(ca: Path):
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ca.stat().st_mode & 0o777 == 0o700
    before = (ca / "ca.key").read_bytes()
    code, _, err = run("provision", "ca", "create", str(ca))
    assert code == 2 and "already holds a CA" in err
    assert (ca / "ca.key").read_bytes() == before


def test_issue_list_revoke_with_json_and_exit_codes(ca: Path, tmp_path: Path):
    code, out, _ = run("provision", "cert", "issue", "device", "cam-1", "--ca", str(ca), "--json")
    assert code == 0
    dev = json.loads(out)
    assert dev["cn"] == "cam-1" and Path(dev["key"]).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(Path(dev["cert"]).read_bytes())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 30  # short-lived by default (plus the 5 minutes of clock slack)
    code, out, _ = run(
        "provision", "cert", "issue", "broker", "broker", "--ca", str(ca),
        "--host", "broker.example", "--host", "10.0.0.5", "--out", str(tmp_path / "srv"),
    )  # fmt: skip
    assert code == 0 and (tmp_path / "srv" / "broker.crt").is_file()
    # Bad input: named, exit 2, nothing issued.
    for args, why in (
        (("device", "registry"), "reserved"),
        (("device", "cam/1"), "cam/1"),
        (("broker", "b2"), "--host"),
    ):
        code, _, err = run("provision", "cert", "issue", *args, "--ca", str(ca))
        assert code == 2 and why in err
    code, _, err = run("provision", "cert", "issue", "device", "x", "--ca", str(tmp_path / "no"))
    assert code == 2 and "no CA" in err
    assert len(Authority(ca).records()) == 2

    code, out, _ = run("provision", "cert", "list", "--ca", str(ca), "--json")
    listed = {c["cn"]: c for c in json.loads(out)["certificates"]}
    assert listed["cam-1"]["state"] == "valid" and listed["broker"]["days_left"] > 396
    code, out, _ = run("provision", "cert", "list", "--ca", str(ca), "--expiring", "60")
    assert "cam-1" in out and "broker" not in out

    code, out, _ = run("provision", "cert", "revoke", "cam-1", "--ca", str(ca), "--json")
    assert code == 0
    assert int(dev["serial"], 16) in revoked_serials(ca / "crl.pem")
    code, _, err = run("provision", "cert", "revoke", "cam-1", "--ca", str(ca))
    assert code == 2 and "no unrevoked certificate" in err
    code, _, err = run("provision", "cert", "revoke", "--serial", "zz", "--ca", str(ca))
    assert code == 2 and "hexadecimal" in err


def test_a_csr_must_name_the_device_it_enrolls(ca: Path, tmp_path: Path):
    auth = Authority(ca)
    key = make_device_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    pem = auth.sign_csr(make_csr(key, "cam-9"), "cam-9")
    assert b"BEGIN CERTIFICATE" in pem
    with pytest.raises(ValueError, match="device id 'cam-8'"):
        auth.sign_csr(make_csr(key, "cam-9"), "cam-8")
    with pytest.raises(ValueError, match="not a PEM"):
        auth.sign_csr(b"junk", "cam-9")


TEMPLATE = """\
state_dir = "/var/lib/flowfleet"

[[cameras]]
name = "door"
source = "/dev/video97"
model = "/var/lib/flowfleet/models/m.tflite"
"""


def test_device_bundle_installs_under_a_root_idempotently(ca: Path, tmp_path: Path):
    template = tmp_path / "template.toml"
    template.write_text(TEMPLATE)
    bundle = tmp_path / "lobby-cam.tar.gz"
    db = tmp_path / "reg.sqlite"
    code, _, err = run(
        "provision", "device", "lobby-cam", "--ca", str(ca), "--broker", "broker.local:8883",
        "--group", "lobby", "--location", "52.52,13.40", "--template", str(template),
        "--out", str(bundle), "--db", str(db),
    )  # fmt: skip
    assert code == 0, err
    assert bundle.stat().st_mode & 0o777 == 0o600
    with tarfile.open(bundle) as tar:
        assert {m.name for m in tar.getmembers()} >= {"agent.toml", "device.key", "ca.crt"}
    code, out, _ = run("registry", "groups", "list", "--db", str(db))
    assert "lobby" in out and "lobby-cam" in out
    code, _, err = run(
        "provision", "device", "lobby-cam", "--ca", str(ca), "--broker", "b:1", "--db", str(db)
    )
    assert code == 1 and "already known" in err  # a conflict, as in `registry devices`
    code, _, err = run("provision", "device", "x", "--ca", str(ca), "--broker", "nope")
    assert code == 2 and "HOST:PORT" in err

    root = tmp_path / "root"
    code, out, _ = run("agent", "install", str(bundle), "--root", str(root), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["changed"]
    assert not root.exists()  # --dry-run changed nothing
    code, out, _ = run("agent", "install", str(bundle), "--root", str(root), "--json")
    plan = json.loads(out)
    assert code == 0 and plan["changed"]
    etc = root / "etc" / "flowfleet"
    assert (etc / "device.key").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/systemd/system/flowfleet-agent.service").is_file()
    skipped = {s["what"] for s in plan["steps"] if s["state"] == "skipped"}
    assert any("system user" in s for s in skipped) and any("systemctl" in s for s in skipped)
    code, out, _ = run("agent", "check-config", "--config", str(etc / "agent.toml"))
    assert code == 0 and "device lobby-cam" in out
    # Twice: nothing changes.
    code, out, _ = run("agent", "install", str(bundle), "--root", str(root), "--json")
    assert not json.loads(out)["changed"]
    os.chmod(etc / "device.key", 0o644)
    code, out, _ = run("agent", "install", str(bundle), "--root", str(root), "--dry-run")
    assert "would" in out and "device.key" in out
    assert (etc / "device.key").stat().st_mode & 0o777 == 0o644


def test_install_refuses_a_bundle_with_foreign_members(tmp_path: Path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../etc/passwd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    code, _, err = run("agent", "install", str(evil), "--root", str(tmp_path / "r"))
    assert code == 2 and "unexpected member '../etc/passwd'" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_enrollment_endpoints_need_the_right_role(tmp_path: Path, ca: Path, kind: str):
    from flowfleet.registry.fleet.enrollment import EnrollmentSettings
    from flowfleet.registry.http import auth
    from flowfleet.registry.http.web import create_app
    from flowfleet.registry.testing import fresh_registry, temporary_database

    with temporary_database(kind, tmp_path) as url:
        reg = fresh_registry(url, tmp_path)
        settings = EnrollmentSettings(ca, "127.0.0.1", 8883)
        app = create_app(reg.db, registry=reg, enrollment=settings)
        with reg.db.connection_context():
            auth.create_user("ops", "operator", actor="test")
            auth.create_user("root", "admin", actor="test")
            op, _ = auth.create_token("ops", actor="test")
            admin, _ = auth.create_token("root", actor="test")
        client = app.test_client()
        body = {"max_uses": 2, "group": "lobby", "ttl_s": 600}
        assert client.post("/api/enrollment-tokens", json=body).status_code == 401
        h = {"Authorization": f"Bearer {op}"}
        assert client.post("/api/enrollment-tokens", json=body, headers=h).status_code == 403
        assert client.get("/api/enrollment-tokens", headers=h).status_code == 200
        assert client.post("/api/devices/cam-1/reenroll", headers=h).status_code == 403
        h = {"Authorization": f"Bearer {admin}"}
        resp = client.post("/api/enrollment-tokens", json=body, headers=h)
        assert resp.status_code == 201
        secret, token_id = resp.json["token"], resp.json["id"]
        bad = client.post("/api/enrollment-tokens", json={"max_uses": 0}, headers=h)
        assert bad.status_code == 400 and bad.json["error"]["field"] == "max_uses"
        tmpl = client.post(
            "/api/enrollment-tokens", json={"agent_template": 'device_id = "x"'}, headers=h
        )
        assert tmpl.status_code == 400 and "device_id" in tmpl.json["error"]["message"]
        listed = client.get("/api/enrollment-tokens", headers=h).json["tokens"]
        assert [t["state"] for t in listed] == ["active"] and secret not in json.dumps(listed)

        key = make_device_key(tmp_path / "dev.key")
        claim = {"token": secret, "device": "cam-1", "csr": make_csr(key, "cam-1").decode()}
        wrong = client.post("/api/enroll", json={**claim, "device": "cam-2"})
        assert wrong.status_code == 400 and wrong.json["error"]["field"] == "csr"
        ok = client.post("/api/enroll", json=claim)  # no Authorization: the token is it
        assert ok.status_code == 201, ok.json
        assert ok.json["registration"] == "unregistered"
        assert "port = 8883" in ok.json["agent_config"]
        revoked = client.post(f"/api/enrollment-tokens/{token_id}/revoke", headers=h)
        assert revoked.json["state"] == "revoked"
        again = client.post("/api/enroll", json={**claim, "device": "cam-3"})
        assert again.status_code == 401
        # The device token it was given is a device token for cam-1 only.
        h = {"Authorization": f"Bearer {ok.json['device_token']}"}
        assert client.get("/api/devices/cam-1/deployments", headers=h).status_code == 200
        assert client.get("/api/devices/cam-2/deployments", headers=h).status_code == 403
        listed = client.get("/api/enrollment-tokens", headers={"Authorization": f"Bearer {admin}"})
        assert listed.json["tokens"][0]["devices"] == ["cam-1"]


def test_enroll_and_renew_are_rate_limited_per_address_and_per_token(tmp_path: Path, ca: Path):
    from flowfleet.registry.fleet.enrollment import EnrollmentSettings
    from flowfleet.registry.http import auth
    from flowfleet.registry.http.web import create_app
    from flowfleet.registry.store.db import AuditEntry
    from flowfleet.registry.testing import fresh_registry, temporary_database

    with temporary_database("sqlite", tmp_path) as url:
        reg = fresh_registry(url, tmp_path)
        settings = EnrollmentSettings(
            ca,
            "127.0.0.1",
            8883,
            rate_limit_window_s=60,
            rate_limit_per_address=3,
            rate_limit_per_token=2,
        )
        app = create_app(reg.db, registry=reg, enrollment=settings)
        with reg.db.connection_context():
            auth.create_user("root", "admin", actor="test")
            admin, _ = auth.create_token("root", actor="test")
        client = app.test_client()
        h = {"Authorization": f"Bearer {admin}"}
        secret = client.post("/api/enrollment-tokens", json={"max_uses": 5}, headers=h).json[
            "token"
        ]
        key = make_device_key(tmp_path / "dev.key")
        bad = {"token": secret, "device": "cam-1", "csr": make_csr(key, "cam-2").decode()}

        def post(path: str, body: dict, addr: str):
            return client.post(path, json=body, environ_base={"REMOTE_ADDR": addr})

        # Per token: two attempts (both refused for their CSR), then 429 from any address.
        assert [post("/api/enroll", bad, "10.0.0.1").status_code for _ in range(2)] == [400] * 2
        limited = post("/api/enroll", bad, "10.0.0.9")
        assert limited.status_code == 429 and limited.json["error"]["code"] == "rate_limited"
        assert "from this token" in limited.json["error"]["message"]
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        # Refused before the token was looked at: even a good claim changes nothing.
        good = {**bad, "csr": make_csr(key, "cam-1").decode()}
        assert post("/api/enroll", good, "10.0.0.9").status_code == 429
        listed = client.get("/api/enrollment-tokens", headers=h).json["tokens"]
        assert listed[0]["uses"] == 0 and listed[0]["devices"] == []

        # Per source address: three attempts with different (unknown) tokens, then 429,
        # for renewals from that address too; another address is not affected.
        for i in range(3):
            body = {**good, "token": f"ffe_unknown-{i}"}
            assert post("/api/enroll", body, "10.0.0.2").status_code == 401
        over = post("/api/enroll", {**good, "token": "ffe_unknown-9"}, "10.0.0.2")
        assert over.status_code == 429 and "source address" in over.json["error"]["message"]
        renewal = {"certificate": "x", "csr": "y"}
        assert post("/api/renew", renewal, "10.0.0.2").status_code == 429
        assert post("/api/renew", renewal, "10.0.0.3").status_code == 401

        # Audited once per key and window, never with the secret.
        with reg.db.connection_context():
            entries = list(
                AuditEntry.select().where(AuditEntry.action == "enrollment.rate_limited")
            )
            dump = json.dumps([(e.actor, e.target, e.details) for e in entries])
        assert sorted(e.target.split(":")[0] for e in entries) == ["address", "credential"]
        assert secret not in dump and "ffe_unknown" not in dump


def test_broker_files_follow_the_device_records_under_each_policy(tmp_path: Path, ca: Path):
    """What `broker_auth` writes: registered, unregistered, revoked and password
    devices under broker_acl "known" and "accepted"; rewritten only on a change."""
    from dataclasses import replace

    from flowfleet.provisioning.mosquitto import hash_password
    from flowfleet.registry.fleet import broker_auth
    from flowfleet.registry.fleet.devices import accept_device, create_device
    from flowfleet.registry.fleet.enrollment import EnrollmentSettings
    from flowfleet.registry.store.db import Device
    from flowfleet.registry.testing import fresh_registry, temporary_database

    base = tmp_path / "base.passwd"
    base.write_text(f"registry:{hash_password('pw')}")  # no newline: one is added
    folder = tmp_path / "broker"
    folder.mkdir()
    known = EnrollmentSettings(
        ca, "b", 8883, broker_dir=folder, broker_auth=True, broker_password_base=base
    )
    with temporary_database("sqlite", tmp_path) as url:
        reg = fresh_registry(url, tmp_path)
        with reg.db.connection_context():
            create_device(reg.db, "cam-1", {}, actor="test")  # registered
            Device.insert(id="cam-2", first_seen=0, state="unknown").execute()  # not yet
            create_device(reg.db, "cam-3", {}, actor="test")
            secret = broker_auth.issue_password("cam-3", actor="test")
            create_device(reg.db, "cam-4", {}, actor="test")
            broker_auth.revoke_access("cam-4", actor="test")
            first = broker_auth.sync(known)
            assert first == {"changed": ["devices.passwd", "devices.acl"], "reloaded": False}
            acl = (folder / "devices.acl").read_text()
            users = [ln.split()[1] for ln in acl.splitlines() if ln.startswith("user ")]
            assert users == ["registry", "cam-1", "cam-2", "cam-3"]  # not the revoked cam-4
            assert "pattern" not in acl
            passwd = (folder / "devices.passwd").read_text().splitlines()
            assert [ln.split(":")[0] for ln in passwd] == ["registry", "cam-3"]
            assert secret not in "".join(passwd) and passwd[1].startswith("cam-3:$7$")
            assert broker_auth.sync(known) == {"changed": [], "reloaded": False}
            # "accepted": only registered devices; accepting one grants it.
            accepted = replace(known, broker_acl="accepted")
            assert broker_auth.sync(accepted)["changed"] == ["devices.acl"]
            assert "user cam-2" not in (folder / "devices.acl").read_text()
            accept_device(reg.db, "cam-2", actor="test")
            assert broker_auth.sync(accepted)["changed"] == ["devices.acl"]
            assert "user cam-2" in (folder / "devices.acl").read_text()
            # Revoking a password device takes it out of both files.
            assert broker_auth.revoke_access("cam-3", actor="test") is True
            assert broker_auth.sync(accepted)["changed"] == ["devices.passwd", "devices.acl"]
            assert "cam-3" not in (folder / "devices.passwd").read_text()
            with pytest.raises(ValueError, match="broker_acl"):
                broker_auth.granted("everyone")


def test_broker_config_is_idempotent_and_a_revocation_changes_only_the_crl(
    ca: Path, tmp_path: Path
):
    out_dir = tmp_path / "mosq"
    args = ("provision", "broker-config", "--ca", str(ca), "--out", str(out_dir), "--json")
    code, out, err = run(*args, "--host", "127.0.0.1", "--tls-port", "18883")
    assert code == 0, err
    assert set(json.loads(out)["changed"]) >= {"flowfleet.conf", "acl", "crl.pem", "broker.key"}
    conf = (out_dir / "flowfleet.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "crlfile "):
        assert line in conf
    assert "allow_anonymous false" in conf and "user root" not in conf
    code, out, _ = run(*args, "--tls-port", "18883")
    assert json.loads(out)["changed"] == []
    run("provision", "cert", "issue", "device", "cam-1", "--ca", str(ca))
    run("provision", "cert", "revoke", "cam-1", "--ca", str(ca))
    code, out, _ = run(*args, "--tls-port", "18883")
    assert json.loads(out)["changed"] == ["crl.pem"]
    code, _, err = run(*args, "--password-port", "1")
    assert code == 2 and "--password-port needs --password-file or --registry-auth" in err

    # --registry-auth: the registry's generated password file and ACL, made empty once
    # and never overwritten by broker-config (the registry rewrites them).
    reg_dir = tmp_path / "mosq-registry"
    reg = ("provision", "broker-config", "--ca", str(ca), "--out", str(reg_dir), "--json")
    reg += ("--host", "127.0.0.1", "--password-port", "18884", "--registry-auth")
    code, out, err = run(*reg)
    assert code == 0, err
    conf = (reg_dir / "flowfleet.conf").read_text()
    assert f"password_file {reg_dir.resolve() / 'devices.passwd'}" in conf
    assert f"acl_file {reg_dir.resolve() / 'devices.acl'}" in conf
    assert "listener 18884" in conf and not (reg_dir / "acl").exists()
    acl = (reg_dir / "devices.acl").read_text()
    assert "user registry" in acl and "pattern" not in acl  # no device until listed
    assert (reg_dir / "devices.passwd").read_text() == ""
    (reg_dir / "devices.acl").write_text(acl + "user cam-1\n")  # as the registry would
    code, out, _ = run(*reg)
    assert json.loads(out)["changed"] == []
    assert (reg_dir / "devices.acl").read_text().endswith("user cam-1\n")


def test_doctor_names_each_problem_with_its_fix(ca: Path, tmp_path: Path):
    from flowfleet.provisioning.mosquitto import free_port

    template = tmp_path / "template.toml"
    template.write_text(TEMPLATE.replace("/var/lib/flowfleet", str(tmp_path / "state")))
    bundle = tmp_path / "cam.tar.gz"
    port = free_port()  # nothing listens there
    code, _, err = run(
        "provision", "device", "cam-doc", "--ca", str(ca), "--broker", f"127.0.0.1:{port}",
        "--template", str(template), "--out", str(bundle), "--days", "3",
    )  # fmt: skip
    assert code == 0, err
    root = tmp_path / "root"
    assert run("agent", "install", str(bundle), "--root", str(root))[0] == 0
    config = root / "etc" / "flowfleet" / "agent.toml"
    os.chmod(config.parent / "device.key", 0o644)
    code, out, _ = run("doctor", "--config", str(config), "--timeout", "1", "--json")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["config"]["status"] == "ok"
    assert checks["certificate"]["status"] == "warn" and "renew" in checks["certificate"]["fix"]
    assert checks["key permissions"]["fix"].startswith("chmod 600")
    assert checks["broker"]["status"] == "fail" and "unreachable" in checks["broker"]["detail"]
    assert checks["model door"]["status"] == "fail" and checks["model door"]["fix"]
    assert checks["camera door"]["status"] == "fail"
    code, out, _ = run("doctor", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "fail  config" in out and "fix:" in out


INSTALL = Path(__file__).resolve().parent.parent / "provisioning" / "install"


def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = (
            os.readlink(path)
            if path.is_symlink()
            else (path.read_bytes() if path.is_file() else b"")
        )
        out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


@pytest.mark.parametrize(
    "script, args",
    [("install-device", ("--board", "pi")), ("install-device", ("--board", "jetson")),
     ("install-registry", ())],
)  # fmt: skip
def test_install_scripts_are_idempotent_and_dry_run_changes_nothing(tmp_path, script, args):
    import subprocess

    root = tmp_path / "root"
    root.mkdir()

    def install(*extra: str) -> str:
        proc = subprocess.run(
            ["bash", str(INSTALL / script), *args, "--root", str(root), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = install("--dry-run")
    assert "would" in out and "none made" in out
    assert tree(root) == {}
    out = install()
    assert "change(s) made" in out and "skipped   system user" in out
    unit = "flowfleet-agent" if script == "install-device" else "flowfleet-registry"
    assert (root / f"etc/systemd/system/{unit}.service").is_file()
    assert (root / "etc/flowfleet").stat().st_mode & 0o777 == 0o750
    first = tree(root)
    out = install()
    assert out.strip().endswith("nothing changed") and "done" not in out
    assert tree(root) == first
    bad = subprocess.run(
        ["bash", str(INSTALL / script), "--bogus"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_every_state_changing_endpoint_refuses_a_missing_token_and_a_low_role(
    tmp_path: Path, ca: Path
):
    """Walks the app's URL map: every POST, PUT, PATCH and DELETE outside the public
    endpoints (login, logout, a device's enrollment claim and renewal) answers 401
    without a token, 403 to a device token, and 403 to a viewer unless it needs no more."""
    from flowfleet.registry.fleet.enrollment import EnrollmentSettings
    from flowfleet.registry.http import auth
    from flowfleet.registry.http.access import PUBLIC_ENDPOINTS
    from flowfleet.registry.http.web import create_app
    from flowfleet.registry.testing import fresh_registry, temporary_database

    with temporary_database("sqlite", tmp_path) as url:
        reg = fresh_registry(url, tmp_path)
        app = create_app(reg.db, registry=reg, enrollment=EnrollmentSettings(ca, "127.0.0.1", 8883))
        with reg.db.connection_context():
            auth.create_user("v", "viewer", actor="test")
            viewer, _ = auth.create_token("v", actor="test")
            device, _ = auth.create_token("v", actor="test", device="cam-1")
        client = app.test_client()
        checked = []
        for rule in app.url_map.iter_rules():
            methods = (rule.methods or set()) & {"POST", "PUT", "PATCH", "DELETE"}
            if not methods or rule.endpoint in PUBLIC_ENDPOINTS:
                continue
            args = {
                a: 1 if type(rule._converters[a]).__name__ == "IntegerConverter" else "x1"
                for a in rule.arguments
            }
            path = rule.build(args, append_unknown=False)[1]
            needed = getattr(app.view_functions[rule.endpoint], "required_role", "admin")
            for method in sorted(methods):
                call = getattr(client, method.lower())
                assert call(path, json={}).status_code == 401, (method, path)
                h = {"Authorization": f"Bearer {device}"}
                assert call(path, json={}, headers=h).status_code == 403, (method, path)
                if needed != "viewer":
                    h = {"Authorization": f"Bearer {viewer}"}
                    assert call(path, json={}, headers=h).status_code == 403, (method, path)
                checked.append(f"{method} {rule.rule}")
        assert "POST /api/enrollment-tokens" in checked
        assert "POST /api/devices/<device>/revoke" in checked
        assert len(checked) >= 25  # the walk found the API (28 routes today)


def test_registry_enrollment_config_is_checked(tmp_path: Path, ca: Path):
    conf = tmp_path / "registry.toml"
    conf.write_text('[enrollment]\nca_dir = "ca"\n')
    code, _, err = run("registry", "check-config", "--config", str(conf))
    assert code == 2 and "enrollment: ca_dir needs broker_host" in err
    conf.write_text('[enrollment]\nca_dir = "no-ca"\nbroker_host = "b"\nbroker_prot = 1\n')
    code, _, err = run("registry", "check-config", "--config", str(conf))
    assert code == 2 and "broker_prot" in err
    conf.write_text('[enrollment]\nca_dir = "no-ca"\nbroker_host = "b"\n')
    code, _, err = run("registry", "check-config", "--config", str(conf))
    assert code == 2 and f"enrollment.ca_dir: file not found: {tmp_path / 'no-ca'}/ca.key" in err
    conf.write_text(f'[enrollment]\nca_dir = "{ca}"\nbroker_host = "b"\n')
    code, _, err = run("registry", "check-config", "--config", str(conf))
    assert code == 0, err
    # The broker's generated files: each setting is checked at load, naming the key.
    section = f'[enrollment]\nca_dir = "{ca}"\nbroker_host = "b"\n'
    for extra, problem in (
        ("broker_auth = true\n", "broker_auth needs broker_dir"),
        ("broker_password_port = 8884\n", "broker_password_port needs broker_auth"),
        ('broker_auth = true\nbroker_dir = "."\nbroker_admins = ["cam-1"]\n', "broker_admins"),
        ('broker_auth = true\nbroker_dir = "."\nbroker_acl = "all"\n', "broker_acl"),
        ("rate_limit_per_token = -1\n", "rate_limit_per_token"),
        (
            'broker_auth = true\nbroker_dir = "."\nbroker_password_base = "none.passwd"\n',
            f"enrollment.broker_password_base: file not found: {tmp_path / 'none.passwd'}",
        ),
    ):
        conf.write_text(section + extra)
        code, _, err = run("registry", "check-config", "--config", str(conf))
        assert code == 2 and problem in err, (extra, err)
    conf.write_text(section + 'broker_auth = true\nbroker_dir = "."\nbroker_acl = "accepted"\n')
    code, _, err = run("registry", "check-config", "--config", str(conf))
    assert code == 0, err


def test_doctor_checks_a_registry_host(tmp_path: Path, ca: Path):
    from flowfleet.provisioning.mosquitto import free_port

    conf = tmp_path / "registry.toml"
    conf.write_text(
        f'[database]\nurl = "{tmp_path / "reg.sqlite"}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[enrollment]\nca_dir = "{ca}"\nbroker_host = "b"\n'
    )
    assert run("provision", "cert", "crl", "--ca", str(ca))[0] == 0
    code, out, _ = run("doctor", "--registry-config", str(conf), "--timeout", "1", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1 and checks["broker"]["status"] == "fail"  # nothing listens there
    assert checks["fleet CA"]["status"] == "ok" and checks["CRL"]["status"] == "ok"
    assert checks["database"]["status"] == "warn"  # created at the registry's first start
    os.chmod(ca / "ca.key", 0o640)
    code, out, _ = run("doctor", "--registry-config", str(conf), "--timeout", "1")
    assert "fail  CA key: ca.key has mode 640" in out and "chmod 600" in out
