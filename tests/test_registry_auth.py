"""API tokens and roles: who may reach which endpoint, on SQLite and PostgreSQL."""

from __future__ import annotations

import io

import pytest

from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb

TFLITE = "yolov8n_full_integer_quant.tflite"


@pytest.fixture
def app(registry):
    return create_app(registry.db, registry=registry)


@pytest.fixture
def seeded(registry, data):
    """One model version (so reads have something to find) and a token per role."""
    with registry.db.connection_context():
        registry.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="test")
        tokens = {}
        for role in auth.ROLES:
            auth.create_user(role, role, actor="test")
            tokens[role], _ = auth.create_token(role, actor="test")
    return tokens


def _upload_body():
    return {"file": (io.BytesIO(b"\0\0\0\0TFL3" + b"\0" * 64), "x.tflite")}


# (method, url, least role, json body) for every endpoint that needs a token.
ENDPOINTS = [
    ("GET", "/api/models", "viewer", None),
    ("GET", "/api/models/yolo", "viewer", None),
    ("GET", "/api/models/yolo/versions", "viewer", None),
    ("GET", "/api/models/yolo/versions/1", "viewer", None),
    ("GET", "/api/models/yolo/versions/1/artifact", "viewer", None),
    ("GET", "/api/models/yolo/aliases", "viewer", None),
    ("POST", "/api/models/yolo/versions", "operator", "multipart"),
    ("PATCH", "/api/models/yolo/versions/1", "operator", {"notes": "x"}),
    ("PUT", "/api/models/yolo/aliases/staging", "operator", {"version": 1}),
    ("DELETE", "/api/models/yolo/aliases/staging", "operator", None),
    ("DELETE", "/api/models/yolo/versions/1", "operator", None),
    ("GET", "/api/audit", "operator", None),
]


def call(client, method, url, body, headers):
    kwargs = {"headers": headers}
    if body == "multipart":
        kwargs.update(data=_upload_body(), content_type="multipart/form-data")
    elif body is not None:
        kwargs["json"] = body
    return client.open(url, method=method, **kwargs)


@pytest.mark.parametrize(
    ("method", "url", "least", "body"), ENDPOINTS, ids=[f"{m} {u}" for m, u, _, _ in ENDPOINTS]
)
def test_roles_per_endpoint(app, seeded, method, url, least, body):
    client = app.test_client()
    resp = call(client, method, url, body, {})
    assert resp.status_code == 401, "no token, not even from localhost"
    assert resp.get_json()["error"]["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for role in auth.ROLES:
        resp = call(client, method, url, body, {"Authorization": f"Bearer {seeded[role]}"})
        if auth.ROLES.index(role) < auth.ROLES.index(least):
            assert resp.status_code == 403, (role, resp.get_json())
            assert resp.get_json()["error"]["code"] == "forbidden"
        else:
            assert resp.status_code not in (401, 403), (role, resp.get_json())


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ffr_not-a-real-token",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "ffr_missing_scheme",
        "Bearer garbage",
    ],
)
def test_bad_tokens_are_401(app, seeded, header):
    resp = app.test_client().get("/api/models", headers={"Authorization": header})
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "unauthorized"


def test_revoked_expired_and_disabled_tokens_stop_working(app, registry, seeded, monkeypatch):
    client = app.test_client()
    with registry.db.connection_context():
        revoked, row = auth.create_token("viewer", actor="test", label="ci")
        auth.revoke_token(row.id, actor="test", reason="leaked")
        short, _ = auth.create_token("viewer", actor="test", ttl_s=60)
        other, _ = auth.create_token("operator", actor="test")
        auth.disable_user("operator", actor="test")

    def status(token):
        return client.get("/api/models", headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(revoked) == 401
    assert status(other) == 401
    assert status(short) == 200
    real_now = regdb.now()
    monkeypatch.setattr("flowfleet.registry.http.auth.now", lambda: real_now + 61)
    assert status(short) == 401
    with registry.db.connection_context():
        actions = [e.action for e in regdb.AuditEntry.select().order_by(regdb.AuditEntry.id)]
    assert {"user.create", "token.create", "token.revoke", "user.disable"} <= set(actions)


def test_tokens_are_stored_hashed_and_capped_at_the_users_role(registry):
    with registry.db.connection_context():
        auth.create_user("bob", "operator", actor="test")
        secret, row = auth.create_token("bob", actor="test", role="viewer")
        assert row.token_hash == auth.hash_token(secret) and secret not in row.token_hash
        assert regdb.ApiToken.select().where(regdb.ApiToken.token_hash == secret).count() == 0
        assert auth.authenticate(secret).role == "viewer"
        with pytest.raises(auth.AuthError, match="above"):
            auth.create_token("bob", actor="test", role="admin")
        with pytest.raises(auth.AuthError, match="unknown role"):
            auth.create_user("carol", "root", actor="test")
        with pytest.raises(auth.AuthError, match="already exists"):
            auth.create_user("bob", "viewer", actor="test")
        op_secret, _ = auth.create_token("bob", actor="test")
        auth.set_user_role("bob", "viewer", actor="test")
        assert auth.authenticate(op_secret).role == "viewer", "demotion lowers existing tokens"


@pytest.mark.parametrize(
    ("policy", "remote", "headers", "status"),
    [
        ("local", "127.0.0.1", {}, 200),
        ("local", "::1", {}, 200),
        ("local", "10.1.2.3", {}, 401),
        ("local", "127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}, 401),
        ("none", "127.0.0.1", {}, 401),
        ("all", "10.1.2.3", {}, 200),
    ],
)
def test_dashboard_anonymous_read_policy(registry, policy, remote, headers, status):
    client = create_app(registry.db, registry=registry, anonymous_read=policy).test_client()
    for url in (
        "/api/totals",
        "/api/devices",
        "/api/dead-letters",
        "/api/events",
        "/api/drift",
        "/",
    ):
        resp = client.get(url, headers=headers, environ_base={"REMOTE_ADDR": remote})
        assert resp.status_code == status, url
    # Health, the API description and the public keys never need a token.
    for url in ("/healthz", "/api/openapi.json", "/api/keys"):
        assert client.get(url, environ_base={"REMOTE_ADDR": remote}).status_code == 200


def test_dashboard_with_a_viewer_token_from_anywhere(registry, seeded):
    client = create_app(registry.db, registry=registry, anonymous_read="none").test_client()
    for url in ("/api/devices", "/api/events", "/api/drift"):
        resp = client.get(
            url,
            headers={"Authorization": f"Bearer {seeded['viewer']}"},
            environ_base={"REMOTE_ADDR": "10.9.9.9"},
        )
        assert resp.status_code == 200, url


# Routes that change state without a role: signing in and out, each protected by its
# own CSRF check (tests/test_registry_websession.py).
# Routes that check who calls beyond a role: logging in and out, and a device
# uploading the snapshot it was asked for (its own device token only; any other
# token, whatever its role, gets 403: tests/test_camsetup.py).
SELF_CHECKED = {"webauth.login", "webauth.logout", "camsetup_api.upload_snapshot"}


def test_no_state_changing_route_is_reachable_without_a_token(app):
    """Every route that accepts POST/PUT/PATCH/DELETE declares operator or admin."""
    for rule in app.url_map.iter_rules():
        if rule.methods & {"POST", "PUT", "PATCH", "DELETE"}:
            if rule.endpoint in SELF_CHECKED:
                continue
            view = app.view_functions[rule.endpoint]
            assert getattr(view, "required_role", "admin") in ("operator", "admin"), rule.rule


# -- device tokens -------------------------------------------------------------------

DEV, OTHER = "cam-1", "cam-2"


@pytest.fixture
def fleet(registry, data):
    """An app that deploys (a queue-only command publisher: the desired states stay in
    the commands outbox); yolo v1 and v2, v1 deployed to cam-1 and v2 to cam-2; an
    operator token and a device token per device."""
    app = create_app(registry.db, registry=registry, commands=CommandPublisher(registry.db))
    models = data / "models"
    with registry.db.connection_context():
        registry.add_version(models / TFLITE, name="yolo", filename=TFLITE, actor="test")
        dyn = "yolov8n_int8_dynamic.tflite"
        registry.add_version(models / dyn, name="yolo", filename=dyn, actor="test")
        registry.set_alias("yolo", "staging", 1, actor="test")
        auth.create_user("ops", "operator", actor="test")
        auth.create_user("fleet", "admin", actor="test")
        op, _ = auth.create_token("ops", actor="test")
        devs = {d: auth.create_token("fleet", actor="test", device=d)[0] for d in (DEV, OTHER)}
    client = app.test_client()
    for device, version in ((DEV, 1), (OTHER, 2)):
        resp = client.post(
            f"/api/devices/{device}/deployments",
            json={"camera": "road", "model": "yolo", "version": version},
            headers={"Authorization": f"Bearer {op}"},
        )
        assert resp.status_code == 201, resp.get_json()
    return client, op, devs


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("/api/models/yolo/versions/1/artifact", 200, None),
        ("/api/models/yolo/versions/staging/artifact", 200, None),  # alias -> v1
        ("/api/models/yolo/versions/2/artifact", 403, "model yolo version 2 is not deployed"),
        ("/api/models/yolo/versions/9/artifact", 403, "version 9 is not deployed to device"),
        ("/api/models/nope/versions/1/artifact", 403, "is not deployed to device cam-1"),
        ("/api/keys", 200, None),
        (f"/api/devices/{DEV}/deployments", 200, None),
        (f"/api/devices/{OTHER}/deployments", 403, "device token for device 'cam-1'"),
        ("/api/models", 403, "device token for device 'cam-1'"),
        ("/api/models/yolo/versions/1", 403, "device token"),
        ("/api/audit", 403, "device token"),
        ("/api/devices", 403, "device token"),
        ("/", 403, "device token"),
    ],
)
def test_device_token_reads_only_what_is_deployed_to_it(fleet, url, status, words):
    client, _, devs = fleet
    resp = client.get(url, headers=_bearer(devs[DEV]))
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    if words:
        assert words in resp.get_data(as_text=True)
    if url.endswith("/artifact") and status == 200:
        assert resp.headers["X-Model-Version"] == "1"


def test_device_token_downloads_what_is_deployed_and_nothing_else(fleet, registry):
    client, op, devs = fleet
    v2 = "/api/models/yolo/versions/2/artifact"
    assert client.get(v2, headers=_bearer(devs[OTHER])).status_code == 200
    resp = client.get(v2, headers=_bearer(devs[DEV]))
    assert resp.status_code == 403, "the other device's artifact"
    assert resp.get_json()["error"]["message"] == (
        "model yolo version 2 is not deployed to device cam-1"
    )
    # Deploying v2 to cam-1 (its camera's current row changes) flips what it may fetch.
    resp = client.post(
        f"/api/devices/{DEV}/deployments",
        json={"camera": "road", "model": "yolo", "version": 2},
        headers=_bearer(op),
    )
    assert resp.status_code == 201
    assert client.get(v2, headers=_bearer(devs[DEV])).status_code == 200
    v1 = client.get("/api/models/yolo/versions/1/artifact", headers=_bearer(devs[DEV]))
    assert v1.status_code == 403, "no longer deployed to it"


@pytest.mark.parametrize(
    ("method", "url", "least", "body"), ENDPOINTS, ids=[f"{m} {u}" for m, u, _, _ in ENDPOINTS]
)
def test_device_token_never_passes_a_role_check(fleet, method, url, least, body):
    client, _, devs = fleet
    if url.endswith("/artifact"):
        return  # the one route a device token may use (tested above)
    resp = call(client, method, url, body, _bearer(devs[DEV]))
    assert resp.status_code == 403, resp.get_json()
    assert "device token for device 'cam-1'" in resp.get_json()["error"]["message"]
    deploy = call(
        client,
        "POST",
        f"/api/devices/{DEV}/deployments",
        {"camera": "road", "model": "yolo", "version": 2},
        _bearer(devs[DEV]),
    )
    assert deploy.status_code == 403, "not even deploying to itself"


def test_revoked_device_token_is_refused(fleet, registry):
    client, _, devs = fleet
    url = "/api/models/yolo/versions/1/artifact"
    assert client.get(url, headers=_bearer(devs[DEV])).status_code == 200
    with registry.db.connection_context():
        row = regdb.ApiToken.get(regdb.ApiToken.device == DEV)
        auth.revoke_token(row.id, actor="test", reason="stolen camera")
    resp = client.get(url, headers=_bearer(devs[DEV]))
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "unauthorized"


def test_device_tokens_are_audited_listed_and_take_no_role(registry):
    with registry.db.connection_context():
        auth.create_user("fleet", "operator", actor="test")
        secret, _ = auth.create_token("fleet", actor="test", device=DEV, label="pi")
        principal = auth.authenticate(secret)
        assert principal.device == DEV
        assert not any(principal.allows(role) for role in auth.ROLES)
        (listed,) = auth.list_tokens()
        assert (listed["device"], listed["role"], listed["label"]) == (DEV, None, "pi")
        entry = regdb.AuditEntry.get(regdb.AuditEntry.action == "token.create")
        assert '"device": "cam-1"' in entry.details
        with pytest.raises(auth.AuthError, match="no role"):
            auth.create_token("fleet", actor="test", device=DEV, role="viewer")
        with pytest.raises(auth.AuthError, match="not a valid device id"):
            auth.create_token("fleet", actor="test", device="../etc")
