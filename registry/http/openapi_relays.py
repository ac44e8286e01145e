"""OpenAPI paths of the relay API (`flowfleet.registry.http.relays_api`)."""

from __future__ import annotations

from typing import Any

from ..relays.clouds import CLOUDS
from .openapi import BAD, UNAUTH, _error, _json, _param, json_body

RELAY = {"type": "string", "enum": list(CLOUDS)}
MS = {"type": ["number", "null"]}
USAGE = {
    "type": "object",
    "required": ["messages", "publishes", "bytes", "units", "failures", "retries", "parked"],
    "properties": {
        **{
            k: {"type": "integer"}
            for k in ("messages", "publishes", "bytes", "units", "failures", "retries", "parked")
        },
        "latency_ms": {
            "type": "object",
            "properties": {"p50": MS, "p95": MS, "p99": MS},
            "description": "ingest received -> cloud acknowledged (bucket upper edges)",
        },
    },
}
QUOTA = {
    "type": ["object", "null"],
    "description": "a daily quota the relay keeps under (Azure: [relays.azure] tier x "
    "units); null: none. held: messages wait in the outbox for the next UTC day",
    "properties": {
        "tier": {"type": "string"},
        "units": {"type": "integer"},
        "blocks_per_day": {"type": "integer"},
        "block_bytes": {"type": "integer"},
        "used_today": {"type": "integer"},
        "left_today": {"type": "integer"},
        "resets_at": {"type": "number", "description": "next 00:00 UTC, epoch seconds"},
        "held": {"type": "boolean"},
    },
}
RELAY_STATE = {
    "type": "object",
    "required": ["relay", "running", "queued", "parked", "oldest_queued_s", "usage"],
    "properties": {
        "relay": RELAY,
        "running": {"type": "boolean", "description": "its job runs in this process"},
        "queued": {"type": "integer"},
        "parked": {"type": "integer"},
        "oldest_queued_s": {"type": "number"},
        "state": {
            "type": ["object", "null"],
            "properties": {
                "circuit": {"type": "string", "enum": ["closed", "open", "half-open"]},
                "consecutive_failures": {"type": "integer"},
                "retry_in_s": {"type": "number"},
                "last_error": {"type": ["string", "null"]},
                "last_ok_at": {"type": ["number", "null"]},
                "quota": QUOTA,
            },
        },
        "usage": USAGE,
    },
}
PARKED = {
    "type": "object",
    "required": ["id", "relay", "msg_id", "size", "attempts", "parked_at", "reason"],
    "properties": {
        "id": {"type": "integer"},
        "relay": RELAY,
        "msg_id": {"type": "string"},
        "size": {"type": "integer"},
        "attempts": {"type": "integer"},
        "parked_at": {"type": "number"},
        "reason": {"type": "string"},
    },
}
USD = {"type": ["number", "null"], "description": "US dollars per month"}
ESTIMATE = {
    "type": "object",
    "required": ["usd", "unpacked_usd"],
    "properties": {
        "usd": USD,
        "unpacked_usd": {**USD, "description": "the same messages sent one per cloud message"},
        "tier": {
            "type": ["object", "null"],
            "description": "Azure: the cheapest tier that carries the volume",
            "properties": {
                "tier": {"type": "string"},
                "units": {"type": "integer"},
                "usd": {"type": "number"},
            },
        },
        "tiers": {"type": "array", "items": {"type": "object"}, "description": "Azure"},
    },
}
REPORT_ROW = {
    "type": "object",
    "required": [
        "relay",
        "service",
        "price_source",
        "price_as_of",
        "span_s",
        "messages",
        "publishes",
        "bytes",
        "units",
        "failures",
        "retries",
        "parked",
        "latency_ms",
        "monthly",
        "monthly_doubled",
        "advice",
    ],
    "properties": {
        "relay": RELAY,
        "service": {"type": "string"},
        "price_source": {"type": "string"},
        "price_as_of": {"type": "string"},
        "span_s": {"type": "number", "description": "seconds of usage the estimate scales"},
        **{
            k: {"type": "integer"}
            for k in ("messages", "publishes", "bytes", "units", "failures", "retries", "parked")
        },
        "latency_ms": USAGE["properties"]["latency_ms"],
        "monthly": ESTIMATE,
        "monthly_doubled": {**ESTIMATE, "description": "with twice the fleet's volume"},
        "advice": {"type": "string", "description": "which tier or packing costs least"},
        "quota": {**QUOTA, "description": "the relay's daily quota, when it has one"},
    },
}


def relay_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    return {
        "/api/relays": {
            "get": {
                "summary": "Cloud relays: outbox, live state, what they forwarded (viewer)",
                "security": bearer,
                "parameters": [
                    _param(
                        "hours",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 24 * 366},
                        "the period of `usage`: the last hours (default 24)",
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["relays", "hours"],
                            "properties": {
                                "relays": {"type": "array", "items": RELAY_STATE},
                                "hours": {"type": "integer"},
                            },
                        },
                        "relays that run here or have rows or usage",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/relays/report": {
            "get": {
                "summary": "The cloud comparison: volume, quality, latency, monthly bill (viewer)",
                "security": bearer,
                "parameters": [
                    _param(
                        "hours",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 24 * 366},
                        "the period: the last hours (default 168)",
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": [
                                "since",
                                "until",
                                "hours",
                                "price_table_version",
                                "relays",
                            ],
                            "properties": {
                                "since": {"type": "number"},
                                "until": {"type": "number"},
                                "hours": {"type": "integer"},
                                "price_table_version": {"type": ["integer", "string"]},
                                "relays": {"type": "array", "items": REPORT_ROW},
                            },
                        },
                        "relays that forwarded anything in the period",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/relays/parked": {
            "get": {
                "summary": "Parked relay messages with their reasons (operator)",
                "security": bearer,
                "parameters": [
                    _param("relay", "query", RELAY, "only this relay"),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                        "most rows (default 100)",
                    ),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["parked"],
                            "properties": {"parked": {"type": "array", "items": PARKED}},
                        },
                        "newest first",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/relays/{relay}/requeue": {
            "post": {
                "summary": "Send a relay's parked messages again (operator; audited)",
                "security": bearer,
                "parameters": [_param("relay", "path", RELAY, "the relay")],
                "requestBody": json_body({"reason": {"type": "string"}}),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["relay", "requeued"],
                            "properties": {"relay": RELAY, "requeued": {"type": "integer"}},
                        },
                        "how many were requeued",
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown relay"),
                    "415": _error("not JSON"),
                },
            }
        },
    }
