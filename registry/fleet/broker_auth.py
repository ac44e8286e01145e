"""The broker's password file and ACL, generated from the registry's device records.

With ``[enrollment] broker_auth = true`` the registry owns two files in the broker's
folder (``broker_dir``, made by `flowfleet provision broker-config --registry-auth`)::

    devices.passwd   the operator's lines for the registry's own identities
                     (``broker_password_base``), then one line per device that has a
                     broker password (the Mosquitto hash stored in broker_credential)
    devices.acl      the admins (``registry``, ``registry-<n>``), then one ``user``
                     block per device the registry grants access: its own telemetry
                     subtree and command topics; no patterns, so an identity the
                     registry does not list (unknown or revoked) gets nothing

`sync` rewrites them when a device is added, enrolled, accepted or revoked (and when
the registry starts), and reloads the broker (SIGHUP to the pid in
``broker_pidfile``, or ``broker_reload_command``) only when their content changed.
Mosquitto re-reads both on SIGHUP and re-checks open password connections against
the new password file: a revoked password device is disconnected by the reload
(tested with Mosquitto 2.0.11). A certificate device is refused at its next handshake
(the CRL); whether 2.0 applies the new ACL to its open connection is not tested here.

Which devices are granted (``broker_acl``): ``known`` (default) every device the
registry has a record of and has not revoked, registered or not (an enrolled device's
counts arrive while it waits for acceptance); ``accepted`` only registered ones (an
unregistered device's counts wait in its outbox until an operator accepts it).

A device's broker password is random (192 bits), issued at enrollment (``auth =
"password"``) or by an admin (``POST /api/devices/{id}/broker-password``), handed
over once in that answer and never logged; only its hash is kept.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from flowfleet.provisioning.mosquitto import (
    hash_password,
    render_device_acl,
    render_password_lines,
)

from ..errors import check_name
from ..store.audit import audit
from ..store.broker_tables import BrokerCredential, DeviceRevocation
from ..store.db import Device, now

log = logging.getLogger(__name__)

PASSWD = "devices.passwd"
ACL = "devices.acl"
POLICIES = ("known", "accepted")
# Two requests regenerating at once would race on the files; one at a time.
_lock = threading.Lock()


def issue_password(device: str, *, actor: str, reason: str = "") -> str:
    """A new broker password for ``device`` (replacing any earlier one); returns the
    plain password, which is stored only as its hash. Call inside the transaction
    that creates or changes the device."""
    check_name(device, "device", "device id")
    secret = secrets.token_urlsafe(24)
    row = {"password_hash": hash_password(secret), "issued_at": now(), "issued_by": actor}
    BrokerCredential.insert(device=device, **row).on_conflict(
        conflict_target=[BrokerCredential.device], update=row
    ).execute()
    audit(actor, "device.broker_password", f"device:{device}", reason)
    return secret


def revoke_access(device: str, *, actor: str, reason: str = "") -> bool:
    """Take ``device`` out of the generated files: its password is deleted and it is
    marked revoked (until a re-enrollment). Returns whether it had a password."""
    had = BrokerCredential.delete().where(BrokerCredential.device == device).execute() > 0
    row = {"revoked_at": now(), "revoked_by": actor, "reason": reason[:256]}
    DeviceRevocation.insert(device=device, **row).on_conflict(
        conflict_target=[DeviceRevocation.device], update=row
    ).execute()
    return had


def restore_access(device: str) -> None:
    """A re-enrolled device is no longer revoked."""
    DeviceRevocation.delete().where(DeviceRevocation.device == device).execute()


def granted(policy: str = "known") -> list[str]:
    """The devices the generated ACL lets in, under ``policy`` (see the module doc)."""
    if policy not in POLICIES:
        raise ValueError(f"broker_acl must be one of {', '.join(POLICIES)}, not {policy!r}")
    revoked = DeviceRevocation.select(DeviceRevocation.device)
    query = Device.select(Device.id).where(Device.id.not_in(revoked))
    if policy == "accepted":
        query = query.where(Device.accepted_at.is_null(False))
    return sorted(d.id for d in query)


def render(settings) -> tuple[str, str]:
    """(devices.passwd, devices.acl) for the current records."""
    devices = granted(settings.broker_acl)
    allowed = set(devices)
    hashes = {c.device: c.password_hash for c in BrokerCredential.select() if c.device in allowed}
    base = ""
    if settings.broker_password_base is not None:
        base = Path(settings.broker_password_base).read_text()
        if base and not base.endswith("\n"):
            base += "\n"
    passwd = base + render_password_lines(hashes)
    acl = render_device_acl(devices, settings.topic_root, tuple(settings.broker_admins))
    return passwd, acl


def _put(path: Path, text: str, mode: int) -> bool:
    data = text.encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    # A unique temporary name: several registry processes may write the same folder.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def reload_broker(settings) -> bool:
    """SIGHUP the broker (``broker_pidfile``) or run ``broker_reload_command``."""
    if settings.broker_reload_command:
        done = subprocess.run(
            shlex.split(settings.broker_reload_command),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            log.error(
                "broker reload command %r failed (%d): %s",
                settings.broker_reload_command,
                done.returncode,
                done.stderr.strip()[-300:],
            )
        return done.returncode == 0
    pidfile = settings.broker_pidfile
    if pidfile is None or not Path(pidfile).is_file():
        log.warning("broker files changed but there is no broker pid file to reload (%s)", pidfile)
        return False
    os.kill(int(Path(pidfile).read_text().strip()), signal.SIGHUP)
    return True


def sync(settings) -> dict:
    """Rewrite the broker's generated files from the records; reload the broker when
    one changed. Returns ``{"changed": [names], "reloaded": bool}``."""
    folder = Path(settings.broker_dir)
    with _lock:
        passwd, acl = render(settings)
        changed = [
            name
            for name, text, mode in ((PASSWD, passwd, 0o640), (ACL, acl, 0o644))
            if _put(folder / name, text, mode)
        ]
        reloaded = reload_broker(settings) if changed else False
    if changed:
        log.info("broker files %s regenerated; broker reloaded: %s", ", ".join(changed), reloaded)
    return {"changed": changed, "reloaded": reloaded}
