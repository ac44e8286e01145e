"""`flowfleet doctor`: is this device ready to count? Each check says how to fix it.

Checks, in order (later ones need the config): the agent config; the device
certificate (expiry, key mode 0600, issued by the configured CA); the broker (TCP
reachable, then accepts the device's identity); the clock (against the registry's HTTP
``Date`` when a registry URL is known: TLS certificates and count bins need it right);
disk space of the state folder; each camera's model file (present, a known runtime
format) and the registry's public keys (needed to verify model signatures); each
camera's source (a video device readable by this user, a file or folder that exists,
an RTSP host that answers).

Results are ``ok``, ``warn`` or ``fail``; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

CERT_WARN_DAYS = 7
SKEW_FAIL_S = 60.0
DISK_WARN_BYTES = 1 << 30


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_checks(
    config_path: str | Path, *, registry_url: str | None = None, timeout: float = 5.0
) -> list[Check]:
    """Every check for the agent config at ``config_path``."""
    from flowfleet.agent.config import ConfigError, load_agent_config

    try:
        config = load_agent_config(config_path)
    except ConfigError as exc:
        return [
            Check(
                "config",
                "fail",
                str(exc),
                f"edit {config_path}; validate with: flowfleet agent check-config "
                f"--config {config_path}",
            )
        ]
    checks = [Check("config", "ok", f"{config_path}: device {config.device_id}")]
    checks += _certificate(config)
    checks.append(_broker(config, timeout))
    checks.append(_clock(registry_url or config.registry.url, timeout))
    checks.append(_disk(config.state_dir))
    checks += _models(config)
    checks += [_camera(cam) for cam in config.cameras]
    return checks


def _certificate(config) -> list[Check]:
    from cryptography import x509

    b = config.broker
    if not b.cert_file:
        how = "password" if b.username else "none"
        return [Check("certificate", "ok", f"no client certificate (broker login: {how})")]
    out = []
    try:
        cert = x509.load_pem_x509_certificate(Path(b.cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        return [Check("certificate", "fail", f"{b.cert_file}: {exc}", "enroll again")]
    left = (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds()
    renew = (
        "flowfleet agent renew --registry URL (while it is valid); once expired or "
        "revoked: flowfleet agent enroll --force with a token, after 'flowfleet "
        "provision tokens allow-reenroll DEVICE'"
    )
    if left <= 0:
        out.append(Check("certificate", "fail", f"{b.cert_file} expired", renew))
    elif left < CERT_WARN_DAYS * 86400:
        out.append(Check("certificate", "warn", f"expires in {left / 86400:.1f} days", renew))
    else:
        out.append(Check("certificate", "ok", f"valid for {left / 86400:.0f} more days"))
    if b.ca_file:
        try:
            ca = x509.load_pem_x509_certificate(Path(b.ca_file).read_bytes())
            cert.verify_directly_issued_by(ca)
        except Exception as exc:
            out.append(
                Check(
                    "certificate issuer",
                    "fail",
                    f"{b.cert_file} is not issued by {b.ca_file}: {exc}",
                    "use the fleet CA's ca.crt and a certificate it issued",
                )
            )
    if b.key_file and Path(b.key_file).is_file():
        mode = Path(b.key_file).stat().st_mode & 0o777
        if mode & 0o077:
            out.append(
                Check(
                    "key permissions",
                    "fail",
                    f"{b.key_file} has mode {mode:o}: others can read the device's key",
                    f"chmod 600 {b.key_file}",
                )
            )
    return out


def _broker(config, timeout: float) -> Check:
    from flowfleet.agent.config import read_password
    from flowfleet.mqtt import BrokerAddress, MqttConnection

    b = config.broker
    try:
        socket.create_connection((b.host, b.port), timeout).close()
    except OSError as exc:
        return Check(
            "broker",
            "fail",
            f"{b.host}:{b.port} unreachable: {exc}",
            "check broker.host/port, the network and the firewall (TLS listener 8883)",
        )
    reasons: list[str] = []
    address = BrokerAddress(
        b.host, b.port, b.username, read_password(b), b.ca_file, b.cert_file, b.key_file
    )
    conn = MqttConnection(
        f"doctor-{config.device_id}",
        address,
        on_connect_refused=lambda reason, code=None: reasons.append(str(reason)),
    )
    conn.start()
    try:
        ok = conn.wait_connected(timeout)
    finally:
        conn.stop()
    if ok:
        return Check("broker", "ok", f"{b.host}:{b.port} accepted device {config.device_id}")
    why = reasons[0] if reasons else "no answer (TLS handshake refused or timed out)"
    return Check(
        "broker",
        "fail",
        f"{b.host}:{b.port} refused the device: {why}",
        "a revoked or foreign certificate, or a wrong password: enroll again, or ask an "
        "operator (flowfleet provision cert list)",
    )


def _clock(registry_url: str | None, timeout: float) -> Check:
    if not registry_url:
        return Check(
            "clock",
            "warn",
            "no registry URL to compare with (--registry URL)",
            "keep NTP on: timedatectl set-ntp true",
        )
    try:
        with urllib.request.urlopen(registry_url.rstrip("/") + "/healthz", timeout=timeout) as r:
            date = r.headers.get("Date")
    except urllib.error.HTTPError as exc:
        date = exc.headers.get("Date")
    except (OSError, ValueError) as exc:
        return Check("clock", "warn", f"registry {registry_url} unreachable: {exc}", "")
    if not date:
        return Check("clock", "warn", "the registry sent no Date header", "")
    skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
    if abs(skew) > SKEW_FAIL_S:
        return Check(
            "clock",
            "fail",
            f"{skew:+.0f} s off the registry's clock",
            "timedatectl set-ntp true (certificates and count bins need the right time)",
        )
    return Check("clock", "ok", f"{skew:+.1f} s off the registry's clock (HTTP Date, 1 s)")


def _disk(state_dir: str) -> Check:
    path = Path(state_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    free = usage.free
    text = f"{free / (1 << 30):.1f} GiB free under {state_dir}"
    if free < DISK_WARN_BYTES or free < usage.total * 0.05:
        return Check("disk", "warn", text, "free space: the outbox grows while offline")
    return Check("disk", "ok", text)


def _models(config) -> list[Check]:
    from flowfleet.agent.detectors import sniff_runtime

    out = []
    for cam in config.cameras:
        path = Path(cam.model)
        try:
            with open(path, "rb") as fh:
                runtime = sniff_runtime(fh.read(64))
        except OSError as exc:
            out.append(
                Check(
                    f"model {cam.name}",
                    "fail",
                    f"{path}: {exc.strerror}",
                    "flowfleet models fetch, or deploy one from the registry",
                )
            )
            continue
        if runtime is None:
            out.append(Check(f"model {cam.name}", "fail", f"{path}: not a known model format", ""))
        else:
            out.append(Check(f"model {cam.name}", "ok", f"{path} ({runtime})"))
    keys = config.registry.keys_file or str(Path(config.broker.ca_file or ".").parent / "keys.json")
    if config.registry.url or Path(keys).is_file():
        from flowfleet.signing import load_bundle

        try:
            n = len(load_bundle(Path(keys)))
            out.append(Check("signing keys", "ok", f"{n} registry key(s) in {keys}"))
        except Exception as exc:
            out.append(
                Check(
                    "signing keys",
                    "fail",
                    f"{keys}: {exc}",
                    "flowfleet registry keys export > keys.json (model updates are refused "
                    "without it)",
                )
            )
    return out


def _camera(cam) -> Check:
    source = str(cam.source)
    name = f"camera {cam.name}"
    if source.isdigit() or source.startswith("/dev/video"):
        dev = source if source.startswith("/dev/") else f"/dev/video{source}"
        if not os.path.exists(dev):
            return Check(
                name, "fail", f"{dev} does not exist", "plug the camera in; ls /dev/video*"
            )
        if not os.access(dev, os.R_OK | os.W_OK):
            return Check(
                name, "fail", f"{dev}: no access for this user", "usermod -aG video flowfleet"
            )
        return Check(name, "ok", f"{dev} accessible")
    if "://" in source:
        url = urlparse(source)
        port = url.port or {"rtsp": 554, "http": 80, "https": 443}.get(url.scheme, 554)
        try:
            socket.create_connection((url.hostname, port), 3).close()
        except OSError as exc:
            return Check(name, "fail", f"{url.hostname}:{port}: {exc}", "check the stream URL")
        return Check(name, "ok", f"{url.hostname}:{port} answers")
    if Path(source).exists():
        return Check(name, "ok", f"{source} exists")
    return Check(name, "fail", f"{source} does not exist", "fix cameras.source")


# -- `flowfleet doctor` ---------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a device: config, certificate, broker, clock, disk, models, cameras",
        description="Each check prints ok, warn or fail with how to fix it; exit status 1 "
        "when a check failed.",
    )
    p.add_argument("--config", default="/etc/flowfleet/agent.toml", help="agent TOML file")
    p.add_argument("--registry", metavar="URL", help="registry to compare the clock with")
    p.add_argument(
        "--registry-config",
        metavar="FILE",
        help="check a registry host instead (its registry.toml)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="per network check (default 5 s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    import json
    import sys

    if args.registry_config:
        from flowfleet.registry.doctor import run_registry_checks

        checks = run_registry_checks(args.registry_config, timeout=args.timeout)
    else:
        checks = run_checks(args.config, registry_url=args.registry, timeout=args.timeout)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        json.dump({"ok": not failed, "checks": [c.to_dict() for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for c in checks:
            print(f"{c.status:<4}  {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                print(f"      fix: {c.fix}")
    return 1 if failed else 0
