"""`flowfleet agent enroll`: from a bootstrap token to the device's own identity.

The device generates its private key here (P-256, mode 0600; it never leaves the
device), sends its id, a CSR and the bootstrap token to the registry
(``POST /api/enroll``) and writes what comes back into the config folder::

    device.key   its private key (0600)
    device.crt   its certificate from the fleet CA (CN = device id)
    ca.crt       the fleet CA: the broker's certificate is checked against it
    keys.json    the registry's public signing keys (model signatures)
    registry.token  the device's API token for model downloads (0600)
    broker.password the device's broker password (0600; only with ``auth="password"``,
                 for the broker's password listener)
    agent.toml   the agent config: the token's template, the device id, the broker,
                 the registry (model updates)

The token is sent in the request body over the registry's HTTPS (``--registry-ca``
for a private CA) and is never written or logged. Nothing is written until the
registry accepted the claim, except the key, which is made first so a CSR can be
signed with it.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class EnrollError(RuntimeError):
    """The registry refused the claim, or could not be reached; ``status`` is the
    HTTP status (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


FILES = (
    "device.key",
    "device.crt",
    "ca.crt",
    "keys.json",
    "registry.token",
    "broker.password",
    "agent.toml",
)


@dataclass(frozen=True)
class Enrolled:
    device: str
    config: Path
    registration: str
    serial: str
    not_after: float


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _hand_over(folder: Path, owner: str) -> None:
    """Run as root for a service user: the files become that user's (the agent runs
    as it and must read its key); nothing happens when the user does not exist."""
    import pwd

    try:
        user = pwd.getpwnam(owner)
    except KeyError:
        return
    if os.geteuid() != 0:
        return
    for name in FILES:
        if (folder / name).exists():
            os.chown(folder / name, user.pw_uid, user.pw_gid)


def enroll(
    registry_url: str,
    token: str,
    device: str,
    folder: str | Path,
    *,
    registry_ca: str | None = None,
    force: bool = False,
    timeout: float = 30.0,
    owner: str | None = None,
    auth: str = "mtls",
) -> Enrolled:
    """Enroll this device (see the module docstring). Raises EnrollError, or
    ValueError for a bad device id or a folder that already holds an identity. Run
    as root with ``owner`` (the agent's user), the files are handed to that user."""
    from flowfleet.identity import check_device_id
    from flowfleet.provisioning.authority import make_csr, make_device_key

    check_device_id(device, "device id")
    folder = Path(folder)
    if not force:
        present = [f for f in FILES if (folder / f).exists()]
        if present:
            raise ValueError(
                f"{folder} already holds {', '.join(present)}; use --force to enroll again"
            )
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "device.key.new"
    key = make_device_key(key_path)
    claim = {"token": token, "device": device, "csr": make_csr(key, device).decode()}
    if auth != "mtls":
        claim["auth"] = auth
    body = json.dumps(claim)
    request = urllib.request.Request(
        registry_url.rstrip("/") + "/api/enroll",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=registry_ca) if registry_ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        key_path.unlink(missing_ok=True)
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = exc.reason
        raise EnrollError(
            f"the registry refused the enrollment ({exc.code}): {message}", exc.code
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        key_path.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise EnrollError(f"cannot reach the registry at {registry_url}: {reason}") from None
    _write(folder / "device.crt", answer["certificate"])
    _write(folder / "ca.crt", answer["ca"])
    _write(folder / "keys.json", json.dumps(answer["keys"], indent=2) + "\n")
    os.replace(key_path, folder / "device.key")
    if answer.get("broker_password"):
        # Trailing newline: the agent strips it (read_password), like an operator's file.
        _write(folder / "broker.password", answer["broker_password"] + "\n", 0o600)
    config = answer["agent_config"]
    if answer.get("device_token"):
        # Model updates: the registry as this device reached it, its device token.
        _write(folder / "registry.token", answer["device_token"] + "\n", 0o600)
        config += (
            f"\n[registry]\nurl = {json.dumps(registry_url.rstrip('/'))}\n"
            'token_file = "registry.token"\nkeys_file = "keys.json"\n'
        )
    _write(folder / "agent.toml", config)
    if owner:
        _hand_over(folder, owner)
    return Enrolled(
        device=device,
        config=folder / "agent.toml",
        registration=answer["registration"],
        serial=answer["serial"],
        not_after=answer["not_after"],
    )


def _post(url: str, body: dict, registry_ca: str | None, timeout: float) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=registry_ca) if registry_ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = exc.reason
        raise EnrollError(f"the registry refused ({exc.code}): {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollError(f"cannot reach the registry at {url}: {reason}") from None


def renew(
    registry_url: str,
    cert_file: str | Path,
    key_file: str | Path,
    *,
    days_before: float = 7.0,
    registry_ca: str | None = None,
    timeout: float = 30.0,
) -> tuple[bool, float]:
    """Renew the device certificate when it expires within ``days_before`` days: a
    CSR signed by the device's own key (``POST /api/renew``), the new certificate
    written in place. Returns (renewed, its expiry as epoch seconds)."""
    import time

    from cryptography.hazmat.primitives import serialization

    from flowfleet.provisioning.authority import certificate_info, make_csr

    info = certificate_info(cert_file)
    if info["not_after"] - time.time() > days_before * 86400:
        return False, info["not_after"]
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    body = {
        "certificate": Path(cert_file).read_text(),
        "csr": make_csr(key, info["cn"]).decode(),
    }
    answer = _post(registry_url.rstrip("/") + "/api/renew", body, registry_ca, timeout)
    _write(Path(cert_file), answer["certificate"])
    return True, answer["not_after"]
