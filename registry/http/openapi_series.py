"""OpenAPI path of ``GET /api/series`` (`flowfleet.registry.http.series_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import BAD, NAME, UNAUTH, _param

_TIME = {
    "type": "string",
    "pattern": r"^([0-9]{1,10}(\.[0-9]+)?|[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)$",
    "description": "epoch seconds or ISO 8601 (no zone: UTC)",
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}

POINT = {
    "type": "object",
    "required": ["t"],
    "properties": {
        "t": {"type": "number", "description": "bucket start, epoch seconds"},
        "in": {"type": "integer"},
        "out": {"type": "integer"},
        "entries": {"type": "integer"},
        "exits": {"type": "integer"},
        "peak_occupancy": {"type": "integer"},
        "dwell_s_sum": _NUMBER_OR_NULL,
        "dwell_n": {"type": "integer"},
        "dwell_mean_s": _NUMBER_OR_NULL,
        "n": {"type": "integer"},
        "mean_kmh": _NUMBER_OR_NULL,
        "max_kmh": _NUMBER_OR_NULL,
        "insufficient": {"type": "integer"},
        "p50_kmh": {**_NUMBER_OR_NULL, "description": "median, from the speed histograms"},
        "p85_kmh": {**_NUMBER_OR_NULL, "description": "85th percentile (histograms)"},
        "p95_kmh": {**_NUMBER_OR_NULL, "description": "95th percentile (histograms)"},
        "hist_n": {
            "type": "integer",
            "description": "tracks the percentiles describe: those of bins that carried a "
            "histogram (null percentiles when 0)",
        },
    },
}

SERIES = {
    "type": "object",
    "required": ["kind", "step", "from", "to", "timezone", "group", "series", "total"],
    "properties": {
        "kind": {"enum": ["lines", "zones", "speeds"]},
        "step": {"enum": ["minute", "hour", "day"]},
        "from": {"type": "number"},
        "to": {"type": "number"},
        "timezone": {"type": "string"},
        "group": {"type": "array", "items": {"type": "string"}},
        "series": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "points", "total"],
                "properties": {
                    "key": {"type": "object"},
                    "points": {"type": "array", "items": POINT},
                    "total": {"type": "object"},
                },
            },
        },
        "total": {"type": "object"},
    },
}


def _name(name: str, what: str) -> dict[str, Any]:
    return _param(name, "query", {"type": "string", "pattern": NAME}, what)


def series_paths() -> dict[str, Any]:
    dashboard = [{"bearer": []}, {}]  # anonymous from localhost by default, like totals
    return {
        "/api/series": {
            "get": {
                "summary": "Counts, zone occupancy or speeds per minute, hour or day",
                "description": (
                    "Buckets of one step over a range, one series per value of `group` "
                    "(default one series over everything matched), with totals. Minutes "
                    "and hours are aligned to UTC, days to midnight in the site timezone. "
                    "A bin counts in the bucket of its window start. Speeds have "
                    "p50/p85/p95 from the added-up histograms of the bins (within one "
                    "bucket width; null where no bin carried one). format=csv gives one "
                    "row per series and bucket."
                ),
                "security": dashboard,
                "parameters": [
                    _param("kind", "query", {"enum": ["lines", "zones", "speeds"]}, "what"),
                    _param("step", "query", {"enum": ["minute", "hour", "day"]}, "bucket size"),
                    _param("from", "query", _TIME, "first bucket: the one holding this time"),
                    _param("to", "query", _TIME, "end (exclusive); default now"),
                    _name("device", "only this device"),
                    _name("camera", "only this camera"),
                    _name("line", "only this line (kinds lines, speeds)"),
                    _name("zone", "only this zone (kind zones)"),
                    _param(
                        "class", "query", {"type": "string", "maxLength": 64}, "only this class"
                    ),
                    _param(
                        "group",
                        "query",
                        {"type": "string", "pattern": "^[a-z,]*$"},
                        "comma list of device, camera, line, zone, class",
                    ),
                    _param("format", "query", {"enum": ["json", "csv"]}, "default json"),
                ],
                "responses": {
                    "200": {
                        "description": "the series",
                        "content": {
                            "application/json": {"schema": SERIES},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **BAD,
                    **UNAUTH,
                },
            }
        }
    }
