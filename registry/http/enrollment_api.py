"""REST API of enrollment by claim (`flowfleet.registry.fleet.enrollment`).

``POST /api/enroll`` is public: it authenticates by the bootstrap token in its body
(never in a URL, so it cannot land in an access log). Bootstrap tokens are created,
listed and revoked by admins (``/api/enrollment-tokens``); an admin allows the
re-enrollment of an existing device (``POST /api/devices/{device}/reenroll``).
Without an ``[enrollment]`` configuration every endpoint answers 503.
"""

from __future__ import annotations

import logging
import threading

from flask import Blueprint, current_app, jsonify, request

from ..errors import RegistryError
from ..fleet import broker_auth, enrollment
from ..store.locks import exclusive
from . import auth
from .api import _actor, _json_body, query_args, requires

bp = Blueprint("enrollment_api", __name__, url_prefix="/api")
ENROLLMENT_USER = "enrollment"
log = logging.getLogger(__name__)
_limiter_lock = threading.Lock()


def _rate_limit(settings: enrollment.EnrollmentSettings, endpoint: str, credential: str) -> None:
    """Count this attempt; 429 with Retry-After over a limit (`ratelimit`)."""
    from .ratelimit import EnrollmentLimiter, Limits

    with _limiter_lock:
        limiter = current_app.extensions.get("flowfleet_enroll_limiter")
        if limiter is None:
            limiter = EnrollmentLimiter(
                Limits(
                    settings.rate_limit_window_s,
                    settings.rate_limit_per_address,
                    settings.rate_limit_per_token,
                )
            )
            current_app.extensions["flowfleet_enroll_limiter"] = limiter
    limiter.check(endpoint, request.remote_addr or "", credential)


def sync_broker() -> dict | None:
    """After a committed change to the device records: regenerate the broker's
    password file and ACL and reload it (``[enrollment] broker_auth``). A failure is
    logged, not raised: the change stands, and the next change or
    `flowfleet provision broker-sync` writes the files."""
    s = current_app.extensions.get("flowfleet_enrollment")
    if s is None or not s.broker_auth:
        return None
    try:
        return broker_auth.sync(s)
    except Exception as exc:
        log.error("could not regenerate the broker's files in %s: %s", s.broker_dir, exc)
        return {"changed": [], "reloaded": False, "error": str(exc)}


def _settings() -> enrollment.EnrollmentSettings:
    s = current_app.extensions.get("flowfleet_enrollment")
    if s is None:
        raise RegistryError(
            503, "not_configured", "this registry does not enroll devices (no [enrollment])"
        )
    return s


def _keys() -> dict:
    reg = current_app.extensions.get("flowfleet_model_registry")
    return reg.keys.bundle() if reg is not None else {"keys": []}


def _device_token(device: str) -> str:
    """A device API token for ``device`` (it may download the models deployed to it),
    owned by the ``enrollment`` user (a viewer, created on first use); earlier device
    tokens of a re-enrolled device are revoked."""
    from ..store.db import ApiToken, User

    if User.get_or_none(User.name == ENROLLMENT_USER) is None:
        auth.create_user(ENROLLMENT_USER, "viewer", actor="enrollment")
    for old in ApiToken.select().where((ApiToken.device == device) & ApiToken.revoked_at.is_null()):
        auth.revoke_token(old.id, actor="enrollment", reason="re-enrolled")
    secret, _ = auth.create_token(
        ENROLLMENT_USER, actor="enrollment", device=device, label=f"enrolled {device}"
    )
    return secret


@bp.post("/enroll")
def enroll():
    """A device's claim: {token, device, csr} -> certificate, CA, keys, agent config."""
    query_args(())
    settings = _settings()
    body = _json_body(
        {"token": str, "device": str, "csr": str, "auth": str}, ("token", "device", "csr")
    )
    _rate_limit(settings, "enroll", body["token"])
    db = current_app.extensions["flowfleet_db"]
    # One transaction: the identity and the device's API token (model downloads) are
    # granted together or not at all.
    with exclusive(db, "enrollment"):
        answer = enrollment.enroll(
            db,
            settings,
            token=body["token"],
            device=body["device"],
            csr=body["csr"],
            keys=_keys(),
            remote_addr=request.remote_addr or "",
            auth=body.get("auth", "mtls"),
        )
        answer["device_token"] = _device_token(answer["device"])
    synced = sync_broker()  # a new device in the ACL (and its password)
    if synced is not None:
        answer["broker_reloaded"] = synced["reloaded"]
    resp = jsonify(answer)
    resp.status_code = 201
    return resp


@bp.post("/renew")
def renew():
    """A device's certificate renewal: {certificate, csr} signed by the same key."""
    query_args(())
    settings = _settings()
    body = _json_body({"certificate": str, "csr": str}, ("certificate", "csr"))
    _rate_limit(settings, "renew", body["certificate"])
    db = current_app.extensions["flowfleet_db"]
    with db.atomic():  # the audit entry
        answer = enrollment.renew(settings, certificate=body["certificate"], csr=body["csr"])
    return jsonify(answer)


@bp.post("/enrollment-tokens")
@requires("admin")
def create_token():
    """A bootstrap token (201); the secret is in the answer, once."""
    query_args(())
    _settings()
    body = _json_body(
        {
            "ttl_s": (int, float),
            "max_uses": int,
            "group": str,
            "auto_accept": bool,
            "agent_template": str,
            "label": str,
        }
    )
    ttl = body.get("ttl_s", enrollment.DEFAULT_TTL_S)
    secret, row = enrollment.create_token(
        actor=_actor(),
        ttl_s=float(ttl),
        max_uses=body.get("max_uses", 1),
        group=body.get("group"),
        auto_accept=body.get("auto_accept", False),
        agent_template=body.get("agent_template"),
        label=body.get("label", ""),
    )
    resp = jsonify({"token": secret, **enrollment.token_dict(row)})
    resp.status_code = 201
    return resp


@bp.get("/enrollment-tokens")
@requires("operator")
def list_tokens():
    query_args(())
    return jsonify({"tokens": enrollment.list_tokens()})


@bp.post("/enrollment-tokens/<int:token_id>/revoke")
@requires("admin")
def revoke_token(token_id: int):
    args = query_args(("reason",))
    row = enrollment.revoke_token(token_id, actor=_actor(), reason=args.get("reason", ""))
    return jsonify(enrollment.token_dict(row))


@bp.post("/devices/<device>/reenroll")
@requires("admin")
def allow_reenroll(device: str):
    """Let the next enrollment of this existing device id through (within a day)."""
    args = query_args(("reason",))
    row = enrollment.allow_reenroll(device, actor=_actor(), reason=args.get("reason", ""))
    return jsonify({"device": row.device, "expires_at": row.expires_at})


@bp.post("/devices/<device>/revoke")
@requires("admin")
def revoke_device(device: str):
    """Revoke the device's certificates; the broker reloads the CRL and refuses it."""
    from ..store.db import ApiToken

    args = query_args(("reason",))
    reason = args.get("reason", "")
    answer = enrollment.revoke_device(_settings(), device, actor=_actor(), reason=reason)
    # Its API tokens go too: a revoked device downloads nothing more.
    tokens = ApiToken.select().where((ApiToken.device == device) & ApiToken.revoked_at.is_null())
    for row in tokens:
        auth.revoke_token(row.id, actor=_actor(), reason=reason or "device revoked")
    synced = sync_broker()  # out of the ACL and the password file
    if synced is not None:
        answer["broker_reloaded"] = answer["broker_reloaded"] or synced["reloaded"]
    return jsonify(answer)


@bp.post("/devices/<device>/broker-password")
@requires("admin")
def broker_password(device: str):
    """A new broker password for a known device (for the password listener); the
    answer carries it once, the registry keeps only its hash."""
    from ..store.db import Device

    args = query_args(("reason",))
    settings = _settings()
    if not settings.broker_auth:
        raise RegistryError(
            409, "not_configured", "this registry does not manage broker passwords (broker_auth)"
        )
    db = current_app.extensions["flowfleet_db"]
    with db.atomic():
        if Device.get_or_none(Device.id == device) is None:
            raise RegistryError(404, "unknown_device", f"no device {device!r}", "device")
        revoked = broker_auth.DeviceRevocation.get_or_none(
            broker_auth.DeviceRevocation.device == device
        )
        if revoked is not None:
            raise RegistryError(
                409, "device_revoked", f"device {device!r} was revoked; enroll it again", "device"
            )
        secret = broker_auth.issue_password(device, actor=_actor(), reason=args.get("reason", ""))
    synced = sync_broker()
    return jsonify(
        {
            "device": device,
            "username": device,
            "password": secret,
            "port": settings.broker_password_port,
            "broker_reloaded": bool(synced and synced["reloaded"]),
        }
    )
