"""Enrollment by claim: a device with only a bootstrap token gets its own identity.

The AWS fleet-provisioning model. An operator creates a *bootstrap token*
(`create_token`: single- or limited-use, an expiry, a device group, an optional agent
config template, auto-accept or not). A new device generates its key locally and sends
the token, its device id and a CSR (`enroll`, ``POST /api/enroll``); the registry
checks the token, signs the CSR with the fleet CA (`flowfleet.provisioning.authority`)
and answers with the device certificate, the CA certificate, the registry's public
signing keys and the device's ``agent.toml``. From then on the device uses its own
certificate; the token is only ever a claim.

Refusals (each changes nothing): an unknown, revoked, expired or used-up token (401);
a device id that exists already (409), unless an operator allowed its re-enrollment
(`allow_reenroll`, consumed by the next enrollment); a bad device id or CSR (400).
A device the token did not auto-accept arrives unregistered (listed with
``registration=unregistered``) until an operator accepts it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import peewee as pw

from flowfleet.configfile import tomllib
from flowfleet.contract import DEFAULT_ROOT
from flowfleet.identity import check_device_id

from ..errors import RegistryError, check_name
from ..store.audit import audit
from ..store.broker_tables import BrokerCredential
from ..store.db import Device, DeviceGroup, DeviceGroupMember, now
from ..store.enrollment_tables import Enrollment, EnrollmentToken, ReenrollAllowance
from ..store.locks import exclusive
from . import broker_auth

TOKEN_PREFIX = "ffe_"
MAX_USES = 10_000
MAX_TTL_S = 90 * 86400.0
DEFAULT_TTL_S = 86400.0
REENROLL_TTL_S = 86400.0
MAX_CSR_BYTES = 16 * 1024
MAX_TEMPLATE_BYTES = 64 * 1024
# Sections of agent.toml the registry writes itself; a template may not set them.
OWN_KEYS = ("device_id", "broker", "registry")


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class EnrollmentSettings:
    """What the registry needs to enroll devices (``[enrollment]`` of its config).

    ``ca_dir`` is a CA folder with its key (`Authority`); ``broker_host`` and
    ``broker_port`` are the broker's mutual-TLS listener as devices reach it.
    """

    ca_dir: Path
    broker_host: str
    broker_port: int
    topic_root: str = DEFAULT_ROOT
    cert_days: int = 30
    # The broker's folder from `flowfleet provision broker-config` and its pid file:
    # a revocation copies the CRL there and reloads the broker (SIGHUP).
    broker_dir: Path | None = None
    broker_pidfile: Path | None = None
    # The broker's password file and ACL generated from the device records
    # (`broker_auth`): which devices the ACL grants, the registry's own identities,
    # the file with their password lines, how to reload the broker, and the password
    # listener that devices without client certificates connect to.
    broker_auth: bool = False
    broker_acl: str = "known"
    broker_admins: tuple[str, ...] = ("registry",)
    broker_password_base: Path | None = None
    broker_reload_command: str | None = None
    broker_password_port: int | None = None
    # POST /api/enroll and /api/renew: attempts per source address and per token (or
    # certificate) within the window; 0 turns one off (flowfleet.registry.http.ratelimit).
    rate_limit_window_s: float = 60.0
    rate_limit_per_address: int = 30
    rate_limit_per_token: int = 10

    def authority(self):
        from flowfleet.provisioning.authority import Authority

        return Authority(self.ca_dir)


# -- tokens -------------------------------------------------------------------------------


def check_template(text: str | None) -> str | None:
    """A valid agent config template (400 naming the problem) or None."""
    if text is None or not text.strip():
        return None
    if len(text.encode()) > MAX_TEMPLATE_BYTES:
        raise RegistryError(400, "invalid_field", "agent_template is too large", "agent_template")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(
            400, "invalid_field", f"agent_template is not TOML: {exc}", "agent_template"
        ) from None
    for key in OWN_KEYS:
        if key in data:
            raise RegistryError(
                400,
                "invalid_field",
                f"agent_template must not set {key!r}: the registry writes it",
                "agent_template",
            )
    from pydantic import ValidationError

    from flowfleet.agent.config import AgentConfig

    try:
        AgentConfig.model_validate({**data, "device_id": "template-check"})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RegistryError(
            400, "invalid_field", f"agent_template {where}: {err['msg']}", "agent_template"
        ) from None
    return text


def create_token(
    *,
    actor: str,
    ttl_s: float = DEFAULT_TTL_S,
    max_uses: int = 1,
    group: str | None = None,
    auto_accept: bool = False,
    agent_template: str | None = None,
    label: str = "",
) -> tuple[str, EnrollmentToken]:
    """A new bootstrap token; returns (the secret, shown once; the row)."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise RegistryError(
            400, "invalid_field", f"ttl_s must be in (0, {MAX_TTL_S:.0f}] seconds", "ttl_s"
        )
    if isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_USES:
        raise RegistryError(400, "invalid_field", f"max_uses must be 1 to {MAX_USES}", "max_uses")
    if group is not None:
        check_name(group, "group", "group name")
    if len(label) > 128:
        raise RegistryError(400, "invalid_field", "label is at most 128 characters", "label")
    template = check_template(agent_template)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    t = now()
    row = EnrollmentToken.create(
        token_hash=hash_token(secret),
        prefix=secret[:10],
        label=label,
        group=group,
        max_uses=max_uses,
        auto_accept=auto_accept,
        agent_template=template,
        created_at=t,
        created_by=actor,
        expires_at=t + ttl_s,
    )
    audit(
        actor,
        "enrollment_token.create",
        f"enrollment_token:{row.id}",
        "",
        group=group,
        max_uses=max_uses,
        auto_accept=auto_accept,
        expires_at=row.expires_at,
    )
    return secret, row


def token_state(row: EnrollmentToken, at: float) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.uses >= row.max_uses:
        return "used"
    if row.expires_at <= at:
        return "expired"
    return "active"


def token_dict(row: EnrollmentToken, at: float | None = None) -> dict:
    """A token as listed (never its secret or hash)."""
    at = now() if at is None else at
    return {
        "id": row.id,
        "prefix": row.prefix,
        "label": row.label,
        "group": row.group,
        "max_uses": row.max_uses,
        "uses": row.uses,
        "auto_accept": row.auto_accept,
        "has_template": row.agent_template is not None,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "state": token_state(row, at),
        "devices": [e.device for e in row.enrollments.order_by(Enrollment.id)],
    }


def list_tokens() -> list[dict]:
    t = now()
    return [token_dict(r, t) for r in EnrollmentToken.select().order_by(EnrollmentToken.id)]


def revoke_token(token_id: int, *, actor: str, reason: str = "") -> EnrollmentToken:
    """Revoke a bootstrap token (idempotent; 404 unknown)."""
    in_range = 1 <= token_id <= 2**31 - 1  # beyond any id (and SQLite's integers)
    row = EnrollmentToken.get_or_none(EnrollmentToken.id == token_id) if in_range else None
    if row is None:
        raise RegistryError(404, "unknown_token", f"no enrollment token {token_id}", "id")
    if row.revoked_at is None:
        row.revoked_at = now()
        row.save()
    audit(actor, "enrollment_token.revoke", f"enrollment_token:{token_id}", reason)
    return row


def allow_reenroll(
    device: str, *, actor: str, ttl_s: float = REENROLL_TTL_S, reason: str = ""
) -> ReenrollAllowance:
    """Let the next enrollment of the existing ``device`` through (within ``ttl_s``)."""
    check_name(device, "device", "device id")
    t = now()
    ReenrollAllowance.delete().where(ReenrollAllowance.device == device).execute()
    row = ReenrollAllowance.create(
        device=device, allowed_at=t, allowed_by=actor, expires_at=t + ttl_s
    )
    audit(actor, "device.reenroll_allow", f"device:{device}", reason, expires_at=row.expires_at)
    return row


# -- enrolling ------------------------------------------------------------------------


def _refuse_token(row: EnrollmentToken | None, at: float) -> None:
    if row is None:
        raise RegistryError(401, "unauthorized", "the bootstrap token is unknown", "token")
    state = token_state(row, at)
    if state != "active":
        why = {
            "revoked": "was revoked",
            "used": f"is used up ({row.uses} of {row.max_uses} enrollments)",
            "expired": "has expired",
        }[state]
        raise RegistryError(401, "unauthorized", f"the bootstrap token {why}", "token")


def _agent_toml(
    template: str | None, device: str, s: EnrollmentSettings, auth: str = "mtls"
) -> str:
    """agent.toml for an enrolled device: the template, then the registry's sections.
    Paths are relative to the file (the agent resolves them against its folder). With
    ``auth="password"`` the broker section names the password listener and the
    password file `agent enroll` writes (``broker.password``), over TLS still."""
    if auth == "password":
        identity = [
            f"port = {int(s.broker_password_port or 0)}",
            f"username = {json.dumps(device)}",
            'password_file = "broker.password"',
        ]
    else:
        identity = [f"port = {int(s.broker_port)}"]
    lines = [
        "# written by flowfleet agent enroll from the registry's answer",
        f"device_id = {json.dumps(device)}",
        "",
        (template or "").rstrip(),
        "",
        "[broker]",
        f"host = {json.dumps(s.broker_host)}",
        *identity,
        f"topic_root = {json.dumps(s.topic_root)}",
        'ca_file = "ca.crt"',
    ]
    if auth != "password":
        lines += ['cert_file = "device.crt"', 'key_file = "device.key"']
    return "\n".join([*lines, ""])


def _add_to_group(name: str, device: str, actor: str) -> None:
    group = DeviceGroup.get_or_none(DeviceGroup.name == name)
    if group is None:
        group = DeviceGroup.create(name=name, created_at=now(), created_by=actor)
    exists = DeviceGroupMember.get_or_none(
        (DeviceGroupMember.group == group) & (DeviceGroupMember.device == device)
    )
    if exists is None:
        DeviceGroupMember.create(group=group, device=device, added_at=now())


def enroll(
    db: pw.Database,
    settings: EnrollmentSettings,
    *,
    token: str,
    device: str,
    csr: str,
    keys: dict,
    remote_addr: str = "",
    auth: str = "mtls",
) -> dict:
    """Enroll ``device`` with a bootstrap ``token`` and its ``csr`` (PEM); returns the
    answer (certificate, CA, keys, agent config, registration). With ``auth="password"``
    the device connects to the broker's password listener instead of presenting its
    certificate: the answer carries its broker password (once; only the hash is kept).
    Nothing changes on a refusal (RegistryError)."""
    from flowfleet.contract import ContractError
    from flowfleet.provisioning.authority import AuthorityError, certificate_info

    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise RegistryError(401, "unauthorized", "the bootstrap token is unknown", "token")
    try:
        check_device_id(device, "device")
    except (ContractError, ValueError) as exc:
        raise RegistryError(400, "invalid_field", str(exc), "device") from None
    if not isinstance(csr, str) or len(csr) > MAX_CSR_BYTES:
        raise RegistryError(400, "invalid_field", "csr must be a PEM string (<16 KiB)", "csr")
    if auth not in ("mtls", "password"):
        raise RegistryError(400, "invalid_field", "auth must be 'mtls' or 'password'", "auth")
    if auth == "password" and not (settings.broker_auth and settings.broker_password_port):
        raise RegistryError(
            400,
            "invalid_field",
            "this registry has no broker password listener (enrollment.broker_password_port)",
            "auth",
        )
    authority = settings.authority()
    # The write lock up front (SQLite: BEGIN IMMEDIATE): the token check and its use
    # are one decision, and a read upgraded to a write would fail beside ingest.
    with exclusive(db, "enrollment"):
        t = now()
        row = EnrollmentToken.get_or_none(EnrollmentToken.token_hash == hash_token(token))
        _refuse_token(row, t)
        # Conditional increment: two devices racing for the last use cannot both win.
        used = (
            EnrollmentToken.update(uses=EnrollmentToken.uses + 1)
            .where(
                (EnrollmentToken.id == row.id)
                & (EnrollmentToken.uses < EnrollmentToken.max_uses)
                & EnrollmentToken.revoked_at.is_null()
            )
            .execute()
        )
        if used != 1:
            raise RegistryError(401, "unauthorized", "the bootstrap token is used up", "token")
        existing = Device.get_or_none(Device.id == device)
        if existing is not None:
            allowance = ReenrollAllowance.get_or_none(ReenrollAllowance.device == device)
            if allowance is None or allowance.expires_at <= t:
                raise RegistryError(
                    409,
                    "device_exists",
                    f"device {device!r} exists; an operator must allow its re-enrollment "
                    "(flowfleet provision tokens allow-reenroll)",
                    "device",
                )
            allowance.delete_instance()
            broker_auth.restore_access(device)  # an allowed re-enrollment lifts a revocation
        try:
            cert_pem = authority.sign_csr(csr.encode(), device, settings.cert_days)
        except AuthorityError as exc:
            raise RegistryError(400, "invalid_field", str(exc), "csr") from None
        actor = f"enrollment_token:{row.id}"
        if existing is None:
            Device.insert(
                id=device,
                first_seen=t,
                state="unknown",
                state_since=t,
                accepted_at=t if row.auto_accept else None,
                accepted_by=actor if row.auto_accept else None,
            ).execute()
        if row.group:
            _add_to_group(row.group, device, actor)
        password = None
        if auth == "password":
            password = broker_auth.issue_password(device, actor=actor)
        else:  # a device re-enrolled with a certificate keeps no password
            BrokerCredential.delete().where(BrokerCredential.device == device).execute()
        info = certificate_info(cert_pem)
        Enrollment.create(
            token=row,
            device=device,
            serial=info["serial"],
            not_after=info["not_after"],
            enrolled_at=t,
            remote_addr=remote_addr[:64],
        )
        # Auto-accept is for new devices; re-enrolling leaves the registration as it was.
        registered = existing.accepted_at is not None if existing else row.auto_accept
        audit(
            actor,
            "device.enroll",
            f"device:{device}",
            "",
            serial=info["serial"],
            reenroll=existing is not None,
            group=row.group,
            auth=auth,
        )
    answer = {
        "device": device,
        "certificate": cert_pem.decode(),
        "ca": authority.ca.cert.read_text(),
        "keys": keys,
        "agent_config": _agent_toml(row.agent_template, device, settings, auth),
        "registration": "registered" if registered else "unregistered",
        "not_after": info["not_after"],
        "serial": info["serial"],
        "group": row.group,
        "auth": auth,
    }
    if password is not None:
        answer["broker_password"] = password
    return answer


def revoke_device(
    settings: EnrollmentSettings, device: str, *, actor: str, reason: str = ""
) -> dict:
    """Revoke every live certificate of ``device`` (the CA's CRL), copy the CRL to the
    broker and reload it; from then on the broker refuses the device's certificate.
    404 when the device has no live certificate."""
    from flowfleet.provisioning.authority import AuthorityError
    from flowfleet.provisioning.broker_files import refresh_crl

    check_name(device, "device", "device id")
    authority = settings.authority()
    try:
        revoked = authority.revoke(cn=device, reason=reason)
    except AuthorityError as exc:
        # A device that only ever had a broker password has no certificate to revoke.
        if not (settings.broker_auth and Device.get_or_none(Device.id == device)):
            raise RegistryError(404, "unknown_certificate", str(exc), "device") from None
        revoked = []
    password = False
    if settings.broker_auth:
        password = broker_auth.revoke_access(device, actor=actor, reason=reason)
    reloaded = False
    if settings.broker_dir is not None:
        reloaded = refresh_crl(authority, settings.broker_dir, settings.broker_pidfile)
    serials = [r.serial for r in revoked]
    audit(actor, "device.revoke", f"device:{device}", reason, serials=serials, password=password)
    return {
        "device": device,
        "revoked": serials,
        "password_revoked": password,
        "broker_reloaded": reloaded,
    }


def renew(settings: EnrollmentSettings, *, certificate: str, csr: str) -> dict:
    """A new certificate for a device that holds a current one: the CSR must be signed
    by the same key (proof of possession) and name the same device. 401 for a foreign,
    revoked or expired certificate (enroll again with a token then), 400 for a bad CSR."""
    from cryptography import x509

    from flowfleet.provisioning.authority import AuthorityError, certificate_info

    if not isinstance(csr, str) or len(csr) > MAX_CSR_BYTES or len(certificate) > MAX_CSR_BYTES:
        raise RegistryError(400, "invalid_field", "csr must be a PEM string (<16 KiB)", "csr")
    authority = settings.authority()
    try:
        device = authority.check_current(certificate.encode())
    except AuthorityError as exc:
        raise RegistryError(401, "unauthorized", str(exc), "certificate") from None
    try:
        request = x509.load_pem_x509_csr(csr.encode())
        current = x509.load_pem_x509_certificate(certificate.encode())
    except ValueError:
        raise RegistryError(400, "invalid_field", "csr is not a PEM request", "csr") from None
    if request.public_key() != current.public_key():
        raise RegistryError(
            400, "invalid_field", "csr must be signed by the current certificate's key", "csr"
        )
    try:
        pem = authority.sign_csr(csr.encode(), device, settings.cert_days)
    except AuthorityError as exc:
        raise RegistryError(400, "invalid_field", str(exc), "csr") from None
    info = certificate_info(pem)
    audit(f"device:{device}", "device.renew", f"device:{device}", "", serial=info["serial"])
    return {"device": device, "certificate": pem.decode(), **info}
