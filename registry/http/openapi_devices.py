"""OpenAPI paths and schemas of device records (`flowfleet.registry.http.devices_api`,
and the record fields of every item of ``GET /api/devices``)."""

from __future__ import annotations

import copy
from typing import Any

from .openapi import BAD, DEVICE_PATH, NAME, REASON, SCHEMAS, UNAUTH, _error, _json, _ref

NO_NUL = "^[^\\x00]*$"
NULLABLE_NUMBER = {"type": ["number", "null"]}

LOCATION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["latitude", "longitude"],
    "properties": {
        "latitude": {"type": "number", "minimum": -90, "maximum": 90},
        "longitude": {"type": "number", "minimum": -180, "maximum": 180},
    },
    "description": "WGS 84 degrees",
}

# What an operator may set; null clears a field.
EDITABLE = {
    "name": {"type": ["string", "null"], "maxLength": 128, "pattern": NO_NUL},
    "description": {"type": ["string", "null"], "maxLength": 4096, "pattern": NO_NUL},
    "tags": {
        "type": ["array", "null"],
        "maxItems": 32,
        "items": {"type": "string", "pattern": NAME},
    },
    "site": {"type": ["string", "null"], "pattern": NAME},
    "location": {"oneOf": [LOCATION, {"type": "null"}]},
    "reason": {"type": "string", "description": "why (recorded in the audit trail)"},
}

RECORD_PROPERTIES: dict[str, Any] = {
    "registration": {
        "type": "string",
        "enum": ["registered", "unregistered"],
        "description": "unregistered: first seen through telemetry, not accepted yet",
    },
    "accepted_at": NULLABLE_NUMBER,
    "accepted_by": {"type": ["string", "null"]},
    "presence": {
        "type": "string",
        "enum": ["online", "stale", "offline", "unknown"],
        "description": "state, or stale when online (or unknown) and silent for more than "
        "stale_after_s",
    },
    "stale_after_s": {"type": "number"},
    "name": {"type": ["string", "null"]},
    "description": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "site": {"type": ["string", "null"]},
    "location": {"oneOf": [LOCATION, {"type": "null"}]},
    "hardware": {
        "type": ["object", "null"],
        "description": "as the device's online status reported it (docs/protocol.md#status)",
    },
    "cameras": {
        "type": ["array", "null"],
        "items": {"type": "object"},
        "description": "each camera's lines and zones, as the device's status reported them",
    },
    "reported_at": NULLABLE_NUMBER,
}


def device_schemas() -> dict[str, Any]:
    """``Device`` (an item of GET /api/devices) with the record fields, and ``DeviceRecord``."""
    device = copy.deepcopy(SCHEMAS["Device"])
    device["required"] += list(RECORD_PROPERTIES)
    device["properties"].update(RECORD_PROPERTIES)
    record = {
        "type": "object",
        "required": [
            "device",
            "state",
            "state_since",
            "first_seen",
            "last_seen",
            "agent_version",
            *RECORD_PROPERTIES,
        ],
        "properties": {
            "device": {"type": "string"},
            "state": {"type": "string", "enum": ["online", "offline", "unknown"]},
            "state_since": NULLABLE_NUMBER,
            "first_seen": {"type": "number"},
            "last_seen": NULLABLE_NUMBER,
            "agent_version": {"type": ["string", "null"]},
            **RECORD_PROPERTIES,
        },
    }
    return {"Device": device, "DeviceRecord": record}


def _body(extra: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {**(extra or {}), **EDITABLE},
    }
    if required:
        schema["required"] = list(required)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def device_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    record = _ref("DeviceRecord")
    return {
        "/api/devices": {
            "post": {
                "summary": "Register a device before it first connects (operator)",
                "security": bearer,
                "requestBody": _body(
                    {"device": {"type": "string", "pattern": NAME}}, required=("device",)
                ),
                "responses": {
                    "201": _json(record, "registered"),
                    **BAD,
                    **UNAUTH,
                    "409": _error("the registry knows this device already"),
                    "415": _error("not JSON"),
                },
            }
        },
        "/api/devices/{device}": {
            "get": {
                "summary": "One device's record: presence, registration, hardware, cameras",
                "security": bearer,
                "parameters": [DEVICE_PATH],
                "responses": {
                    "200": _json(record, "the device"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            },
            "patch": {
                "summary": "Edit a device's name, description, tags, site, location (operator)",
                "description": "Fields left out are kept; null clears one. Audited as "
                "device.update with the old and new values.",
                "security": bearer,
                "parameters": [DEVICE_PATH],
                "requestBody": _body(),
                "responses": {
                    "200": _json(record, "the device, updated"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                    "415": _error("not JSON"),
                },
            },
        },
        "/api/devices/{device}/accept": {
            "post": {
                "summary": "Accept a device first seen through telemetry (operator)",
                "description": "It is listed as registered from then on; audited as "
                "device.accept. Accepting a registered device changes nothing.",
                "security": bearer,
                "parameters": [DEVICE_PATH, REASON],
                "responses": {
                    "200": _json(record, "the device, registered"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            }
        },
    }
