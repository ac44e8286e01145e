"""Web logins, sessions, CSRF and login rate limiting, through the real Flask app on
SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import re

import pytest

from flowfleet.registry.http import auth, websession
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb

TFLITE = "yolov8n_full_integer_quant.tflite"
PASSWORD = "correct horse battery"
SESSION = websession.SESSION_COOKIE


@pytest.fixture
def app(registry):
    return create_app(registry.db, registry=registry, anonymous_read="none")


@pytest.fixture
def users(registry):
    """alice (operator), victor (viewer), both with PASSWORD; nopass (no password)."""
    with registry.db.connection_context():
        for name, role in (("alice", "operator"), ("victor", "viewer"), ("nopass", "viewer")):
            auth.create_user(name, role, actor="test")
        for name in ("alice", "victor"):
            websession.set_password(name, PASSWORD, actor="test")


def login(client, name, password=PASSWORD, remote="10.0.0.1", csrf="cookie"):
    """POST /login as a browser does (GET the form first); returns the response."""
    env = {"REMOTE_ADDR": remote}
    client.get("/login", environ_base=env)
    token = client.get_cookie(websession.LOGIN_CSRF_COOKIE).value
    if csrf == "missing":
        form = {}
    elif csrf == "wrong":
        form = {"csrf_token": token[::-1]}
    else:
        form = {"csrf_token": token}
    form.update(username=name, password=password, next="/models")
    return client.post("/login", data=form, environ_base=env)


def session_csrf(client) -> str:
    """The session's CSRF token, as the models page embeds it."""
    page = client.get("/models").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def logged_in(app, name="alice"):
    client = app.test_client()
    assert login(client, name).status_code == 303
    return client


def test_passwords_are_salted_scrypt_in_a_self_describing_string():
    a, b = websession.hash_password(PASSWORD), websession.hash_password(PASSWORD)
    assert a != b and a.startswith("scrypt$n=16384,r=8,p=1$")
    assert websession.verify_password(PASSWORD, a) and websession.verify_password(PASSWORD, b)
    for stored in (a, "", None, "scrypt$garbage", "md5$x$y$z", a.replace("n=16384", "n=x")):
        assert not websession.verify_password("wrong password", stored)


def test_login_starts_a_session_that_authenticates_pages_and_the_api(app, registry, users):
    client = app.test_client()
    resp = login(client, "alice")
    assert resp.status_code == 303 and resp.headers["Location"] == "/models"
    cookie_header = next(h for h in resp.headers.getlist("Set-Cookie") if h.startswith(SESSION))
    for attribute in ("HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in cookie_header
    assert "Secure" not in cookie_header, "plain HTTP"
    secret = client.get_cookie(SESSION).value
    with registry.db.connection_context():
        (row,) = regdb.WebSession.select()
        assert row.id_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (row.id_hash, row.csrf_token)
        assert row.expires_at - row.created_at == websession.MAX_AGE_S
    page = client.get("/models")
    assert page.status_code == 200 and "alice (operator)" in page.get_data(as_text=True)
    assert client.get("/api/models").status_code == 200
    assert client.get("/api/devices").status_code == 200, "the dashboard, anonymous_read=none"
    assert client.get("/").status_code == 200
    assert client.get("/api/audit").status_code == 200, "an operator endpoint"


def test_session_cookie_is_secure_over_https(app, users):
    client = app.test_client()
    client.get("/login", base_url="https://registry.example")
    token = client.get_cookie(websession.LOGIN_CSRF_COOKIE, domain="registry.example").value
    resp = client.post(
        "/login",
        data={"csrf_token": token, "username": "alice", "password": PASSWORD},
        base_url="https://registry.example",
    )
    assert resp.status_code == 303
    cookie_header = next(h for h in resp.headers.getlist("Set-Cookie") if h.startswith(SESSION))
    assert "Secure" in cookie_header and "HttpOnly" in cookie_header


@pytest.mark.parametrize(
    ("name", "password", "csrf", "status", "words"),
    [
        ("alice", "wrong password", "cookie", 401, "Wrong user name or password"),
        ("mallory", PASSWORD, "cookie", 401, "Wrong user name or password"),
        ("nopass", "", "cookie", 401, "Wrong user name or password"),
        ("alice", PASSWORD, "missing", 403, "did not come from this site"),
        ("alice", PASSWORD, "wrong", 403, "did not come from this site"),
    ],
)
def test_failed_logins_start_no_session(app, registry, users, name, password, csrf, status, words):
    client = app.test_client()
    resp = login(client, name, password, csrf=csrf)
    assert resp.status_code == status
    assert words in resp.get_data(as_text=True)
    assert client.get_cookie(SESSION) is None
    assert client.get("/api/models").status_code == 401
    with registry.db.connection_context():
        assert regdb.WebSession.select().count() == 0
        recorded = regdb.LoginFailure.select().count()
    assert recorded == (1 if status == 401 else 0), "CSRF refusals are not login attempts"


def test_a_disabled_user_cannot_log_in(app, registry, users):
    with registry.db.connection_context():
        auth.disable_user("alice", actor="test")
    assert login(app.test_client(), "alice").status_code == 401


def _version_state(registry):
    with registry.db.connection_context():
        v = regdb.ModelVersion.get()
        aliases = [a.name for a in regdb.Alias.select()]
        return v.notes, aliases, regdb.ModelVersion.select().count()


@pytest.fixture
def seeded(registry, data):
    with registry.db.connection_context():
        registry.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="t")
        registry.set_alias("yolo", "staging", 1, actor="t")


def _upload_form(data, csrf=None, name="yolo2", **fields):
    form = {"name": name, "notes": "from the form", "tags": "a, b", **fields}
    form["file"] = (io.BytesIO((data / "models" / TFLITE).read_bytes()), TFLITE)
    if csrf is not None:
        form["csrf_token"] = csrf
    return form


@pytest.mark.parametrize("csrf", [None, "wrong", ""])
@pytest.mark.parametrize(
    "request_kind", ["patch", "put_alias", "delete_alias", "upload_form", "api_upload"]
)
def test_session_requests_without_the_csrf_token_are_refused_and_change_nothing(
    app, registry, users, seeded, data, csrf, request_kind
):
    client = logged_in(app)
    before = _version_state(registry)
    headers = {} if csrf is None else {"X-CSRF-Token": csrf}
    if request_kind == "patch":
        resp = client.patch("/api/models/yolo/versions/1", json={"notes": "x"}, headers=headers)
    elif request_kind == "put_alias":
        resp = client.put("/api/models/yolo/aliases/prod", json={"version": 1}, headers=headers)
    elif request_kind == "delete_alias":
        resp = client.delete("/api/models/yolo/aliases/staging", headers=headers)
    elif request_kind == "upload_form":
        resp = client.post("/models/upload", data=_upload_form(data, csrf))
    else:
        resp = client.post(
            "/api/models/yolo2/versions",
            data={"file": _upload_form(data)["file"]},
            headers=headers,
        )
    assert resp.status_code == 403
    assert "CSRF token" in resp.get_data(as_text=True)
    assert _version_state(registry) == before


def test_session_requests_with_the_csrf_token_go_through(app, registry, users, seeded):
    client = logged_in(app)
    token = session_csrf(client)
    resp = client.patch(
        "/api/models/yolo/versions/1", json={"notes": "x"}, headers={"X-CSRF-Token": token}
    )
    assert resp.status_code == 200
    assert _version_state(registry)[0] == "x"
    with registry.db.connection_context():
        entry = regdb.AuditEntry.get(regdb.AuditEntry.action == "version.update")
    assert entry.actor == "user:alice"


def test_a_bearer_token_is_not_subject_to_csrf(app, registry, users, seeded):
    with registry.db.connection_context():
        token, _ = auth.create_token("alice", actor="test")
    client = logged_in(app)  # the cookie is there too; the Bearer token wins
    resp = client.patch(
        "/api/models/yolo/versions/1",
        json={"notes": "bearer"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 200


def test_logout_ends_the_session(app, registry, users):
    client = logged_in(app)
    old = client.get_cookie(SESSION).value
    assert client.post("/logout").status_code == 403, "logout needs the CSRF token too"
    assert client.get("/api/models").status_code == 200
    resp = client.post("/logout", data={"csrf_token": session_csrf(client)})
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert client.get_cookie(SESSION) is None
    with registry.db.connection_context():
        assert regdb.WebSession.select().count() == 0
    replay = app.test_client()
    replay.set_cookie(SESSION, old)
    assert replay.get("/api/models").status_code == 401
    page = replay.get("/models")
    assert page.status_code == 401 and "/login?next=/models" in page.get_data(as_text=True)


@pytest.mark.parametrize("how", ["disable_user", "disabled_at only", "new password"])
def test_a_session_stops_working_when_its_user_is_disabled(app, registry, users, how):
    client = logged_in(app)
    assert client.get("/api/models").status_code == 200
    with registry.db.connection_context():
        if how == "disable_user":
            auth.disable_user("alice", actor="test")
        elif how == "new password":
            websession.set_password("alice", "another password", actor="test")
        else:  # the lookup itself refuses a disabled user, whatever else happened
            regdb.User.update(disabled_at=regdb.now()).where(regdb.User.name == "alice").execute()
    assert client.get("/api/models").status_code == 401


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("expires_at", -1.0),  # past the absolute limit
        ("last_seen_at", -websession.IDLE_TIMEOUT_S - 1),  # idle too long
    ],
)
def test_an_expired_session_is_refused_and_deleted(app, registry, users, field, offset):
    client = logged_in(app)
    with registry.db.connection_context():
        regdb.WebSession.update({field: regdb.now() + offset}).execute()
    resp = client.get("/api/models")
    assert resp.status_code == 401
    assert client.get_cookie(SESSION) is None, "the browser is told to forget it"
    with registry.db.connection_context():
        assert regdb.WebSession.select().count() == 0


def test_idle_limit_moves_with_use_and_absolute_limit_does_not(app, registry, users, monkeypatch):
    client = logged_in(app)
    start = regdb.now()
    step = websession.IDLE_TIMEOUT_S * 0.9
    for n in range(1, 10):
        monkeypatch.setattr(websession, "now", lambda n=n: start + n * step)
        ok = client.get("/api/models").status_code == 200
        assert ok == (n * step < websession.MAX_AGE_S), n
        if not ok:
            break


def test_rate_limit_by_user_name_blocks_even_the_right_password(app, registry, users, monkeypatch):
    client = app.test_client()
    for _ in range(websession.MAX_USER_FAILURES):
        assert login(client, "alice", "wrong password").status_code == 401
    resp = login(client, "alice")
    assert resp.status_code == 429
    wait = int(resp.headers["Retry-After"])
    assert 0 < wait <= websession.FAILURE_WINDOW_S
    assert "Too many failed logins" in resp.get_data(as_text=True)
    assert client.get_cookie(SESSION) is None
    assert login(app.test_client(), "victor", remote="10.0.0.1").status_code == 303, (
        "other users from the same address are not locked"
    )
    with registry.db.connection_context():
        assert regdb.LoginFailure.select().count() == websession.MAX_USER_FAILURES
    # Once the window has passed, the right password works and clears the failures.
    later = regdb.now() + wait + 1
    monkeypatch.setattr(websession, "now", lambda: later)
    assert login(client, "alice").status_code == 303
    with registry.db.connection_context():
        assert (
            regdb.LoginFailure.select().where(regdb.LoginFailure.username == "alice").count() == 0
        )


def test_rate_limit_by_address_and_pruning(app, registry, users, monkeypatch):
    client = app.test_client()
    for n in range(websession.MAX_REMOTE_FAILURES):
        assert login(client, f"guess{n}", "x", remote="10.6.6.6").status_code == 401
    resp = login(client, "alice", remote="10.6.6.6")
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 0
    assert login(app.test_client(), "alice", remote="10.7.7.7").status_code == 303
    # A failure after the window prunes the old rows.
    later = regdb.now() + websession.FAILURE_WINDOW_S + 1
    monkeypatch.setattr(websession, "now", lambda: later)
    assert login(client, "nobody", "x", remote="10.6.6.6").status_code == 401
    with registry.db.connection_context():
        assert regdb.LoginFailure.select().count() == 1


def test_upload_via_the_form_creates_a_version(app, registry, users, data):
    client = logged_in(app)
    token = session_csrf(client)
    page = client.get("/models").get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in page and 'name="target"' in page
    resp = client.post("/models/upload", data=_upload_form(data, token, target="rpi5, jetson-orin"))
    text = resp.get_data(as_text=True)
    assert resp.status_code == 201, text
    assert "Registered yolo2 version 1 (tflite)" in text
    with registry.db.connection_context():
        info = registry.version_dict(registry.version("yolo2", 1))
        entry = regdb.AuditEntry.get(regdb.AuditEntry.action == "version.create")
    assert (info["notes"], info["tags"]) == ("from the form", ["a", "b"])
    assert info["metadata"].get("target") == ["jetson-orin", "rpi5"]
    assert entry.actor == "user:alice"
    again = client.post("/models/upload", data=_upload_form(data, token))
    assert again.status_code == 200 and "already registered as yolo2 version 1" in again.get_data(
        as_text=True
    )
    listing = client.get("/models").get_data(as_text=True)
    assert "yolo2" in listing and "from the form" in listing


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"name": "../evil"}, 400, "model name"),
        ({"target": "not a name!"}, 400, "target"),
    ],
)
def test_upload_errors_are_shown_on_the_page(app, registry, users, data, fields, status, words):
    client = logged_in(app)
    resp = client.post("/models/upload", data=_upload_form(data, session_csrf(client), **fields))
    assert resp.status_code == status
    text = resp.get_data(as_text=True)
    assert "Upload refused" in text and words in text
    with registry.db.connection_context():
        assert regdb.ModelVersion.select().count() == 0


def test_a_viewer_session_cannot_upload(app, registry, users, data):
    client = logged_in(app, "victor")
    page = client.get("/models").get_data(as_text=True)
    assert "victor (viewer)" in page and "/models/upload" not in page
    token = session_csrf(client)  # the logout form carries it
    resp = client.post("/models/upload", data=_upload_form(data, token))
    assert resp.status_code == 403 and "operator role" in resp.get_data(as_text=True)
    with registry.db.connection_context():
        assert regdb.ModelVersion.select().count() == 0


def test_pages_need_a_login_and_login_redirects_only_locally(app, users):
    client = app.test_client()
    resp = client.get("/models")
    assert resp.status_code == 401 and "Sign in" in resp.get_data(as_text=True)
    for target, expected in (("//evil.example/x", "/models"), ("/api/models", "/api/models")):
        client.get("/login")
        token = client.get_cookie(websession.LOGIN_CSRF_COOKIE).value
        resp = client.post(
            "/login",
            data={"csrf_token": token, "username": "alice", "password": PASSWORD, "next": target},
        )
        assert resp.headers["Location"] == expected
