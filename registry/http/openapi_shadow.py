"""OpenAPI paths of the shadow-comparison API (`flowfleet.registry.http.shadow_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import (
    BAD,
    DEVICE,
    DEVICE_PATH,
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

_INT = {"type": "integer", "minimum": 0}
_RATIO_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_NAME_OR_NULL = {"type": ["string", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}

CAMERA_PATH = _param("camera", "path", {"type": "string", "pattern": NAME}, "camera name")
CAMERA = _param("camera", "query", {"type": "string", "pattern": NAME}, "only this camera")

REQUEST = {
    "type": "object",
    "required": ["device", "camera", "model", "version", "share", "desired_version"],
    "properties": {
        "device": {"type": "string"},
        "camera": {"type": "string"},
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "share": {**_RATIO_OR_NULL, "description": "null: the agent's default"},
        "desired_version": {"type": "integer"},
        "created_at": {"type": "number"},
        "actor": {"type": "string"},
        "reason": {"type": "string"},
        "command_id": {"type": "integer"},
    },
}

MODEL = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string"},
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "sha256": {"type": "string"},
    },
}

WINDOW = {
    "type": "object",
    "description": "one camera's comparison window as the device sent it "
    "(docs/protocol.md#shadow), plus received_at",
    "required": [
        "device",
        "seq",
        "camera",
        "start",
        "end",
        "active",
        "candidate",
        "share",
        "frames",
        "frames_compared",
        "boxes_active",
        "boxes_candidate",
        "matched",
        "received_at",
    ],
    "properties": {
        "device": {"type": "string"},
        "seq": {"type": "integer"},
        "camera": {"type": "string"},
        "start": {"type": "number"},
        "end": {"type": "number"},
        "active": MODEL,
        "candidate": MODEL,
        "share": {"type": "number"},
        "frames": _INT,
        "frames_compared": _INT,
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "line": {"type": "string"},
                    "class": {"type": "string"},
                    "active_in": _INT,
                    "active_out": _INT,
                    "candidate_in": _INT,
                    "candidate_out": _INT,
                },
            },
        },
        "detections_per_frame_active": {"type": "number"},
        "detections_per_frame_candidate": {"type": "number"},
        "boxes_active": _INT,
        "boxes_candidate": _INT,
        "matched": _INT,
        "agreement": {"type": "number", "minimum": 0, "maximum": 1},
        "latency_ms_active": {"type": "number"},
        "latency_ms_candidate": {"type": "number"},
        "received_at": {"type": "number"},
    },
}

AGREEMENT = {
    "type": "object",
    "required": ["device", "camera", "since", "windows", "agreement"],
    "properties": {
        "device": {"type": "string"},
        "camera": {"type": "string"},
        "since": {"type": "number"},
        "windows": _INT,
        "frames": _INT,
        "frames_compared": _INT,
        "boxes_active": _INT,
        "boxes_candidate": _INT,
        "matched": _INT,
        "agreement": {**_RATIO_OR_NULL, "description": "2 x matched / all boxes; null: none"},
        "lowest_window_agreement": _RATIO_OR_NULL,
        "first_start": {"type": ["number", "null"]},
        "last_end": {"type": ["number", "null"]},
    },
}

_CHANGED = {
    "type": "object",
    "required": ["shadow", "desired", "topic", "command"],
    "properties": {
        "shadow": REQUEST,
        "desired": {"type": "object"},
        "topic": {"type": "string"},
        "command": _ref("Command"),
    },
}

SHADOW_BODY = json_body(
    {
        "model": {"type": "string", "pattern": NAME},
        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "alias": {"type": "string", "pattern": NAME},
        "share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "reason": {"type": "string"},
    },
    required=("model",),
)


def shadow_paths() -> dict[str, Any]:
    viewer = [{"bearer": []}]
    listing = _paged("windows", WINDOW)
    listing["properties"]["requests"] = {"type": "array", "items": REQUEST}
    return {
        "/api/shadow": {
            "get": {
                "summary": "Shadow-comparison windows, newest first, and current requests",
                "security": viewer,
                "parameters": [DEVICE, CAMERA, LIMIT, OFFSET],
                "responses": {
                    "200": _json(listing, "a page of windows"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/shadow/agreement": {
            "get": {
                "summary": "One camera's shadow windows since a time, pooled (the count gate)",
                "security": viewer,
                "parameters": [
                    _param("device", "query", {"type": "string", "pattern": NAME}, "device", True),
                    _param("camera", "query", {"type": "string", "pattern": NAME}, "camera", True),
                    _param(
                        "since",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 4_102_444_800},
                        "windows starting at or after (epoch seconds; default 0)",
                    ),
                ],
                "responses": {
                    "200": _json(AGREEMENT, "the pooled figures"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/devices/{device}/cameras/{camera}/shadow": {
            "post": {
                "summary": "Run a model version in shadow beside a camera's model (operator)",
                "description": "Stores the request and queues the device's whole desired "
                "state (its deployments plus every shadow entry) with the next desired "
                "version, as a deploy does. The device verifies and runs the candidate on "
                "'share' of the frames (absent: its configured default), never counting "
                "with it, and reports windows on {root}/devices/{device}/shadow.",
                "security": viewer,
                "parameters": [DEVICE_PATH, CAMERA_PATH],
                "requestBody": SHADOW_BODY,
                "responses": {
                    "201": _json(_CHANGED, "requested; the desired state published or queued"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model, version or alias"),
                    "409": _error("the version has no signature, or the device cannot run it"),
                    "415": _error("not JSON"),
                    "503": _error("no command publisher for the desired state"),
                },
            },
            "delete": {
                "summary": "Stop a camera's shadow comparison (operator)",
                "security": viewer,
                "parameters": [DEVICE_PATH, CAMERA_PATH, REASON],
                "responses": {
                    "200": _json(_CHANGED, "stopped; the desired state published or queued"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("the camera runs no shadow comparison"),
                    "503": _error("no command publisher for the desired state"),
                },
            },
        },
    }
