"""OpenAPI paths of the device-group API (`flowfleet.registry.http.groups_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import (
    BAD,
    DEPLOYMENT_BODY,
    LIMIT,
    NAME,
    OFFSET,
    REASON,
    UNAUTH,
    _error,
    _json,
    _paged,
    _param,
    _ref,
    json_body,
)

GROUP_PATH = _param("name", "path", {"type": "string", "pattern": NAME}, "group name")

GROUP = {
    "type": "object",
    "required": ["name", "devices", "created_at", "created_by"],
    "properties": {
        "name": {"type": "string"},
        "devices": {"type": "array", "items": {"type": "string"}},
        "created_at": {"type": "number"},
        "created_by": {"type": "string"},
    },
}

GROUP_DEPLOYMENT = {
    "type": "object",
    "required": ["group", "camera", "model", "version", "deployed", "failed", "commands"],
    "properties": {
        "group": {"type": "string"},
        "camera": {"type": "string"},
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "deployed": {"type": "array", "items": _ref("Deployment")},
        "commands": {
            "type": "object",
            "description": "the deployed devices' desired states by status: published "
            "(acknowledged by the broker within about a second) or queued (published "
            "when the broker can take it)",
            "required": ["published", "queued", "superseded"],
            "properties": {
                "published": {"type": "integer"},
                "queued": {"type": "integer"},
                "superseded": {"type": "integer"},
            },
        },
        "failed": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["device", "error"],
                "properties": {"device": {"type": "string"}, "error": {"type": "string"}},
            },
        },
    },
}


def group_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    return {
        "/api/groups": {
            "get": {
                "summary": "Device groups, by name",
                "security": bearer,
                "parameters": [LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("groups", GROUP), "a page of groups"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/groups/{name}": {
            "get": {
                "summary": "One device group",
                "security": bearer,
                "parameters": [GROUP_PATH],
                "responses": {
                    "200": _json(GROUP, "the group"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown group"),
                },
            },
            "put": {
                "summary": "Create a group or replace its devices (operator)",
                "security": bearer,
                "parameters": [GROUP_PATH],
                "requestBody": json_body(
                    {
                        "devices": {"type": "array", "items": {"type": "string", "pattern": NAME}},
                        "reason": {"type": "string"},
                    },
                    required=("devices",),
                ),
                "responses": {
                    "200": _json(GROUP, "the group, updated"),
                    "201": _json(GROUP, "the group, created"),
                    **BAD,
                    **UNAUTH,
                    "415": _error("not JSON"),
                },
            },
            "delete": {
                "summary": "Delete a group (its devices keep their deployments; operator)",
                "security": bearer,
                "parameters": [GROUP_PATH, REASON],
                "responses": {
                    "204": {"description": "deleted"},
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown group"),
                },
            },
        },
        "/api/groups/{name}/deployments": {
            "post": {
                "summary": "Deploy a model version to a camera on every device of a group",
                "description": "Resolves an alias once, then deploys device by device as "
                "POST /api/devices/{device}/deployments does (each desired state queued "
                "and published after commit). 502 with the same body when some devices "
                "could not be given their new desired state ('failed').",
                "security": bearer,
                "parameters": [GROUP_PATH],
                "requestBody": DEPLOYMENT_BODY,
                "responses": {
                    "201": _json(GROUP_DEPLOYMENT, "deployed to every device"),
                    "502": _json(GROUP_DEPLOYMENT, "deployed to some devices only"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown group, model, version or alias"),
                    "409": _error("the group is empty, or the version has no signature"),
                    "415": _error("not JSON"),
                    "503": _error("no command publisher for desired states"),
                },
            }
        },
    }
