"""OpenAPI paths of the webhook API (`flowfleet.registry.http.webhooks_api`)."""

from __future__ import annotations

from typing import Any

from ..fleet import webhook_records as records
from .openapi import (
    BAD,
    LIMIT,
    NAME,
    OFFSET,
    REASON,
    UNAUTH,
    _error,
    _json,
    _paged,
    _param,
    json_body,
)

WEBHOOK_PATH = _param("name", "path", {"type": "string", "pattern": NAME}, "webhook name")
DELIVERY_PATH = _param(
    "delivery", "path", {"type": "string", "pattern": f"^{records.DELIVERY_ID}$"}, "delivery id"
)
PATTERNS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 32,
    "items": {"type": "string", "pattern": f"^{records.PATTERN}$"},
    "description": "shell-style patterns of audit actions (drift.*, rollout.abort); "
    "webhook.* actions match only patterns starting with webhook",
}
URL = {
    "type": "string",
    "pattern": f"^{records.URL_PATTERN}$",
    "maxLength": records.MAX_URL,
    "description": "http(s), printable ASCII (punycode hosts), no user@, port 1-65535",
}

WEBHOOK = {
    "type": "object",
    "required": ["name", "url", "events", "enabled", "created_at", "created_by"],
    "properties": {
        "name": {"type": "string"},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string"}},
        "enabled": {"type": "boolean"},
        "disabled_reason": {"type": ["string", "null"]},
        "created_at": {"type": "number"},
        "created_by": {"type": "string"},
        "updated_at": {"type": ["number", "null"]},
        "deliveries": {
            "type": "object",
            "description": "deliveries by status (shown by GET /api/webhooks/{name})",
            "properties": {
                "pending": {"type": "integer"},
                "delivered": {"type": "integer"},
                "given_up": {"type": "integer"},
            },
        },
    },
}
CREATED = {
    **WEBHOOK,
    "required": [*WEBHOOK["required"], "secret"],
    "properties": {
        **WEBHOOK["properties"],
        "secret": {"type": "string", "description": "the signing secret, shown only now"},
    },
}
STATUS = {"type": "string", "enum": ["pending", "delivered", "given_up"]}
DELIVERY = {
    "type": "object",
    "required": ["id", "webhook", "event", "status", "attempts", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "webhook": {"type": "string"},
        "event": {"type": "string"},
        "audit_entry": {"type": ["integer", "null"], "description": "null for a ping"},
        "status": STATUS,
        "attempts": {"type": "integer"},
        "status_code": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "created_at": {"type": "number"},
        "next_attempt_at": {"type": ["number", "null"]},
        "delivered_at": {"type": ["number", "null"]},
        "given_up_at": {"type": ["number", "null"]},
        "attempt_log": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["number", "started_at", "duration_ms"],
                "properties": {
                    "number": {"type": "integer"},
                    "started_at": {"type": "number"},
                    "duration_ms": {"type": "number"},
                    "status_code": {"type": ["integer", "null"]},
                    "error": {"type": ["string", "null"]},
                },
            },
        },
    },
}
NOT_JSON = {"415": _error("not JSON")}


def webhook_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    unknown = {"404": _error("unknown webhook")}
    return {
        "/api/webhooks": {
            "get": {
                "summary": "Webhooks, by name (admin; secrets are never listed)",
                "security": bearer,
                "parameters": [LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("webhooks", WEBHOOK), "a page of webhooks"),
                    **BAD,
                    **UNAUTH,
                },
            },
            "post": {
                "summary": "Create a webhook (admin); the answer holds its secret, once",
                "security": bearer,
                "requestBody": json_body(
                    {
                        "name": {"type": "string", "pattern": NAME},
                        "url": URL,
                        "events": PATTERNS,
                        "secret": {
                            "type": "string",
                            "minLength": records.MIN_SECRET,
                            "maxLength": records.MAX_SECRET,
                            "pattern": f"^({records.SECRET_PATTERN})$",
                            "description": "generated when left out",
                        },
                        "enabled": {"type": "boolean"},
                        "reason": {"type": "string"},
                    },
                    required=("name", "url", "events"),
                ),
                "responses": {
                    "201": _json(CREATED, "the webhook and its secret"),
                    **BAD,
                    **UNAUTH,
                    "409": _error("a webhook of that name exists"),
                    **NOT_JSON,
                },
            },
        },
        "/api/webhooks/{name}": {
            "get": {
                "summary": "One webhook with its deliveries by status (admin)",
                "security": bearer,
                "parameters": [WEBHOOK_PATH],
                "responses": {"200": _json(WEBHOOK, "the webhook"), **BAD, **UNAUTH, **unknown},
            },
            "patch": {
                "summary": "Change a webhook's URL, patterns or enabled flag (admin)",
                "security": bearer,
                "parameters": [WEBHOOK_PATH],
                "requestBody": json_body(
                    {
                        "url": URL,
                        "events": PATTERNS,
                        "enabled": {"type": "boolean"},
                        "reason": {"type": "string"},
                    }
                ),
                "responses": {
                    "200": _json(WEBHOOK, "the webhook, changed"),
                    **BAD,
                    **UNAUTH,
                    **unknown,
                    **NOT_JSON,
                },
            },
            "delete": {
                "summary": "Delete a webhook and its delivery log (admin)",
                "security": bearer,
                "parameters": [WEBHOOK_PATH, REASON],
                "responses": {"204": {"description": "deleted"}, **BAD, **UNAUTH, **unknown},
            },
        },
        "/api/webhooks/{name}/ping": {
            "post": {
                "summary": "Queue a test ping event for a webhook (admin)",
                "security": bearer,
                "parameters": [WEBHOOK_PATH],
                "responses": {
                    "202": _json(DELIVERY, "the queued delivery"),
                    **BAD,
                    **UNAUTH,
                    **unknown,
                    "409": _error("the webhook is disabled"),
                },
            }
        },
        "/api/webhook-deliveries": {
            "get": {
                "summary": "Webhook deliveries, newest first (admin)",
                "security": bearer,
                "parameters": [
                    _param("webhook", "query", {"type": "string", "pattern": NAME}, "one webhook"),
                    _param("status", "query", STATUS, "one status"),
                    LIMIT,
                    OFFSET,
                ],
                "responses": {
                    "200": _json(_paged("deliveries", DELIVERY), "a page of deliveries"),
                    **BAD,
                    **UNAUTH,
                    **unknown,
                },
            }
        },
        "/api/webhook-deliveries/{delivery}": {
            "get": {
                "summary": "One delivery with its attempt log (admin)",
                "security": bearer,
                "parameters": [DELIVERY_PATH],
                "responses": {
                    "200": _json(DELIVERY, "the delivery"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown delivery"),
                },
            }
        },
        "/api/webhook-deliveries/{delivery}/redeliver": {
            "post": {
                "summary": "Queue a delivery again with a fresh set of attempts (admin)",
                "security": bearer,
                "parameters": [DELIVERY_PATH, REASON],
                "responses": {
                    "202": _json(DELIVERY, "the requeued delivery"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown delivery"),
                    "409": _error("the webhook is disabled"),
                },
            }
        },
    }
