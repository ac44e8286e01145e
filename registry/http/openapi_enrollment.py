"""OpenAPI paths of enrollment by claim (`flowfleet.registry.http.enrollment_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import BAD, DEVICE_PATH, NAME, REASON, UNAUTH, _error, _json, _param, json_body

TOKEN_PATH = _param(
    "token_id",
    "path",
    {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
    "bootstrap token id",
)
OFF = {"503": _error("this registry does not enroll devices (no [enrollment])")}
LIMITED = {
    "429": {
        **_error("too many attempts from this source address or with this token"),
        "headers": {
            "Retry-After": {
                "schema": {"type": "integer", "minimum": 1},
                "description": "seconds until an attempt is counted again",
            }
        },
    }
}

TOKEN = {
    "type": "object",
    "required": ["id", "prefix", "state", "max_uses", "uses", "expires_at", "devices"],
    "properties": {
        "id": {"type": "integer"},
        "prefix": {"type": "string", "description": "the token's first characters"},
        "label": {"type": "string"},
        "group": {"type": ["string", "null"]},
        "max_uses": {"type": "integer"},
        "uses": {"type": "integer"},
        "auto_accept": {"type": "boolean"},
        "has_template": {"type": "boolean"},
        "created_at": {"type": "number"},
        "created_by": {"type": "string"},
        "expires_at": {"type": "number"},
        "revoked_at": {"type": ["number", "null"]},
        "state": {"enum": ["active", "used", "expired", "revoked"]},
        "devices": {"type": "array", "items": {"type": "string"}},
    },
}
NEW_TOKEN = {
    **TOKEN,
    "required": [*TOKEN["required"], "token"],
    "properties": {
        **TOKEN["properties"],
        "token": {"type": "string", "description": "the secret, shown once"},
    },
}
ENROLLED = {
    "type": "object",
    "required": ["device", "certificate", "ca", "keys", "agent_config", "registration"],
    "properties": {
        "device": {"type": "string"},
        "certificate": {"type": "string", "description": "PEM, CN = device id"},
        "ca": {"type": "string", "description": "the fleet CA (PEM)"},
        "keys": {"type": "object", "description": "the registry's public signing keys"},
        "agent_config": {"type": "string", "description": "agent.toml"},
        "registration": {"enum": ["registered", "unregistered"]},
        "serial": {"type": "string"},
        "not_after": {"type": "number"},
        "group": {"type": ["string", "null"]},
        "device_token": {
            "type": "string",
            "description": "the device's API token (model downloads), shown once",
        },
        "auth": {"enum": ["mtls", "password"]},
        "broker_password": {
            "type": "string",
            "description": "with auth=password: the device's broker password, shown once",
        },
        "broker_reloaded": {
            "type": "boolean",
            "description": "with broker_auth: the broker's files changed and it was reloaded",
        },
    },
}


def enrollment_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    return {
        "/api/enroll": {
            "post": {
                "summary": "A device claims its identity with a bootstrap token and a CSR",
                "description": "No Authorization header: the bootstrap token in the body "
                "authenticates. The CSR's common name must be the device id; its key "
                "stays on the device. Refused (changing nothing): an unknown, revoked, "
                "expired or used-up token (401); an existing device id unless an "
                "operator allowed its re-enrollment (409).",
                "requestBody": json_body(
                    {
                        "token": {"type": "string"},
                        "device": {"type": "string", "pattern": NAME},
                        "csr": {"type": "string", "description": "PEM"},
                        "auth": {
                            "enum": ["mtls", "password"],
                            "description": "password: the broker's password listener "
                            "(enrollment.broker_password_port); default mtls",
                        },
                    },
                    required=("token", "device", "csr"),
                ),
                "responses": {
                    "201": _json(ENROLLED, "the device's certificate and config"),
                    **BAD,
                    "401": _error("the bootstrap token is unknown, revoked, expired or used up"),
                    "409": _error("the device exists and may not enroll again"),
                    "415": _error("not JSON"),
                    **LIMITED,
                    **OFF,
                },
            }
        },
        "/api/renew": {
            "post": {
                "summary": "A device renews its certificate (same key, proof by the CSR)",
                "description": "No Authorization header: the current certificate (issued "
                "by the fleet CA, neither revoked nor expired) and a CSR signed by its key "
                "authenticate. The new certificate has the same CN and key.",
                "requestBody": json_body(
                    {
                        "certificate": {"type": "string", "description": "PEM, current"},
                        "csr": {"type": "string", "description": "PEM, same key"},
                    },
                    required=("certificate", "csr"),
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["device", "certificate", "serial", "not_after"],
                            "properties": {
                                "device": {"type": "string"},
                                "certificate": {"type": "string"},
                                "cn": {"type": ["string", "null"]},
                                "serial": {"type": "string"},
                                "not_after": {"type": "number"},
                                "issuer": {"type": "string"},
                            },
                        },
                        "the new certificate",
                    ),
                    **BAD,
                    "401": _error("a foreign, revoked or expired certificate"),
                    "415": _error("not JSON"),
                    **LIMITED,
                    **OFF,
                },
            }
        },
        "/api/enrollment-tokens": {
            "get": {
                "summary": "Bootstrap tokens (never their secrets; operator)",
                "security": bearer,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["tokens"],
                            "properties": {"tokens": {"type": "array", "items": TOKEN}},
                        },
                        "every bootstrap token",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            },
            "post": {
                "summary": "Create a bootstrap token (admin); the answer has it once",
                "security": bearer,
                "requestBody": json_body(
                    {
                        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 7776000},
                        "max_uses": {"type": "integer", "minimum": 1, "maximum": 10000},
                        "group": {"type": "string", "pattern": NAME},
                        "auto_accept": {"type": "boolean"},
                        "agent_template": {"type": "string"},
                        "label": {"type": "string", "maxLength": 128},
                    }
                ),
                "responses": {
                    "201": _json(NEW_TOKEN, "the token"),
                    **BAD,
                    **UNAUTH,
                    "415": _error("not JSON"),
                    **OFF,
                },
            },
        },
        "/api/enrollment-tokens/{token_id}/revoke": {
            "post": {
                "summary": "Revoke a bootstrap token (admin)",
                "security": bearer,
                "parameters": [TOKEN_PATH, REASON],
                "responses": {
                    "200": _json(TOKEN, "the token, revoked"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown token"),
                },
            }
        },
        "/api/devices/{device}/reenroll": {
            "post": {
                "summary": "Allow one more enrollment of an existing device id, for a day (admin)",
                "security": bearer,
                "parameters": [DEVICE_PATH, REASON],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["device", "expires_at"],
                            "properties": {
                                "device": {"type": "string"},
                                "expires_at": {"type": "number"},
                            },
                        },
                        "allowed",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/devices/{device}/revoke": {
            "post": {
                "summary": "Revoke a device's certificates and reload the broker (admin)",
                "security": bearer,
                "parameters": [DEVICE_PATH, REASON],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["device", "revoked", "broker_reloaded"],
                            "properties": {
                                "device": {"type": "string"},
                                "revoked": {"type": "array", "items": {"type": "string"}},
                                "password_revoked": {"type": "boolean"},
                                "broker_reloaded": {"type": "boolean"},
                            },
                        },
                        "revoked (serials)",
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("the device has no live certificate"),
                    **OFF,
                },
            }
        },
        "/api/devices/{device}/broker-password": {
            "post": {
                "summary": "A new broker password for a known device (admin); shown once",
                "description": "For the broker's password listener; the registry keeps "
                "only its hash, rewrites the password file and reloads the broker "
                "(enrollment.broker_auth).",
                "security": bearer,
                "parameters": [DEVICE_PATH, REASON],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["device", "username", "password"],
                            "properties": {
                                "device": {"type": "string"},
                                "username": {"type": "string"},
                                "password": {"type": "string"},
                                "port": {"type": ["integer", "null"]},
                                "broker_reloaded": {"type": "boolean"},
                            },
                        },
                        "the password, once",
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                    "409": _error(
                        "the device was revoked, or this registry does not manage broker "
                        "passwords (no enrollment.broker_auth)"
                    ),
                    **OFF,
                },
            }
        },
    }
