"""OpenAPI path of ``GET /api/devices/{device}/health`` (`flowfleet.registry.http.health_api`)."""

from __future__ import annotations

from typing import Any

from ..fleet.health_series import CAMERA_FIGURES, MAX_POINTS, MIN_POINTS, SYSTEM_FIGURES
from .openapi import BAD, DEVICE_PATH, UNAUTH, _error, _json, _param
from .openapi_series import _TIME

_NUMBERS = {"type": "array", "items": {"type": ["number", "null"]}}
_INTEGERS = {"type": "array", "items": {"type": ["integer", "null"]}}

HEALTH_SERIES = {
    "type": "object",
    "required": [
        "device",
        "from",
        "to",
        "step_s",
        "t",
        "beats",
        "outbox_depth",
        "outbox_dropped",
        *(name for name, _ in SYSTEM_FIGURES),
        "cameras",
    ],
    "properties": {
        "device": {"type": "string"},
        "from": {"type": "number"},
        "to": {"type": "number"},
        "step_s": {"type": "number", "description": "bucket width, seconds"},
        "t": {
            "type": "array",
            "items": {"type": "number"},
            "description": "bucket starts (epoch seconds); buckets without a beat are left out",
        },
        "beats": {"type": "array", "items": {"type": "integer"}},
        "outbox_depth": {**_INTEGERS, "description": "the largest in each bucket"},
        "outbox_dropped": {**_INTEGERS, "description": "lifetime counter, the bucket's last"},
        "temperature_c": {**_NUMBERS, "description": "the SoC's, mean (null: not reported)"},
        "load_1m": {**_NUMBERS, "description": "mean"},
        "cpu_percent": {**_NUMBERS, "description": "mean"},
        "cameras": {
            "type": "object",
            "description": "per camera: " + ", ".join(CAMERA_FIGURES) + " (means per bucket)",
            "additionalProperties": {
                "type": "object",
                "required": list(CAMERA_FIGURES),
                "properties": {f: _NUMBERS for f in CAMERA_FIGURES},
            },
        },
    },
}


def health_paths() -> dict[str, Any]:
    return {
        "/api/devices/{device}/health": {
            "get": {
                "summary": "A device's health over time, downsampled (dashboard access)",
                "description": "The device's health beats between from and to (at most 31 "
                "days apart; default the last 24 hours) folded into at most `points` equal "
                "buckets, one list per figure aligned with t.",
                "security": [{"bearer": []}, {}],  # anonymous from localhost by default
                "parameters": [
                    DEVICE_PATH,
                    _param("from", "query", _TIME, "start (default: to minus 24 hours)"),
                    _param("to", "query", _TIME, "end (default: now)"),
                    _param(
                        "points",
                        "query",
                        {"type": "integer", "minimum": MIN_POINTS, "maximum": MAX_POINTS},
                        "most buckets returned (default 300)",
                    ),
                ],
                "responses": {
                    "200": _json(HEALTH_SERIES, "the device's health series"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown device"),
                },
            }
        }
    }
