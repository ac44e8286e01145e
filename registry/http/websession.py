"""Web logins: passwords, server-side sessions with CSRF tokens, login rate limiting.

Passwords are hashed with `hashlib.scrypt` (N=2**14, r=8, p=1, a random 16-byte salt)
into a self-describing string ``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (base64), so
the parameters can be raised later without breaking stored hashes.

A session is a row in ``web_session``: the browser holds a random cookie value (256
bits) and the database only its sha256, so a copy of the database opens no session.
A session ends on logout, after `IDLE_TIMEOUT_S` without a request, `MAX_AGE_S`
after login whatever happens, when its user is disabled, or when the user's password
is changed. Each session has its own CSRF token that every state-changing request
authenticated by the cookie must carry (see `flowfleet.registry.http.api`).

Failed logins are rows in ``login_failure`` (shared by every registry worker): after
`MAX_USER_FAILURES` failures for one user name or `MAX_REMOTE_FAILURES` from one
address within `FAILURE_WINDOW_S`, `login_retry_after` says how long to wait; the
check comes before the password is verified, so a locked account refuses even the
right password. A successful login clears the user's failures; rows older than the
window are pruned whenever a failure is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

from ..store.audit import audit
from ..store.db import LoginFailure, User, WebSession, now
from .auth import AuthError, Principal, get_user, hash_token

SESSION_COOKIE = "ffr_session"
LOGIN_CSRF_COOKIE = "ffr_login_csrf"
IDLE_TIMEOUT_S = 2 * 3600.0
MAX_AGE_S = 12 * 3600.0
# Last-seen bookkeeping is written at most this often per session.
TOUCH_INTERVAL_S = 60.0

MAX_USER_FAILURES = 5
MAX_REMOTE_FAILURES = 20
FAILURE_WINDOW_S = 15 * 60.0

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


# -- passwords ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """The self-describing scrypt hash of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )
    return f"scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches ``stored`` (False for no or a malformed hash)."""
    if not stored:
        return False
    try:
        scheme, params, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        p = dict(kv.split("=", 1) for kv in params.split(","))
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(p["n"]),
            r=int(p["r"]),
            p=int(p["p"]),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(digest, expected)


# A hash to verify against when the user does not exist, so that a login for an
# unknown name takes as long as one for a known name.
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def set_password(name: str, password: str, *, actor: str, reason: str = "") -> User:
    """Set a user's web password (audited); ends the user's existing web sessions."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AuthError(f"a password has at most {MAX_PASSWORD_CHARS} characters")
    user = get_user(name)
    user.password_hash = hash_password(password)
    user.save()
    WebSession.delete().where(WebSession.user == user).execute()
    audit(actor, "user.password", f"user:{name}", reason)
    return user


# -- sessions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A live web session: its user (as a `Principal`), CSRF token and row id."""

    principal: Principal
    csrf_token: str
    id_hash: str
    expires_at: float


def create_session(user: User, remote: str = "") -> tuple[str, Session]:
    """Start a session for ``user``; returns (the cookie value, the session)."""
    cookie = secrets.token_urlsafe(32)
    t = now()
    row = WebSession.create(
        id_hash=hash_token(cookie),
        user=user,
        csrf_token=secrets.token_urlsafe(32),
        created_at=t,
        expires_at=t + MAX_AGE_S,
        last_seen_at=t,
        remote=(remote or "")[:64],
    )
    return cookie, _session(row, user)


def _session(row: WebSession, user: User) -> Session:
    return Session(
        principal=Principal(name=user.name, role=user.role, via="session"),
        csrf_token=row.csrf_token,
        id_hash=row.id_hash,
        expires_at=row.expires_at,
    )


def lookup_session(cookie: str | None) -> Session | None:
    """The live session for a cookie value, or None (unknown, expired, user disabled).

    An expired session's row is deleted; a live one's last-seen time is refreshed
    (at most once a minute).
    """
    if not cookie or len(cookie) > 128:
        return None
    row = (
        WebSession.select(WebSession, User)
        .join(User)
        .where(WebSession.id_hash == hash_token(cookie))
        .first()
    )
    if row is None:
        return None
    t = now()
    if row.expires_at <= t or row.last_seen_at + IDLE_TIMEOUT_S <= t or row.user.disabled_at:
        WebSession.delete().where(WebSession.id_hash == row.id_hash).execute()
        return None
    if t - row.last_seen_at > TOUCH_INTERVAL_S:
        WebSession.update(last_seen_at=t).where(WebSession.id_hash == row.id_hash).execute()
    return _session(row, row.user)


def end_session(cookie: str | None) -> bool:
    """End the session of a cookie value; True if there was one."""
    if not cookie or len(cookie) > 128:
        return False
    return WebSession.delete().where(WebSession.id_hash == hash_token(cookie)).execute() > 0


def prune_sessions() -> int:
    """Delete sessions past their absolute or idle limit; returns how many."""
    t = now()
    return (
        WebSession.delete()
        .where((WebSession.expires_at <= t) | (WebSession.last_seen_at <= t - IDLE_TIMEOUT_S))
        .execute()
    )


def csrf_matches(session: Session, presented: str | None) -> bool:
    """Whether ``presented`` is the session's CSRF token (constant-time)."""
    return bool(presented) and hmac.compare_digest(
        session.csrf_token.encode(), str(presented).encode()
    )


# -- login and rate limiting -------------------------------------------------------------


def _retry_after(field, value: str, limit: int, t: float) -> int | None:
    since = t - FAILURE_WINDOW_S
    recent = list(
        LoginFailure.select(LoginFailure.ts)
        .where((field == value) & (LoginFailure.ts > since))
        .order_by(LoginFailure.ts.desc())
        .limit(limit)
        .tuples()
    )
    if len(recent) < limit:
        return None
    # Attempts open again when the limit-th newest failure leaves the window.
    return max(1, math.ceil(recent[-1][0] + FAILURE_WINDOW_S - t))


def login_retry_after(username: str, remote: str) -> int | None:
    """Seconds until a login for ``username`` from ``remote`` may be tried, or None."""
    t = now()
    waits = [
        _retry_after(LoginFailure.username, username[:64], MAX_USER_FAILURES, t),
        _retry_after(LoginFailure.remote, (remote or "")[:64], MAX_REMOTE_FAILURES, t),
    ]
    waits = [w for w in waits if w is not None]
    return max(waits) if waits else None


def record_login_failure(username: str, remote: str) -> None:
    """Record a failed login and prune failures older than the window."""
    t = now()
    LoginFailure.delete().where(LoginFailure.ts <= t - FAILURE_WINDOW_S).execute()
    LoginFailure.create(ts=t, username=username[:64], remote=(remote or "")[:64])


class LoginThrottled(Exception):
    """Too many failed logins: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins; try again in {retry_after} s")
        self.retry_after = retry_after


def login(username: str, password: str, remote: str = "") -> tuple[str, Session] | None:
    """Check a user name and password and start a session: (cookie value, session).

    None for a wrong name or password (recorded as a failure); `LoginThrottled`
    while the name or address is locked out, before the password is looked at.
    """
    wait = login_retry_after(username, remote)
    if wait is not None:
        raise LoginThrottled(wait)
    user = User.get_or_none(User.name == username)
    stored = user.password_hash if user is not None and user.password_hash else None
    ok = verify_password(password, stored or _dummy_hash()) and stored is not None
    if user is None or not ok or user.disabled_at is not None:
        record_login_failure(username, remote)
        return None
    LoginFailure.delete().where(LoginFailure.username == username).execute()
    prune_sessions()
    cookie, session = create_session(user, remote)
    audit(f"user:{username}", "session.login", f"user:{username}", remote=remote)
    return cookie, session
