"""Access control of the registry's web app and API: who may reach which endpoint.

Every request is authorised in `install_auth`'s ``before_request`` hook, by endpoint:

* public (no token): ``/healthz``, ``/api/openapi.json``, ``/api/keys`` (public keys),
  and the web login and logout (``/login``, ``/logout``: they check their own CSRF
  tokens, see `flowfleet.registry.http.webauth`);
* the dashboard (``/``, ``/api/totals``, ``/api/devices``, ``/api/dead-letters``,
  ``/api/events``, ``/api/drift``, ``/api/devices/<id>/health``, ``/api/live``):
  a viewer token, or no token at all when the ``anonymous_read`` policy allows it
  (``"local"``, the default: requests from a loopback address that did not come
  through a proxy; ``"none"``: never; ``"all"``: anyone);
* every other endpoint: a token whose role is at least the one the view declares
  with `requires`; a view that declares nothing needs ``admin`` (fail closed).

Who is asking:

* ``Authorization: Bearer <token>`` (an API token, see `flowfleet.registry.http.auth`);
  a missing or invalid token is a 401 (with ``WWW-Authenticate: Bearer``); a valid
  token with too low a role is a 403.
* A *device token* (bound to one device) passes no role check. It may only download
  the artifact of a version currently deployed to its device (``deployment`` rows;
  an alias is resolved to its version first), read ``/api/keys`` and
  ``/api/devices/<its own id>/deployments``, and send a calibration snapshot asked
  of it (``PUT /api/devices/<its own id>/cameras/<camera>/snapshot``); anything
  else is a 403 naming the device.
* Without an Authorization header, the web session cookie (`flowfleet.registry.
  websession`): the role is the user's. Every POST/PUT/PATCH/DELETE authenticated
  by the cookie must carry the session's CSRF token (form field ``csrf_token`` or
  header ``X-CSRF-Token``), else 403 before anything runs. A Bearer token always
  wins over a cookie and is not subject to CSRF (a browser never adds it by itself).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from flask import Flask, Response, g, request

from ..catalog.modelreg import RegistryError
from . import websession
from .auth import ROLES, Principal, authenticate

ANONYMOUS_READ = ("local", "none", "all")
PUBLIC_ENDPOINTS = {
    "healthz",
    "static",
    "models_api.openapi",
    "models_api.public_keys",
    # The web login (double-submit CSRF cookie) and logout (the session's CSRF token)
    # check their own CSRF tokens.
    "webauth.login",
    "webauth.logout",
    # A device's claim authenticates by the bootstrap token in its body.
    "enrollment_api.enroll",
    # A renewal authenticates by the device's current certificate and its key.
    "enrollment_api.renew",
}
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
DASHBOARD_ENDPOINTS = {
    "index",
    "api_totals",
    "series.api_series",
    "api_devices",
    "api_dead_letters",
    "api_events",
    "api_drift",
    "health_api.api_device_health",
    "live.api_live",
    # The web pages whose data is the dashboard's (their scripts read the API above).
    "ui.map",
    "ui.devices",
    "ui.device",
    "ui.events",
    "metrics",  # Prometheus scrapes with a viewer token, or anonymously per the policy
}


def requires(role: str) -> Callable:
    """Declare the least role a view needs."""
    assert role in ROLES

    def mark(view: Callable) -> Callable:
        view.required_role = role  # type: ignore[attr-defined]
        return view

    return mark


# -- who is asking -------------------------------------------------------------------


def _is_local_request() -> bool:
    if request.headers.get("X-Forwarded-For") or request.headers.get("Forwarded"):
        return False  # came through a proxy: the peer address says nothing
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def _bearer_principal() -> Principal | None:
    header = request.headers.get("Authorization", "")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    principal = authenticate(token.strip())
    if principal is None:
        raise _unauthorized("the token is unknown, expired or revoked")
    return principal


def _session_principal() -> Principal | None:
    cookie = request.cookies.get(websession.SESSION_COOKIE)
    if not cookie:
        return None
    session = websession.lookup_session(cookie)
    if session is None:
        g.drop_session_cookie = True  # ended or expired: the browser may forget it
        return None
    g.web_session = session
    return session.principal


def presented_csrf_token() -> str | None:
    """The CSRF token a request carries (header, or form field of a form post)."""
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.mimetype in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        token = request.form.get(CSRF_FIELD)
    return token


def _check_csrf(session: websession.Session) -> None:
    if not websession.csrf_matches(session, presented_csrf_token()):
        raise RegistryError(
            403,
            "csrf_failed",
            "this request is authenticated by a session cookie and must carry the "
            f"session's CSRF token (form field {CSRF_FIELD!r} or header {CSRF_HEADER})",
        )


def _authorize_device(principal: Principal, endpoint: str) -> None:
    device = principal.device
    if endpoint == "models_api.download":
        return  # the view checks that the version is deployed to the device
    if (
        endpoint in ("models_api.list_deployments", "camsetup_api.upload_snapshot")
        and (request.view_args or {}).get("device") == device
    ):
        return
    raise RegistryError(
        403,
        "forbidden",
        f"this is a device token for device {device!r}: it may only download the models "
        f"deployed to {device!r}, read /api/keys and /api/devices/{device}/deployments, "
        f"and send the snapshots asked of {device!r}",
    )


def install_auth(app: Flask, anonymous_read: str = "local") -> None:
    """Authorise every request of ``app`` (see the module docstring)."""
    if anonymous_read not in ANONYMOUS_READ:
        raise ValueError(f"anonymous_read must be one of {ANONYMOUS_READ}, not {anonymous_read!r}")

    @app.before_request
    def _authorize() -> None:
        endpoint = request.endpoint
        if endpoint is None or endpoint in PUBLIC_ENDPOINTS:
            return  # routing errors (404/405) and public endpoints
        principal = _bearer_principal()
        if principal is None:
            principal = _session_principal()
            if principal is not None and request.method in STATE_CHANGING:
                _check_csrf(g.web_session)
        if principal is not None:
            g.principal = principal
            if principal.device is not None:
                _authorize_device(principal, endpoint)
                return
        if endpoint in DASHBOARD_ENDPOINTS:
            needed = "viewer"
            if principal is None and (
                anonymous_read == "all" or (anonymous_read == "local" and _is_local_request())
            ):
                return
        else:
            view = app.view_functions.get(endpoint)
            needed = getattr(view, "required_role", "admin")
        if principal is None:
            raise _unauthorized(
                "this endpoint needs an API token (Authorization: Bearer <token>) "
                "or a web login (/login)"
            )
        if not principal.allows(needed):
            what = "session's user" if principal.via == "session" else "token"
            raise RegistryError(
                403, "forbidden", f"this needs the {needed} role; the {what} has {principal.role}"
            )

    @app.after_request
    def _forget_session_cookie(resp: Response) -> Response:
        if g.pop("drop_session_cookie", False):
            resp.delete_cookie(websession.SESSION_COOKIE, path="/")
        return resp


class _Unauthorized(RegistryError):
    pass


def _unauthorized(message: str) -> RegistryError:
    return _Unauthorized(401, "unauthorized", message)
