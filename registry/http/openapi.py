"""The OpenAPI 3.1 document served at ``/api/openapi.json``.

Kept next to the routes it describes (`flowfleet.registry.http.api`, `flowfleet.registry.http.web`);
tests check that every route of the app is documented and that responses validate
against the schemas here.
"""

from __future__ import annotations

from typing import Any

from flowfleet import __version__

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def json_body(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A required JSON request body: an object with these properties and no others."""
    schema: dict[str, Any] = {"type": "object"}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = False
    schema["properties"] = properties
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False):
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


MODEL_NAME = _param("name", "path", {"type": "string", "pattern": NAME}, "model name")
VERSION_REF = _param(
    "ref",
    "path",
    {"type": "string", "pattern": NAME},
    "version number, or an alias name for reads",
)
VERSION_NUMBER = _param(
    "ref",
    "path",
    {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"},
    "version number (changes name the version by number, never by alias)",
)
ALIAS = _param("alias", "path", {"type": "string", "pattern": NAME}, "alias name")
LIMIT = _param(
    "limit",
    "query",
    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    "page size",
)
OFFSET = _param(
    "offset",
    "query",
    {"type": "integer", "minimum": 0, "maximum": 2**31 - 1, "default": 0},
    "items to skip",
)
REASON = _param("reason", "query", {"type": "string"}, "why (recorded in the audit trail)")
DEVICE = _param("device", "query", {"type": "string", "pattern": NAME}, "only this device")

DEVICE_PATH = _param("device", "path", {"type": "string", "pattern": NAME}, "device id")

UNAUTH = {"401": _error("no valid token"), "403": _error("the token's role is too low")}
BAD = {"400": _error("invalid parameter")}


# What to deploy: a camera name, a model and exactly one of version or alias.
DEPLOYMENT_BODY = json_body(
    {
        "camera": {"type": "string", "pattern": NAME},
        "model": {"type": "string", "pattern": NAME},
        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "alias": {"type": "string", "pattern": NAME},
        "reason": {"type": "string"},
    },
    required=("camera", "model"),
)


def _paged(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key, "total", "limit", "offset", "next_offset"],
        "properties": {
            key: {"type": "array", "items": item},
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next_offset": {"type": ["integer", "null"]},
        },
    }


SCHEMAS: dict[str, Any] = {
    "Deployment": {
        "type": "object",
        "required": [
            "device",
            "camera",
            "model",
            "version",
            "desired_version",
            "created_at",
            "actor",
            "reason",
        ],
        "properties": {
            "device": {"type": "string"},
            "camera": {"type": "string"},
            "model": {"type": "string"},
            "version": {"type": "integer"},
            "desired_version": {"type": "integer"},
            "created_at": {"type": "number"},
            "actor": {"type": "string"},
            "reason": {"type": "string"},
            "command_id": {
                "type": "integer",
                "description": "in a deploy's answer: the id of the queued desired state",
            },
        },
    },
    "Command": {
        "type": "object",
        "description": "A message to a device in the commands outbox. status: queued "
        "(stored, waiting for the broker's acknowledgement; it is retried until the "
        "broker takes it), published (the broker acknowledged it), superseded (a newer "
        "retained message for the same topic replaced it before it was sent).",
        "required": [
            "id",
            "device",
            "topic",
            "status",
            "created_at",
            "published_at",
            "attempts",
            "last_error",
        ],
        "properties": {
            "id": {"type": "integer"},
            "device": {"type": "string"},
            "topic": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "published", "superseded"]},
            "created_at": {"type": "number"},
            "published_at": {"type": ["number", "null"]},
            "attempts": {"type": "integer"},
            "last_error": {"type": ["string", "null"]},
        },
    },
    "Deployments": {
        "type": "object",
        "required": ["device", "desired_version", "deployments"],
        "properties": {
            "device": {"type": "string"},
            "desired_version": {"type": ["integer", "null"]},
            "deployments": {"type": "array", "items": {"$ref": "#/components/schemas/Deployment"}},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "field"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Model": {
        "type": "object",
        "required": ["name", "created_at", "created_by", "versions", "latest_version", "aliases"],
        "properties": {
            "name": {"type": "string"},
            "created_at": {"type": "number"},
            "created_by": {"type": "string"},
            "versions": {"type": "integer"},
            "latest_version": {"type": ["integer", "null"]},
            "aliases": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "Version": {
        "type": "object",
        "required": [
            "model",
            "version",
            "sha256",
            "size",
            "runtime",
            "filename",
            "metadata",
            "target",
            "notes",
            "tags",
            "aliases",
            "created_at",
            "created_by",
            "manifest",
            "signatures",
            "download_url",
        ],
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "integer", "minimum": 1},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size": {"type": "integer"},
            "runtime": {"type": "string", "enum": ["tflite", "onnx", "eim"]},
            "filename": {"type": "string"},
            "metadata": {
                "type": "object",
                "description": "read from the file: inputs, outputs, quantization, labels...",
            },
            "target": {
                "type": "array",
                "items": {"type": "string"},
                "description": "hardware the model is built for (from the upload's manifest; "
                "an .eim defaults to its ELF CPU architecture); empty when not declared",
            },
            "notes": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "number"},
            "created_by": {"type": "string"},
            "manifest": {
                "type": "string",
                "description": "the exact signed bytes (canonical JSON, UTF-8)",
            },
            "signatures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key_id", "signature"],
                    "properties": {"key_id": {"type": "string"}, "signature": {"type": "string"}},
                },
            },
            "download_url": {"type": "string"},
            "created": {
                "type": "boolean",
                "description": "upload only: false when the bytes were already registered",
            },
            "message": {"type": "string"},
        },
    },
    "Alias": {
        "type": "object",
        "required": ["model", "alias", "version", "updated_at", "updated_by"],
        "properties": {
            "model": {"type": "string"},
            "alias": {"type": "string"},
            "version": {"type": "integer"},
            "updated_at": {"type": "number"},
            "updated_by": {"type": "string"},
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": ["id", "ts", "actor", "action", "target", "reason", "details"],
        "properties": {
            "id": {"type": "integer"},
            "ts": {"type": "number"},
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "target": {"type": "string"},
            "reason": {"type": "string"},
            "details": {"type": "object"},
        },
    },
    "Event": {
        "type": "object",
        "required": [
            "device",
            "seq",
            "ts",
            "type",
            "severity",
            "camera",
            "message",
            "data",
            "received_at",
        ],
        "properties": {
            "device": {"type": "string"},
            "seq": {"type": "integer", "minimum": 1},
            "ts": {"type": "number", "description": "when it happened on the device (epoch s)"},
            "type": {"type": "string", "description": "outbox_dropped, camera_failed, ..."},
            "severity": {"type": "string", "enum": ["info", "warning", "error"]},
            "camera": {"type": ["string", "null"]},
            "message": {"type": "string"},
            "data": {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
            },
            "received_at": {"type": "number"},
        },
    },
    "DriftSummary": {
        "type": "object",
        "required": [
            "device",
            "seq",
            "camera",
            "model",
            "start",
            "end",
            "frames",
            "detections",
            "confidence_hist",
            "detections_per_frame",
            "detections_hist",
            "class_mix",
            "received_at",
        ],
        "description": "one camera's detector window, as in docs/protocol.md (drift summary); "
        "optional figures are null when the device did not send them",
        "properties": {
            "device": {"type": "string"},
            "seq": {"type": "integer", "minimum": 1},
            "camera": {"type": "string"},
            "model": {"type": ["string", "null"]},
            "start": {"type": "number"},
            "end": {"type": "number"},
            "frames": {"type": "integer"},
            "detections": {"type": "integer"},
            "confidence_hist": {"type": "array", "items": {"type": "integer"}},
            "detections_per_frame": {"type": "number"},
            "detections_hist": {"type": "array", "items": {"type": "integer"}},
            "class_mix": {"type": "object", "additionalProperties": {"type": "integer"}},
            "mean_box_area": {"type": ["number", "null"]},
            "latency_ms_p50": {"type": ["number", "null"]},
            "latency_ms_p90": {"type": ["number", "null"]},
            "latency_ms_p99": {"type": ["number", "null"]},
            "brightness": {"type": ["number", "null"]},
            "blur": {"type": ["number", "null"]},
            "received_at": {"type": "number"},
        },
    },
    "Device": {
        "type": "object",
        "required": [
            "device",
            "state",
            "state_since",
            "first_seen",
            "last_seen",
            "agent_version",
            "bins",
            "highest_seq",
            "gaps",
            "health_beats",
            "last_health",
            "dead_letters",
            "reported",
        ],
        "properties": {
            "device": {"type": "string"},
            "state": {"type": "string", "enum": ["online", "offline", "unknown"]},
            "state_since": {"type": ["number", "null"]},
            "first_seen": {"type": "number"},
            "last_seen": {"type": ["number", "null"]},
            "agent_version": {"type": ["string", "null"]},
            "bins": {"type": "integer", "minimum": 0},
            "highest_seq": {"type": ["integer", "null"]},
            "last_bin_at": {
                "type": ["number", "null"],
                "description": "when the newest stored count bin arrived",
            },
            "gaps": {"type": "integer", "minimum": 0},
            "health_beats": {"type": "integer", "minimum": 0},
            "last_health": {"type": ["object", "null"]},
            "dead_letters": {"type": "integer", "minimum": 0},
            "reported": {
                "oneOf": [_ref("Reported"), {"type": "null"}],
                "description": "latest reported state (newest by ts); null when none yet",
            },
        },
    },
    "Reported": {
        "type": "object",
        "required": ["ts", "desired_version", "cameras", "received_at"],
        "description": "what each camera runs, as in docs/protocol.md (reported state); "
        "camera fields the device left out are null",
        "properties": {
            "ts": {"type": "number", "description": "when the device took it (epoch s)"},
            "desired_version": {"type": ["integer", "null"]},
            "cameras": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "camera",
                        "model",
                        "version",
                        "sha256",
                        "file",
                        "update",
                        "update_model",
                        "update_version",
                        "reason",
                        "update_ts",
                    ],
                    "properties": {
                        "camera": {"type": "string"},
                        "model": {"type": ["string", "null"]},
                        "version": {"type": ["integer", "null"]},
                        "sha256": {"type": ["string", "null"]},
                        "file": {"type": ["string", "null"]},
                        "update": {
                            "enum": [
                                "downloading",
                                "verified",
                                "activated",
                                "failed",
                                "rolled_back",
                                None,
                            ]
                        },
                        "update_model": {"type": ["string", "null"]},
                        "update_version": {"type": ["integer", "null"]},
                        "reason": {"type": ["string", "null"]},
                        "update_ts": {"type": ["number", "null"]},
                    },
                },
            },
            "received_at": {"type": "number"},
        },
    },
    "KeyBundle": {
        "type": "object",
        "required": ["keys"],
        "properties": {
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key_id", "public_key", "not_after"],
                    "properties": {
                        "key_id": {"type": "string"},
                        "public_key": {"type": "string", "description": "raw ed25519 key, base64"},
                        "not_after": {"type": ["number", "null"]},
                    },
                },
            }
        },
    },
}


def _paths() -> dict[str, Any]:
    viewer = [{"bearer": []}]
    return {
        "/api/models": {
            "get": {
                "summary": "Models, by name",
                "security": viewer,
                "parameters": [LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("models", _ref("Model")), "a page of models"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/models/{name}": {
            "get": {
                "summary": "One model",
                "security": viewer,
                "parameters": [MODEL_NAME],
                "responses": {
                    "200": _json(_ref("Model"), "the model"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model"),
                },
            }
        },
        "/api/models/{name}/versions": {
            "get": {
                "summary": "Versions of a model, newest first",
                "security": viewer,
                "parameters": [MODEL_NAME, LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("versions", _ref("Version")), "a page of versions"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model"),
                },
            },
            "post": {
                "summary": "Upload a model file as the next version (creates the model if new)",
                "security": [{"bearer": []}],
                "parameters": [MODEL_NAME],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file"],
                                "additionalProperties": False,
                                "properties": {
                                    "file": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "TFLite, ONNX or .eim",
                                    },
                                    "labels": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "labels file, one per line",
                                    },
                                    "notes": {"type": "string"},
                                    "tags": {"type": "string", "description": "comma-separated"},
                                    "target": {
                                        "type": "string",
                                        "description": "target hardware, comma-separated "
                                        "(e.g. rpi5,jetson-orin)",
                                    },
                                    "alias": {"type": "string", "pattern": NAME},
                                    "reason": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(_ref("Version"), "registered as a new version"),
                    "200": _json(
                        _ref("Version"), "these bytes were already registered; the existing version"
                    ),
                    **BAD,
                    **UNAUTH,
                    "413": _error("larger than the upload limit"),
                    "415": _error("not multipart/form-data"),
                    "422": _error("not a model the registry accepts (format, truncated, corrupt)"),
                },
            },
        },
        "/api/models/{name}/versions/{ref}": {
            "get": {
                "summary": "One version, by number or alias",
                "security": viewer,
                "parameters": [MODEL_NAME, VERSION_REF],
                "responses": {
                    "200": _json(_ref("Version"), "the version"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or version"),
                },
            },
            "patch": {
                "summary": "Change notes and/or tags",
                "security": [{"bearer": []}],
                "parameters": [MODEL_NAME, VERSION_NUMBER],
                "requestBody": json_body(
                    {
                        "notes": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "reason": {"type": "string"},
                    }
                ),
                "responses": {
                    "200": _json(_ref("Version"), "updated"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or version"),
                    "415": _error("not JSON"),
                },
            },
            "delete": {
                "summary": "Delete a version and its artifact (refused while aliased)",
                "security": [{"bearer": []}],
                "parameters": [MODEL_NAME, VERSION_NUMBER, REASON],
                "responses": {
                    "204": {"description": "deleted"},
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or version"),
                    "409": _error("the version is aliased"),
                },
            },
        },
        "/api/models/{name}/versions/{ref}/artifact": {
            "get": {
                "summary": "Download the artifact",
                "description": "Supports Range and If-None-Match; sends X-Checksum-Sha256, "
                "Digest, Repr-Digest and ETag (the sha256).",
                "security": viewer,
                "parameters": [MODEL_NAME, VERSION_REF],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "206": {
                        "description": "the requested range",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "304": {"description": "not modified (If-None-Match)"},
                    "416": {"description": "range not satisfiable"},
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or version"),
                },
            }
        },
        "/api/models/{name}/aliases": {
            "get": {
                "summary": "Aliases of a model (name -> version number)",
                "security": viewer,
                "parameters": [MODEL_NAME],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["model", "aliases"],
                            "properties": {
                                "model": {"type": "string"},
                                "aliases": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer"},
                                },
                            },
                        },
                        "aliases",
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model"),
                },
            }
        },
        "/api/models/{name}/aliases/{alias}": {
            "put": {
                "summary": "Point an alias at a version (creates or moves it)",
                "security": [{"bearer": []}],
                "parameters": [MODEL_NAME, ALIAS],
                "requestBody": json_body(
                    {
                        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                        "reason": {"type": "string"},
                    },
                    required=("version",),
                ),
                "responses": {
                    "200": _json(_ref("Alias"), "the alias"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or version"),
                    "415": _error("not JSON"),
                },
            },
            "delete": {
                "summary": "Remove an alias",
                "security": [{"bearer": []}],
                "parameters": [MODEL_NAME, ALIAS, REASON],
                "responses": {
                    "204": {"description": "removed"},
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model or alias"),
                },
            },
        },
        "/api/audit": {
            "get": {
                "summary": "Audit trail, newest first (operator)",
                "security": [{"bearer": []}],
                "parameters": [
                    LIMIT,
                    OFFSET,
                    _param(
                        "target",
                        "query",
                        {"type": "string"},
                        "a target and everything under it, e.g. model:yolo",
                    ),
                ],
                "responses": {
                    "200": _json(_paged("entries", _ref("AuditEntry")), "a page of entries"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
    }


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Paths from several modules; one path may get its methods from several."""
    out: dict[str, Any] = {}
    for part in parts:
        for path, ops in part.items():
            out.setdefault(path, {}).update(ops)
    return out


def openapi_document() -> dict[str, Any]:
    from .openapi_camsetup import camsetup_paths
    from .openapi_devices import device_paths, device_schemas
    from .openapi_drift import drift_paths
    from .openapi_enrollment import enrollment_paths
    from .openapi_fleet import fleet_paths
    from .openapi_groups import group_paths
    from .openapi_health import health_paths
    from .openapi_live import live_paths
    from .openapi_relays import relay_paths
    from .openapi_rollouts import rollout_paths
    from .openapi_series import series_paths
    from .openapi_shadow import shadow_paths
    from .openapi_webhooks import webhook_paths

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flowfleet registry API",
            "version": __version__,
            "description": (
                "Model registry, fleet totals and counts over time, device events and drift, "
                "device groups, audit trail, webhooks. "
                'Errors are {"error": {"code", "message", "field"}}. Tokens: '
                "Authorization: Bearer <token>; roles viewer < operator < admin. A device "
                "token (tokens create --device) may only download the artifacts deployed to "
                "its device, read /api/keys and its own /api/devices/{device}/deployments, "
                "and send the calibration snapshots asked of it (403 otherwise). "
                "A browser session (the ffr_session cookie from /login) "
                "carries its user's role; every POST, PUT, PATCH or DELETE it makes must send "
                "the session's CSRF token in X-CSRF-Token (403 csrf_failed otherwise); "
                "requests with a Bearer token need none."
            ),
        },
        "components": {
            "schemas": {**SCHEMAS, **device_schemas()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "ffr_session",
                    "description": "web login session; state changes also need X-CSRF-Token",
                },
            },
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": _merge(
            _paths(),
            fleet_paths(),
            group_paths(),
            series_paths(),
            device_paths(),
            webhook_paths(),
            drift_paths(),
            shadow_paths(),
            rollout_paths(),
            relay_paths(),
            enrollment_paths(),
            camsetup_paths(),
            health_paths(),
            live_paths(),
        ),
    }
