"""OpenAPI paths of camera set-up (`flowfleet.registry.http.camsetup_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import BAD, DEVICE_PATH, NAME, UNAUTH, _error, _json, _param, _ref, json_body
from .openapi_shadow import CAMERA_PATH

_COORD = {"type": "number", "minimum": -100_000, "maximum": 100_000}
_POINT = {"type": "array", "items": _COORD, "minItems": 2, "maxItems": 2}
_LINE = {
    "type": "object",
    "required": ["name", "points"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": NAME},
        "points": {**_POINT, "items": _POINT, "description": "A then B; left -> right is in"},
    },
}
_ZONE = {
    "type": "object",
    "required": ["name", "points"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": NAME},
        "points": {"type": "array", "items": _POINT, "minItems": 3, "maxItems": 64},
    },
}
_FOUR = {"type": "array", "items": _POINT, "minItems": 4, "maxItems": 4}
_HOMOGRAPHY = {
    "type": ["object", "null"],
    "required": ["image", "ground"],
    "additionalProperties": False,
    "properties": {
        "image": {**_FOUR, "description": "pixels"},
        "ground": {**_FOUR, "description": "metres"},
    },
}
_GEOMETRY_OR_NULL = {
    "type": ["object", "null"],
    "properties": {
        "lines": {"type": "array", "items": _LINE},
        "zones": {"type": "array", "items": _ZONE},
        "homography": _HOMOGRAPHY,
    },
}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
SETUP = {
    "type": "object",
    "required": ["device", "camera", "desired", "reported", "configured", "state", "snapshot"],
    "properties": {
        "device": {"type": "string"},
        "camera": {"type": "string"},
        "desired": {**_GEOMETRY_OR_NULL, "description": "what was pushed; null: nothing"},
        "desired_version": _INT_OR_NULL,
        "desired_by": {"type": ["string", "null"]},
        "reported": {**_GEOMETRY_OR_NULL, "description": "what the device counts with now"},
        "configured": {**_GEOMETRY_OR_NULL, "description": "what it announced at start"},
        "state": {"enum": ["none", "pending", "applied"]},
        "snapshot": {
            "type": ["object", "null"],
            "properties": {
                "request_id": {"type": "integer"},
                "requested_at": {"type": "number"},
                "requested_by": {"type": "string"},
                "taken_at": _NUM_OR_NULL,
                "width": _INT_OR_NULL,
                "height": _INT_OR_NULL,
                "state": {"enum": ["requested", "received"]},
            },
        },
        "command": _ref("Command"),
    },
}
GEOMETRY_BODY = json_body(
    {
        "lines": {"type": "array", "items": _LINE, "maxItems": 64},
        "zones": {"type": "array", "items": _ZONE, "maxItems": 64},
        "homography": _HOMOGRAPHY,
    }
)
_NOT_FOUND = _error("unknown device, or a camera the device has not announced")


def camsetup_paths() -> dict[str, Any]:
    viewer = [{"bearer": []}]
    base = "/api/devices/{device}/cameras/{camera}"
    params = [DEVICE_PATH, CAMERA_PATH]
    return {
        f"{base}/setup": {
            "get": {
                "summary": "A camera's set-up: desired, reported and configured geometry",
                "security": viewer,
                "parameters": params,
                "responses": {"200": _json(SETUP, "the set-up"), **BAD, **UNAUTH},
            }
        },
        f"{base}/geometry": {
            "put": {
                "summary": "Push lines, zones and a homography to a camera (operator)",
                "description": "Checked with the agent's own config models; an error names "
                "the field and changes nothing. Queues the device's next desired state "
                "(docs/protocol.md#geometry); the agent applies it without a restart.",
                "security": viewer,
                "parameters": params,
                "requestBody": GEOMETRY_BODY,
                "responses": {
                    "200": _json(SETUP, "stored; the desired state published or queued"),
                    **BAD,
                    **UNAUTH,
                    "404": _NOT_FOUND,
                    "415": _error("not JSON"),
                    "503": _error("no command publisher for the desired state"),
                },
            }
        },
        f"{base}/snapshot/request": {
            "post": {
                "summary": "Ask a camera for one calibration snapshot (operator)",
                "security": viewer,
                "parameters": params,
                "responses": {
                    "202": _json(SETUP, "asked; the desired state published or queued"),
                    **BAD,
                    **UNAUTH,
                    "404": _NOT_FOUND,
                    "503": _error("no command publisher for the desired state"),
                },
            }
        },
        f"{base}/snapshot": {
            "get": {
                "summary": "The camera's latest calibration snapshot (signed-in users)",
                "security": viewer,
                "parameters": params,
                "responses": {
                    "200": {
                        "description": "the JPEG",
                        "content": {"image/jpeg": {"schema": {"type": "string"}}},
                    },
                    **BAD,
                    **UNAUTH,
                    "404": _error("no snapshot yet"),
                },
            },
            "put": {
                "summary": "A device's answer to a snapshot request (its own device token)",
                "security": viewer,
                "parameters": [
                    *params,
                    _param(
                        "request",
                        "query",
                        {"type": "integer", "minimum": 1},
                        "the snapshot request id from the desired state",
                        True,
                    ),
                ],
                "requestBody": {
                    "required": True,
                    "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": {
                    "200": _json(SETUP, "stored"),
                    **BAD,
                    **UNAUTH,
                    "409": _error("not asked, or answered already"),
                    "413": _error("over 2 MiB"),
                    "415": _error("not a JPEG"),
                },
            },
        },
    }
