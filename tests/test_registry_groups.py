"""Device groups through the REST API: membership, access, and deploying to a group
with a real broker (each member gets its own retained, signed desired state)."""

# The deployment tests' fixtures are imported below; pytest injects them by name.
# ruff: noqa: F811

from __future__ import annotations

import pytest

from flowfleet.contract import Desired, parse_payload
from flowfleet.registry.http.web import create_app
from tests.test_registry_deploy import (  # noqa: F401 - fixtures
    TFLITE,
    TOPICS,
    Subscriber,
    bearer,
    commands,
    connection,
    tokens,
    upload,
    verified,
)


@pytest.fixture
def client(registry, commands):
    return create_app(registry.db, registry=registry, commands=commands).test_client()


def put_group(client, token, name, devices, **extra):
    return client.put(
        f"/api/groups/{name}", json={"devices": devices, **extra}, headers=bearer(token)
    )


def test_groups_are_created_replaced_listed_and_deleted_with_an_audit_trail(client, tokens):
    op, viewer = tokens["operator"], tokens["viewer"]
    resp = put_group(client, op, "lobby", ["cam-2", "cam-1", "cam-1"], reason="new site")
    assert resp.status_code == 201
    assert resp.get_json()["devices"] == ["cam-1", "cam-2"]
    resp = put_group(client, op, "lobby", ["cam-2", "cam-3"])
    assert resp.status_code == 200 and resp.get_json()["devices"] == ["cam-2", "cam-3"]
    put_group(client, op, "gate", ["cam-9"])

    listed = client.get("/api/groups?limit=1", headers=bearer(viewer)).get_json()
    assert [g["name"] for g in listed["groups"]] == ["gate"]
    assert listed["total"] == 2 and listed["next_offset"] == 1
    got = client.get("/api/groups/lobby", headers=bearer(viewer)).get_json()
    assert got["devices"] == ["cam-2", "cam-3"] and got["created_by"] == "user:operator-user"

    assert client.delete("/api/groups/gate?reason=closed", headers=bearer(op)).status_code == 204
    assert client.get("/api/groups/gate", headers=bearer(viewer)).status_code == 404

    trail = client.get("/api/audit", headers=bearer(op)).get_json()["entries"]
    actions = [(e["action"], e["target"]) for e in reversed(trail) if e["action"][:6] == "group."]
    assert actions == [
        ("group.create", "group:lobby"),
        ("group.update", "group:lobby"),
        ("group.create", "group:gate"),
        ("group.delete", "group:gate"),
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "status", "field"),
    [
        ("put", "/api/groups/lobby", {"devices": ["cam-1"]}, "viewer", 403, None),
        ("put", "/api/groups/lobby", {"devices": ["cam-1"]}, None, 401, None),
        ("put", "/api/groups/lobby", {"devices": ["../x"]}, "operator", 400, "devices"),
        ("put", "/api/groups/lobby", {"devices": "cam-1"}, "operator", 400, "devices"),
        ("put", "/api/groups/lobby", {"devices": [1]}, "operator", 400, "devices"),
        ("put", "/api/groups/lobby", {"members": []}, "operator", 400, "members"),
        ("put", "/api/groups/bad%20name", {"devices": []}, "operator", 400, "group"),
        ("get", "/api/groups/nope", None, "viewer", 404, "group"),
        ("delete", "/api/groups/nope", None, "operator", 404, "group"),
        (
            "post",
            "/api/groups/nope/deployments",
            {"camera": "c", "model": "yolo", "version": 1},
            "operator",
            404,
            "group",
        ),
    ],
)
def test_bad_group_requests_are_refused_and_change_nothing(
    client, tokens, method, path, body, token, status, field
):
    headers = bearer(tokens[token]) if token else {}
    resp = getattr(client, method)(path, json=body, headers=headers)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["field"] == field
    assert client.get("/api/groups", headers=bearer(tokens["viewer"])).get_json()["total"] == 0


def test_deploying_to_a_group_publishes_each_members_signed_desired_state(
    client, tokens, broker, data
):
    op = tokens["operator"]
    upload(client, op, data / "models" / TFLITE, "yolo")
    client.put("/api/models/yolo/aliases/production", json={"version": 1}, headers=bearer(op))
    put_group(client, op, "lobby", ["cam-a", "cam-b"])
    subs = {d: Subscriber(broker, d) for d in ("cam-a", "cam-b")}
    try:
        resp = client.post(
            "/api/groups/lobby/deployments",
            json={"camera": "door", "model": "yolo", "alias": "production", "reason": "go"},
            headers=bearer(op),
        )
        assert resp.status_code == 201, resp.get_json()
        body = resp.get_json()
        assert body["version"] == 1 and body["failed"] == []
        assert [d["device"] for d in body["deployed"]] == ["cam-a", "cam-b"]
        assert body["commands"] == {"published": 2, "queued": 0, "superseded": 0}
        bundle = client.get("/api/keys").get_json()
        for device, sub in subs.items():
            (msg,) = sub.wait(1)
            assert msg.topic == TOPICS.desired(device)
            desired = parse_payload("desired", msg.payload, device=device)
            assert isinstance(desired, Desired) and desired.version == 1
            doc = verified(desired, "door", bundle)
            assert (doc["name"], doc["version"]) == ("yolo", 1)
    finally:
        for sub in subs.values():
            sub.close()

    # An empty group is refused; so is deploying without an operator token.
    put_group(client, op, "empty", [])
    deploy = {"camera": "door", "model": "yolo", "version": 1}
    resp = client.post("/api/groups/empty/deployments", json=deploy, headers=bearer(op))
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "empty_group"
    resp = client.post(
        "/api/groups/lobby/deployments", json=deploy, headers=bearer(tokens["viewer"])
    )
    assert resp.status_code == 403
    listed = client.get("/api/devices/cam-a/deployments", headers=bearer(op)).get_json()
    assert listed["desired_version"] == 1
