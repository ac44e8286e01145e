"""API users and tokens with roles viewer < operator < admin.

A token is ``ffr_`` followed by 43 random URL-safe characters (256 bits). Only its
sha256 is stored (a token is random, not a password, so a fast hash is the right
tool: the database never holds anything that can be replayed). A token carries a
role no higher than its user's; it stops working when it expires, is revoked, or its
user is disabled. Every change here is written to the audit trail.

A *device token* (``create_token(..., device="cam-1")``) acts for one device only: it
never passes a role check, and `flowfleet.registry.http.api` lets it download just the
artifacts currently deployed to that device and read the public keys and that
device's deployments. Its ``role`` column holds ``viewer`` (the lowest) only because
the column is required; `Principal.allows` ignores it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from flowfleet.contract import is_valid_name

from ..store.audit import audit
from ..store.db import ApiToken, User, WebSession, now

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "ffr_"


class AuthError(Exception):
    """Bad input to a user/token operation (unknown user, bad role, ...)."""


@dataclass(frozen=True)
class Principal:
    """Who is making a request.

    ``name`` is the user, ``role`` the token's (or, for a web session, the user's)
    role, ``token_id`` the API token's id (None for a session), ``device`` the device
    a device token is bound to, and ``via`` how the request authenticated:
    ``"token"`` (Authorization: Bearer) or ``"session"`` (the web session cookie).
    """

    name: str
    role: str
    token_id: int | None = None
    device: str | None = None
    via: str = "token"

    def allows(self, role: str) -> bool:
        """Whether this principal may use an endpoint that needs ``role``.

        A device token never may: it is not a user with a role.
        """
        if self.device is not None:
            return False
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_token(token: str) -> str:
    """The sha256 (hex) stored for a token or session cookie."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return role


def create_user(name: str, role: str, *, actor: str, reason: str = "") -> User:
    """Create a user with ``role`` (no password, no tokens yet)."""
    if not is_valid_name(name):
        raise AuthError(f"{name!r} is not a valid user name (letters, digits, _ . -)")
    _role(role)
    if User.get_or_none(User.name == name) is not None:
        raise AuthError(f"user {name!r} already exists")
    user = User.create(name=name, role=role, created_at=now())
    audit(actor, "user.create", f"user:{name}", reason, role=role)
    return user


def get_user(name: str) -> User:
    """The user called ``name`` (AuthError if there is none)."""
    user = User.get_or_none(User.name == name)
    if user is None:
        raise AuthError(f"no user {name!r}")
    return user


def set_user_role(name: str, role: str, *, actor: str, reason: str = "") -> User:
    """Change a user's role; their tokens above it are lowered to it."""
    user = get_user(name)
    old = user.role
    user.role = _role(role)
    user.save()
    # Tokens never carry more than their user's role.
    lowered = ROLES[: ROLES.index(role) + 1]
    ApiToken.update(role=role).where(
        (ApiToken.user == user) & ApiToken.role.not_in(lowered)
    ).execute()
    audit(actor, "user.role", f"user:{name}", reason, old=old, new=role)
    return user


def disable_user(name: str, *, actor: str, reason: str = "") -> User:
    """Disable a user: their tokens and web sessions stop working."""
    user = get_user(name)
    if user.disabled_at is None:
        user.disabled_at = now()
        user.save()
    # Web sessions end at once (a lookup also refuses a disabled user's session).
    WebSession.delete().where(WebSession.user == user).execute()
    audit(actor, "user.disable", f"user:{name}", reason)
    return user


def list_users() -> list[dict]:
    """Every user (never a password hash), by name."""
    return [
        {
            "name": u.name,
            "role": u.role,
            "created_at": u.created_at,
            "disabled_at": u.disabled_at,
            "has_password": u.password_hash is not None,
        }
        for u in User.select().order_by(User.name)
    ]


def create_token(
    user_name: str,
    *,
    actor: str,
    role: str | None = None,
    label: str = "",
    ttl_s: float | None = None,
    reason: str = "",
    device: str | None = None,
) -> tuple[str, ApiToken]:
    """A new token for ``user_name``; returns (the secret, shown once; the row).

    With ``device``, a device token: it acts for that device only (see the module
    docstring) and takes no role.
    """
    user = get_user(user_name)
    if user.disabled_at is not None:
        raise AuthError(f"user {user_name!r} is disabled")
    if device is not None:
        if not is_valid_name(device):
            raise AuthError(f"{device!r} is not a valid device id (letters, digits, _ . -)")
        if role is not None:
            raise AuthError("a device token has no role: leave out the role")
        role = ROLES[0]
    role = _role(role or user.role)
    if ROLES.index(role) > ROLES.index(user.role):
        raise AuthError(f"a token cannot have role {role!r} above its user's ({user.role!r})")
    if ttl_s is not None and ttl_s <= 0:
        raise AuthError("a token's lifetime must be positive")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    t = now()
    row = ApiToken.create(
        user=user,
        token_hash=hash_token(secret),
        prefix=secret[:10],
        label=label,
        role=role,
        created_at=t,
        expires_at=t + ttl_s if ttl_s is not None else None,
        device=device,
    )
    details = {"device": device} if device is not None else {"role": role}
    audit(actor, "token.create", f"token:{row.id}", reason, user=user_name, label=label, **details)
    return secret, row


def revoke_token(token_id: int, *, actor: str, reason: str = "") -> ApiToken:
    """Revoke a token by id (idempotent; audited every time)."""
    row = ApiToken.get_or_none(ApiToken.id == token_id)
    if row is None:
        raise AuthError(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now()
        row.save()
    audit(actor, "token.revoke", f"token:{token_id}", reason, user=row.user.name)
    return row


def list_tokens(user_name: str | None = None) -> list[dict]:
    """Tokens (never their secrets or hashes); a device token has ``device`` and no role."""
    query = ApiToken.select(ApiToken, User).join(User).order_by(ApiToken.id)
    if user_name is not None:
        query = query.where(User.name == user_name)
    return [
        {
            "id": t.id,
            "user": t.user.name,
            "role": t.role if t.device is None else None,
            "device": t.device,
            "label": t.label,
            "prefix": t.prefix,
            "created_at": t.created_at,
            "expires_at": t.expires_at,
            "revoked_at": t.revoked_at,
            "last_used_at": t.last_used_at,
        }
        for t in query
    ]


def authenticate(token: str) -> Principal | None:
    """The principal for a presented token, or None if it is unknown or no longer valid."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = (
        ApiToken.select(ApiToken, User)
        .join(User)
        .where(ApiToken.token_hash == hash_token(token))
        .first()
    )
    t = now()
    if row is None or row.revoked_at is not None or row.user.disabled_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= t:
        return None
    # Coarse last-use bookkeeping: at most one write per token per minute.
    if row.last_used_at is None or t - row.last_used_at > 60:
        ApiToken.update(last_used_at=t).where(ApiToken.id == row.id).execute()
    return Principal(name=row.user.name, role=row.role, token_id=row.id, device=row.device)
