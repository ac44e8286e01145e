"""The production broker's files, generated from the fleet CA and written only when they
change, then a SIGHUP so Mosquitto reloads them (`flowfleet provision broker-config`).

Written into one folder the broker reads (``/etc/mosquitto/flowfleet/`` for example)::

    flowfleet.conf   listeners: mutual TLS with use_identity_as_username and the CRL,
                     and (with a password file) a password-over-TLS listener;
                     client ids bound to identities; persistence and queue limits
    acl              the generated ACL (each device its own subtree)
    crl.pem          a copy of the CA's revocation list
    ca.crt           the fleet CA
    broker.crt/.key  the broker's server certificate (issued once, if missing)

Run it again after a revocation (or let the registry do it, ``[enrollment]
broker_pidfile``): only what changed is rewritten and the broker is reloaded; running
it twice in a row changes nothing. The same settings for EMQX are in
docs/provisioning.md.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .authority import Authority
from .mosquitto import BrokerConfig, BrokerSecurity, render_acl, render_device_acl


@dataclass(frozen=True)
class BrokerFiles:
    folder: Path
    changed: tuple[str, ...]
    reloaded_pid: int | None = None


def _put(path: Path, data: bytes, mode: int, changed: list[str]) -> None:
    if path.is_file() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    changed.append(path.name)


def _hand_key_to_broker(key: Path) -> None:
    """Run as root where the packaged broker runs as ``mosquitto``: give it its key."""
    import pwd

    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(key, user.pw_uid, user.pw_gid)


def refresh_crl(authority: Authority, folder: str | Path, pidfile: str | Path | None) -> bool:
    """Copy the CA's CRL into the broker's folder and SIGHUP it if it changed."""
    changed: list[str] = []
    _put(Path(folder) / "crl.pem", authority.crl.read_bytes(), 0o644, changed)
    if changed and pidfile is not None and Path(pidfile).is_file():
        os.kill(int(Path(pidfile).read_text().strip()), signal.SIGHUP)
    return bool(changed)


def write_broker_files(
    authority: Authority,
    folder: str | Path,
    *,
    hosts: tuple[str, ...],
    tls_port: int = 8883,
    password_port: int | None = None,
    password_file: str | Path | None = None,
    bind: str = "0.0.0.0",
    data_dir: str | Path = "/var/lib/mosquitto",
    topic_root: str = "flowfleet/v1",
    admins: tuple[str, ...] = ("registry",),
    pid_file: str | Path | None = "/run/mosquitto/mosquitto.pid",
    pidfile: str | Path | None = None,
    registry_auth: bool = False,
) -> BrokerFiles:
    """Write the files (see the module docstring); SIGHUP the broker in ``pidfile``
    when something changed; the config tells the broker to write its pid to
    ``pid_file``. ``password_port`` adds a TLS listener that takes the
    passwords in ``password_file`` instead of client certificates.

    ``registry_auth``: the registry generates the password file and the ACL from its
    device records (``[enrollment] broker_auth``; `flowfleet.registry.fleet.broker_auth`):
    the config names ``devices.passwd`` and ``devices.acl`` in ``folder`` (made here,
    admins only and no password, when missing; never overwritten here) instead of
    the pattern ACL, and ``password_file`` defaults to ``devices.passwd``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()  # the config names absolute paths
    changed: list[str] = []
    acl_file = folder / "acl"
    if registry_auth:
        acl_file = folder / "devices.acl"
        password_file = password_file or folder / "devices.passwd"
        for path, text, mode in (
            (acl_file, render_device_acl((), topic_root, admins), 0o644),
            (folder / "devices.passwd", "", 0o640),
        ):
            if not path.exists():  # the registry's from now on
                _put(path, text.encode(), mode, changed)
    if not (folder / "broker.crt").is_file():
        authority.issue("broker", hosts[0] if hosts else "broker", folder, hosts=hosts)
        changed += ["broker.crt", "broker.key"]
        _hand_key_to_broker(folder / "broker.key")
    _put(folder / "ca.crt", authority.ca.cert.read_bytes(), 0o644, changed)
    _put(folder / "crl.pem", authority.crl.read_bytes(), 0o644, changed)
    if not registry_auth:
        _put(acl_file, render_acl(topic_root, admins).encode(), 0o644, changed)
    mtls = BrokerSecurity(
        acl_file=acl_file,
        tls_port=tls_port,
        cafile=folder / "ca.crt",
        certfile=folder / "broker.crt",
        keyfile=folder / "broker.key",
        require_certificate=True,
        use_identity_as_username=True,
        plain=False,
        crlfile=folder / "crl.pem",
    )
    config = BrokerConfig(port=tls_port, host=bind, data_dir=Path(data_dir), security=mtls)
    # Not "user root" (the private test broker's): the packaged broker drops to its user.
    lines = [ln for ln in config.render().splitlines() if ln != "user root"]
    if password_port and password_file:
        # A second TLS listener for devices that cannot do client certificates.
        # Mosquitto applies password_file/acl_file to every listener (no
        # per_listener_settings), so the mTLS listener still ignores passwords: there
        # the certificate is the identity.
        extra = [
            f"listener {password_port} {bind}",
            "use_username_as_clientid true",
            f"cafile {folder / 'ca.crt'}",
            f"certfile {folder / 'broker.crt'}",
            f"keyfile {folder / 'broker.key'}",
            "require_certificate false",
            f"password_file {password_file}",
        ]
        at = next(i for i, ln in enumerate(lines) if ln.startswith("allow_anonymous"))
        lines[at:at] = extra
    if pid_file:
        lines.insert(1, f"pid_file {pid_file}")  # what --reload-pidfile reads
    _put(folder / "flowfleet.conf", ("\n".join(lines) + "\n").encode(), 0o644, changed)
    pid = None
    if changed and pidfile is not None and Path(pidfile).is_file():
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    return BrokerFiles(folder, tuple(changed), pid)
