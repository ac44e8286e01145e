"""OpenAPI path of ``GET /api/drift/verdicts`` (`flowfleet.registry.http.drift_api`)."""

from __future__ import annotations

from typing import Any

from ..fleet.drift_stats import VERDICTS
from .openapi import BAD, DEVICE, NAME, UNAUTH, _json, _param

VERDICT = {
    "type": "object",
    "required": ["id", "summary", "device", "camera", "verdict", "statistics", "thresholds"],
    "properties": {
        "id": {"type": "integer"},
        "summary": {"type": "integer", "description": "the drift summary judged"},
        "activation": {"type": "integer", "description": "the model change it belongs to"},
        "device": {"type": "string"},
        "camera": {"type": "string"},
        "model": {"type": ["string", "null"], "description": "the new model's file"},
        "baseline_model": {"type": ["string", "null"], "description": "the previous model's"},
        "start": {"type": "number"},
        "end": {"type": "number"},
        "verdict": {"enum": list(VERDICTS)},
        "statistics": {
            "type": "object",
            "description": "psi, ks, js, dpf_change, dpf_log_ratio, latency ratios, "
            "confidence_variance, agreement, brightness_shift, blur_ratio (what was judged)",
        },
        "thresholds": {"type": "object", "description": "the sample-sized threshold of each"},
        "breaches": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": "string"},
        "created_at": {"type": "number"},
    },
}


def drift_paths() -> dict[str, Any]:
    return {
        "/api/drift/verdicts": {
            "get": {
                "summary": "The drift judge's verdicts, newest first (viewer)",
                "description": "One verdict per judged window of a camera's new model "
                "against its previous model's baseline; model_drift is a breach confirmed "
                "by k of n windows and rolls the camera back (audit drift.rollback).",
                "security": [{"bearer": []}],
                "parameters": [
                    DEVICE,
                    _param(
                        "camera", "query", {"type": "string", "pattern": NAME}, "only this camera"
                    ),
                    _param("verdict", "query", {"enum": list(VERDICTS)}, "only this verdict"),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                        "page size",
                    ),
                    _param(
                        "before",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 2**62},
                        "ids below this",
                    ),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["verdicts", "next_before"],
                            "properties": {
                                "verdicts": {"type": "array", "items": VERDICT},
                                "next_before": {"type": ["integer", "null"]},
                            },
                        },
                        "a page of verdicts",
                    ),
                    **BAD,
                    **UNAUTH,
                },
            }
        }
    }
