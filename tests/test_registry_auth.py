"""API tokens and roles: who may reach which endpoint, on SQLite and PostgreSQL."""

from __future__ import annotations

import io

import pytest

from flowfleet.registry import auth
from flowfleet.registry import db as regdb
from flowfleet.registry.artifacts import LocalStore
from flowfleet.registry.keys import KeyRing
from flowfleet.registry.modelreg import MIB, ModelRegistry
from flowfleet.registry.testing import reset_database
from flowfleet.registry.web import create_app

from .test_registry_models import db_url  # noqa: F401  (a fixture)

TFLITE = "yolov8n_full_integer_quant.tflite"


@pytest.fixture
def registry(db_url, tmp_path):  # noqa: F811
    db = regdb.open_database(db_url)
    reset_database(db)
    reg = ModelRegistry(
        db, LocalStore(tmp_path / "a"), KeyRing(tmp_path / "k"), max_upload_bytes=8 * MIB
    )
    reg.start()
    return reg


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
    monkeypatch.setattr("flowfleet.registry.auth.now", lambda: real_now + 61)
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


def test_no_state_changing_route_is_reachable_without_a_token(app):
    """Every route that accepts POST/PUT/PATCH/DELETE declares operator or admin."""
    for rule in app.url_map.iter_rules():
        if rule.methods & {"POST", "PUT", "PATCH", "DELETE"}:
            view = app.view_functions[rule.endpoint]
            assert getattr(view, "required_role", "admin") in ("operator", "admin"), rule.rule
