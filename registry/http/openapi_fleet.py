"""OpenAPI paths of the fleet side: health and metrics, the dashboard's reads (totals,
devices, dead letters, events, drift) and a device's deployments
(`flowfleet.registry.http.fleet_routes`, `flowfleet.registry.http.api`)."""

from __future__ import annotations

from typing import Any

from .openapi import (
    BAD,
    DEPLOYMENT_BODY,
    DEVICE,
    DEVICE_PATH,
    LIMIT,
    NAME,
    OFFSET,
    UNAUTH,
    _error,
    _json,
    _paged,
    _param,
    _ref,
)


def fleet_paths() -> dict[str, Any]:
    viewer = [{"bearer": []}]
    dashboard = [{"bearer": []}, {}]  # anonymous from localhost by default
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: database reachable, ingest counters, pending commands",
                "description": "commands: the commands outbox (desired states not yet "
                "acknowledged by the broker): pending count and the oldest one's age.",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status", "database"],
                            "properties": {
                                "commands": {
                                    "type": "object",
                                    "required": ["pending", "oldest_pending_s"],
                                    "properties": {
                                        "pending": {"type": "integer"},
                                        "oldest_pending_s": {"type": ["number", "null"]},
                                    },
                                }
                            },
                        },
                        "healthy",
                    ),
                    "503": _json({"type": "object"}, "database unreachable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (flowfleet_registry_...), text format",
                "description": "Dashboard access rule: a viewer token, or none when the "
                "anonymous-read policy allows it.",
                "security": viewer,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **UNAUTH,
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/api/keys": {
            "get": {
                "summary": "Public signing keys (the device key bundle)",
                "security": [],
                "responses": {
                    "200": _json(_ref("KeyBundle"), "keys still accepted"),
                    "400": _error("bad parameter"),
                },
            }
        },
        "/api/totals": {
            "get": {
                "summary": "Line and zone totals",
                "security": dashboard,
                "parameters": [DEVICE],
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["device", "lines", "zones"]}, "totals"
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            }
        },
        "/api/devices": {
            "get": {
                "summary": "Devices with state, bins, gaps, reported models and their records",
                "description": "Each item also carries the device's record (registration, "
                "presence, name, tags, site, location, hardware, cameras; see DeviceRecord).",
                "security": dashboard,
                "parameters": [
                    _param(
                        "registration",
                        "query",
                        {"type": "string", "enum": ["registered", "unregistered"]},
                        "only devices accepted by an operator, or only those not yet",
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["devices"],
                            "properties": {"devices": {"type": "array", "items": _ref("Device")}},
                        },
                        "devices",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/dead-letters": {
            "get": {
                "summary": "Rejected messages, newest first",
                "security": dashboard,
                "parameters": [
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                        "how many",
                    ),
                    DEVICE,
                ],
                "responses": {
                    "200": _json({"type": "object", "required": ["dead_letters"]}, "dead letters"),
                    **BAD,
                    **UNAUTH,
                },
            }
        },
        "/api/events": {
            "get": {
                "summary": "Device events, newest first",
                "security": dashboard,
                "parameters": [DEVICE, LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("events", _ref("Event")), "a page of events"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            }
        },
        "/api/drift": {
            "get": {
                "summary": "Drift summaries, newest window first",
                "security": dashboard,
                "parameters": [
                    DEVICE,
                    _param(
                        "camera", "query", {"type": "string", "pattern": NAME}, "only this camera"
                    ),
                    LIMIT,
                    OFFSET,
                ],
                "responses": {
                    "200": _json(_paged("drift", _ref("DriftSummary")), "a page of summaries"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            }
        },
        "/api/devices/{device}/deployments": {
            "get": {
                "summary": "The models a device's cameras are deployed to run",
                "security": [{"bearer": []}],
                "parameters": [DEVICE_PATH],
                "responses": {
                    "200": _json(_ref("Deployments"), "current deployments"),
                    **BAD,
                    **UNAUTH,
                },
            },
            "post": {
                "summary": "Deploy a model version to a camera (operator)",
                "description": "Stores the deployment and, in the same transaction, queues "
                "the device's whole desired state with the next desired version as a "
                "command (retained, on {root}/commands/{device}/desired); the registry "
                "publishes it after commit and retries until the broker acknowledges it. "
                "'command' says whether that happened within about a second (published) "
                "or not yet (queued, for example while the broker is down: the deployment "
                "is accepted and delivered when the broker is back). 503 when the "
                "registry has no command publisher (nothing is stored).",
                "security": [{"bearer": []}],
                "parameters": [DEVICE_PATH],
                "requestBody": DEPLOYMENT_BODY,
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["deployment", "desired", "topic", "command"],
                            "properties": {
                                "deployment": _ref("Deployment"),
                                "desired": {"type": "object"},
                                "topic": {"type": "string"},
                                "command": _ref("Command"),
                            },
                        },
                        "deployed; the desired state published or queued",
                    ),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model, version or alias"),
                    "409": _error("the version has no signature"),
                    "415": _error("not JSON"),
                    "503": _error("no command publisher for the desired state"),
                },
            },
        },
    }
