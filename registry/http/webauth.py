"""Web login, logout and the models page with its upload form (a Flask blueprint).

Routes:
    GET  /login          the login form
    POST /login          check the user name and password; start a session (303 to ``next``)
    POST /logout         end the session (303 to /login)
    GET  /models         models and their versions; an upload form for operators
    POST /models/upload  register an uploaded file as a new version (operator)

The login form is protected against cross-site posts by a double-submit cookie
(`websession.LOGIN_CSRF_COOKIE` must equal the form's ``csrf_token``); every other
form carries the session's own CSRF token, which `flowfleet.registry.http.access` checks
before the view runs (logout checks it itself: it is reachable without a session).
Cookies are HttpOnly, SameSite=Lax, path ``/`` and Secure when the request came over
HTTPS (behind a TLS-terminating proxy, set ``http.proxy_hops`` so the app sees the
scheme: `flowfleet.registry.http.server.TrustedProxyFix`).
"""

from __future__ import annotations

import hmac
import secrets

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for

from ..catalog.modelreg import MAX_PAGE, ModelRegistry, RegistryError, check_filename, check_name
from ..errors import comma_list
from ..store.audit import audit
from . import websession
from .access import CSRF_FIELD, presented_csrf_token, requires
from .auth import ROLES, Principal

bp = Blueprint("webauth", __name__)

# Versions shown per model on the models page (newest first).
VERSIONS_SHOWN = 20
LOGIN_CSRF_MAX_AGE_S = 3600


def _set_cookie(resp: Response, name: str, value: str, max_age: float | None) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=int(max_age) if max_age is not None else None,
        path="/",
        secure=request.is_secure,
        httponly=True,
        samesite="Lax",
    )


def _safe_next(target: str | None) -> str:
    """A local path to go to after login (never another site)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("webauth.models")


def error_page(status: int, message: str):
    """An HTML error page for a browser (401 and 403 outside /api)."""
    from .webui import render_error

    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="flowfleet-registry"'
    return render_error(status, message, headers)


def _login_form(error: str = "", status: int = 200, retry_after: int | None = None) -> Response:
    token = request.cookies.get(websession.LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    resp = Response(
        render_template(
            "login.html",
            error=error,
            csrf_token=token,
            csrf_field=CSRF_FIELD,
            next=_safe_next(request.values.get("next")),
            username=request.form.get("username", ""),
        ),
        status=status,
        mimetype="text/html",
    )
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    _set_cookie(resp, websession.LOGIN_CSRF_COOKIE, token, LOGIN_CSRF_MAX_AGE_S)
    return resp


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The login form (GET); check the credentials and start a session (POST)."""
    if request.method == "GET":
        return _login_form()
    cookie = request.cookies.get(websession.LOGIN_CSRF_COOKIE, "")
    sent = request.form.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        return _login_form("The login form expired or did not come from this site; try again.", 403)
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    remote = request.remote_addr or ""
    try:
        result = websession.login(username, password, remote)
    except websession.LoginThrottled as exc:
        return _login_form(
            f"Too many failed logins; try again in {exc.retry_after} s.", 429, exc.retry_after
        )
    if result is None:
        return _login_form("Wrong user name or password.", 401)
    websession.end_session(request.cookies.get(websession.SESSION_COOKIE))  # no fixation
    secret, _ = result
    resp = redirect(_safe_next(request.form.get("next")), 303)
    _set_cookie(resp, websession.SESSION_COOKIE, secret, websession.MAX_AGE_S)
    resp.delete_cookie(websession.LOGIN_CSRF_COOKIE, path="/")
    return resp


@bp.post("/logout")
def logout():
    """End the session (it must send its CSRF token) and forget the cookie."""
    cookie = request.cookies.get(websession.SESSION_COOKIE)
    session = websession.lookup_session(cookie)
    if session is not None:
        if not websession.csrf_matches(session, presented_csrf_token()):
            raise RegistryError(
                403, "csrf_failed", "logging out needs the session's CSRF token; reload the page"
            )
        websession.end_session(cookie)
        name = session.principal.name
        audit(f"user:{name}", "session.logout", f"user:{name}")
    resp = redirect(url_for("webauth.login"), 303)
    resp.delete_cookie(websession.SESSION_COOKIE, path="/")
    return resp


def _registry() -> ModelRegistry:
    reg = current_app.extensions.get("flowfleet_model_registry")
    if reg is None:
        raise RegistryError(503, "not_configured", "this registry has no model store configured")
    return reg


def _models_page(message: str = "", error: str = "", status: int = 200) -> Response:
    reg = _registry()
    models, total = reg.list_models(MAX_PAGE, 0)
    for m in models:
        m["version_list"], _ = reg.list_versions(m["name"], VERSIONS_SHOWN, 0)
    principal: Principal | None = g.get("principal")
    session: websession.Session | None = g.get("web_session")
    can_upload = session is not None and principal is not None and principal.allows("operator")
    return Response(
        render_template(
            "models.html",
            models=models,
            total=total,
            principal=principal,
            csrf_token=session.csrf_token if session is not None else None,
            csrf_field=CSRF_FIELD,
            can_upload=can_upload,
            message=message,
            error=error,
            roles=ROLES,
        ),
        status=status,
        mimetype="text/html",
    )


@bp.get("/models")
@requires("viewer")
def models():
    """Models and their newest versions; operators with a session get an upload form."""
    return _models_page()


@bp.post("/models/upload")
@requires("operator")
def upload():
    """Register the uploaded file as a new version; the page shows the result or error."""
    reg = _registry()
    principal: Principal = g.principal
    form = request.form
    try:
        name = check_name(form.get("name", "").strip(), "name", "model name")
        upload_file = request.files.get("file")
        if upload_file is None or not upload_file.filename:
            raise RegistryError(400, "missing_field", "choose a model file to upload", "file")
        filename = check_filename(upload_file.filename)
        tags = comma_list(form.get("tags", ""))
        # Target hardware, comma-separated; none given: what the file says (if anything).
        targets = comma_list(form.get("target", ""))
        staged = reg.staged_copy(upload_file.stream)
        try:
            version, created = reg.add_version(
                staged,
                name=name,
                filename=filename,
                actor=f"user:{principal.name}",
                notes=form.get("notes", ""),
                tags=tags,
                target=targets or None,
            )
        finally:
            staged.unlink(missing_ok=True)
    except RegistryError as exc:
        field = f" ({exc.field})" if exc.field else ""
        return _models_page(error=f"Upload refused{field}: {exc.message}", status=exc.status)
    if created:
        message = f"Registered {version.model.name} version {version.version} ({version.runtime})."
        return _models_page(message=message, status=201)
    message = (
        f"These bytes are already registered as {version.model.name} version "
        f"{version.version}; nothing was changed."
    )
    return _models_page(message=message)
