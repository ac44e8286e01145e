"""`flowfleet doctor --registry-config FILE`: checks of a registry host, each with its fix.

The config (as ``registry check-config``), the database (reachable; never migrated
from here), the broker (TCP only: logging in as the registry's identity would take
over the running registry's session), the fleet CA of ``[enrollment]`` (expiry, key
mode, CRL not expired) and free disk beside the database. Results use the device
doctor's `Check` (`flowfleet.agent.doctor`).
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
from pathlib import Path

from flowfleet.agent.doctor import DISK_WARN_BYTES, Check

CA_WARN_DAYS = 60
CRL_WARN_DAYS = 30


def run_registry_checks(config_path: str | Path, *, timeout: float = 5.0) -> list[Check]:
    from flowfleet.registry.config import ConfigError, load_registry_config

    try:
        settings = load_registry_config(config_path)
    except ConfigError as exc:
        return [
            Check(
                "config",
                "fail",
                str(exc),
                f"edit {config_path}; flowfleet registry check-config --config {config_path}",
            )
        ]
    checks = [Check("config", "ok", str(config_path))]
    checks.append(_database(settings.database.url, timeout))
    checks.append(_broker(settings.broker.host, settings.broker.port, timeout))
    if settings.enrollment.ca_dir:
        checks += _ca(Path(settings.enrollment.ca_dir))
    checks.append(_disk(settings.database.url))
    return checks


def _database(url: str | None, timeout: float) -> Check:
    from flowfleet.registry.store.db import postgres_params, redact_url

    if url and url.startswith(("postgres://", "postgresql://")):
        params = postgres_params(url)
        host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
        try:
            socket.create_connection((host, port), timeout).close()
        except OSError as exc:
            return Check(
                "database", "fail", f"{redact_url(url)}: {exc}", "start PostgreSQL, check the URL"
            )
        return Check("database", "ok", f"{redact_url(url)} reachable")
    path = Path((url or "flowfleet-registry.sqlite").removeprefix("sqlite:///"))
    if not path.exists():
        return Check(
            "database", "warn", f"{path} does not exist yet", "the registry creates it at start"
        )
    return Check("database", "ok", f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


def _broker(host: str, port: int, timeout: float) -> Check:
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as exc:
        return Check(
            "broker",
            "fail",
            f"{host}:{port} unreachable: {exc}",
            "start the broker (systemctl status mosquitto); check broker.host/port",
        )
    return Check("broker", "ok", f"{host}:{port} reachable (not logged in: see the docstring)")


def _ca(folder: Path) -> list[Check]:
    from cryptography import x509

    now = dt.datetime.now(dt.timezone.utc)
    out = []
    try:
        ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        crl = x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())
    except (OSError, ValueError) as exc:
        return [Check("fleet CA", "fail", f"{folder}: {exc}", "flowfleet provision ca create")]
    left = (ca.not_valid_after_utc - now).days
    status = "ok" if left > CA_WARN_DAYS else ("warn" if left > 0 else "fail")
    fix = "" if status == "ok" else "create a new CA and re-enroll the fleet before it expires"
    out.append(Check("fleet CA", status, f"{folder / 'ca.crt'} valid for {left} more days", fix))
    mode = (folder / "ca.key").stat().st_mode & 0o777 if (folder / "ca.key").exists() else 0
    if mode & 0o077:
        out.append(
            Check("CA key", "fail", f"ca.key has mode {mode:o}", f"chmod 600 {folder}/ca.key")
        )
    next_update = crl.next_update_utc
    crl_left = (next_update - now).days if next_update else 9999
    status = "ok" if crl_left > CRL_WARN_DAYS else ("warn" if crl_left > 0 else "fail")
    fix = (
        ""
        if status == "ok"
        else "re-sign it: flowfleet provision cert crl --ca DIR, then broker-config (copies it)"
    )
    out.append(Check("CRL", status, f"valid for {crl_left} more days", fix))
    return out


def _disk(url: str | None) -> Check:
    path = Path((url or ".").removeprefix("sqlite:///"))
    if "://" in str(url or ""):
        path = Path(".")
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    text = f"{usage.free / (1 << 30):.1f} GiB free under {folder}"
    if usage.free < DISK_WARN_BYTES or usage.free < usage.total * 0.05:
        return Check("disk", "warn", text, "free space: the database and artifacts grow")
    return Check("disk", "ok", text)
