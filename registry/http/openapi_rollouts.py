"""OpenAPI paths of the staged-rollout API (`flowfleet.registry.http.rollouts_api`)."""

from __future__ import annotations

from typing import Any

from ..store.rollout_tables import DEVICE_STATES, FAILURE_STATES, ROLLOUT_STATES
from .openapi import BAD, LIMIT, NAME, OFFSET, UNAUTH, _error, _json, _paged, _param, json_body

ROLLOUT_PATH = _param(
    "rollout", "path", {"type": "string", "pattern": r"^[1-9][0-9]{0,8}$"}, "rollout id"
)
STATE = _param("state", "query", {"type": "string", "enum": list(ROLLOUT_STATES)}, "only these")
NUMBER = {"type": "number"}
WEEK_S = 7 * 86_400  # the plan's longest soak, timeout and shadow phase
OPT_NUMBER = {"type": ["number", "null"]}
NAMES = {"type": "array", "items": {"type": "string", "pattern": NAME}}

TARGETS = {
    "type": "object",
    "description": "devices, groups and a tag selector (devices with every tag), or all: "
    "true for every device record; resolved once, at creation",
    "additionalProperties": False,
    "properties": {
        "devices": NAMES,
        "groups": NAMES,
        "tags": NAMES,
        "all": {"type": "boolean"},
    },
}

ABORT = {
    "type": "object",
    "description": "abort when, after min_finished devices finished, a failure kind "
    "reaches its percentage of them; more than canary_failures failed canary devices "
    "abort at once",
    "additionalProperties": False,
    "properties": {
        "min_finished": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 5},
        **{
            f"{kind}_percent": {"type": "number", "minimum": 0, "maximum": 100, "default": 20}
            for kind in FAILURE_STATES
        },
        "canary_failures": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0},
    },
}

PLAN = {
    "type": "object",
    "description": "every key optional (defaults: the registry's [rollouts] section, "
    "then the values shown)",
    "additionalProperties": False,
    "properties": {
        "canary": {
            "type": "object",
            "description": "one of: named devices, a count or a percentage picked at random",
            "additionalProperties": False,
            "properties": {
                "devices": NAMES,
                "count": {"type": "integer", "minimum": 0, "maximum": 10_000},
                "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            },
        },
        "waves": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
        "rate_per_minute": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "maximum": 1_000_000,
            "description": "most devices moved per minute in a wave (null: all at once)",
        },
        "rate_growth": {"type": "number", "minimum": 1, "maximum": 100, "default": 1},
        "soak_s": {"type": "number", "minimum": 0, "maximum": WEEK_S, "default": 600},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": WEEK_S, "default": 1800},
        "beat_timeout_s": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 86_400,
            "default": 180,
        },
        "abort": ABORT,
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**53 - 1},
        "shadow_s": {
            "type": "number",
            "minimum": 0,
            "maximum": WEEK_S,
            "default": 0,
            "description": "canaries run the new model in shadow this long before they "
            "move (0: no shadow phase)",
        },
        "shadow_share": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "shadow_min_agreement": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.7},
        "shadow_min_boxes": {"type": "integer", "minimum": 1, "maximum": 10**9, "default": 100},
        "soak_shadow": {
            "type": "boolean",
            "default": False,
            "description": "moved canaries run their previous model in shadow through the "
            "soak (the count-agreement gate's data)",
        },
    },
}

COUNTS = {
    "type": "object",
    "description": "devices by state",
    "additionalProperties": {"type": "integer"},
}

SUMMARY_PROPS: dict[str, Any] = {
    "id": {"type": "integer"},
    "model": {"type": "string"},
    "version": {"type": "integer"},
    "ref": {"type": "string", "description": "the version or alias asked for"},
    "camera": {"type": "string"},
    "state": {"type": "string", "enum": list(ROLLOUT_STATES)},
    "wave": {"type": "integer", "description": "the wave now moving (0: canary)"},
    "waves": {},  # an integer in a summary, the list of waves in a rollout
    "reason": {"type": "string"},
    "created_by": {"type": "string"},
    "created_at": NUMBER,
    "updated_at": NUMBER,
    "finished_at": OPT_NUMBER,
    "devices": COUNTS,
}

SUMMARY = {
    "type": "object",
    "required": list(SUMMARY_PROPS),
    "properties": {**SUMMARY_PROPS, "waves": {"type": "integer", "description": "last wave"}},
}

DEVICE = {
    "type": "object",
    "required": ["device", "state", "reason"],
    "properties": {
        "device": {"type": "string"},
        "state": {"type": "string", "enum": list(DEVICE_STATES)},
        "reason": {"type": "string"},
        "previous": {
            "type": ["object", "null"],
            "description": "what the camera was deployed before the move (null: nothing)",
            "properties": {"model": {"type": "string"}, "version": {"type": "integer"}},
        },
        "desired_version": {"type": ["integer", "null"]},
        "moved_at": OPT_NUMBER,
        "activated_at": OPT_NUMBER,
        "finished_at": OPT_NUMBER,
        "reverted_at": OPT_NUMBER,
        "revert_desired_version": {"type": ["integer", "null"]},
        "shadow_started_at": OPT_NUMBER,
        "shadow_agreement": {"type": ["number", "null"]},
    },
}

ROLLOUT = {
    "type": "object",
    "required": [*SUMMARY_PROPS, "plan", "targets", "seed", "failures", "steps"],
    "properties": {
        **SUMMARY_PROPS,
        "plan": PLAN,
        "targets": TARGETS,
        "seed": {"type": "integer"},
        "wave_started_at": OPT_NUMBER,
        "steps": {"type": "integer"},
        "failures": {
            "type": "object",
            "properties": {k: {"type": "integer"} for k in FAILURE_STATES},
        },
        "waves": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["wave", "canary", "state", "devices"],
                "properties": {
                    "wave": {"type": "integer"},
                    "canary": {"type": "boolean"},
                    "state": {
                        "type": "string",
                        "enum": ["empty", "waiting", "not started", "moving", "done"],
                    },
                    "devices": {"type": "array", "items": DEVICE},
                },
            },
        },
    },
}

CREATE_BODY = json_body(
    {
        "model": {"type": "string", "pattern": NAME},
        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "alias": {"type": "string", "pattern": NAME},
        "camera": {"type": "string", "pattern": NAME},
        "targets": TARGETS,
        "plan": PLAN,
        "reason": {"type": "string"},
    },
    required=("model", "camera", "targets"),
)


def _reason_body() -> dict[str, Any]:
    body = json_body({"reason": {"type": "string"}})
    body["required"] = False
    return body


def _change(summary: str, allowed: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [ROLLOUT_PATH],
            "requestBody": _reason_body(),
            "responses": {
                "200": _json(ROLLOUT, "the rollout"),
                **BAD,
                **UNAUTH,
                "404": _error("unknown rollout"),
                "409": _error(f"the rollout is not {allowed}"),
                "415": _error("not JSON"),
            },
        }
    }


def rollout_paths() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    return {
        "/api/rollouts": {
            "get": {
                "summary": "Staged rollouts, newest first",
                "security": bearer,
                "parameters": [STATE, LIMIT, OFFSET],
                "responses": {
                    "200": _json(_paged("rollouts", SUMMARY), "a page of rollouts"),
                    **BAD,
                    **UNAUTH,
                },
            },
            "post": {
                "summary": "Start a staged rollout of a model version to a camera (operator)",
                "description": "Canary first, then waves; each device must report the model "
                "active and stay healthy for the soak (beats, no probation rollback, no "
                "drift alarm, count agreement when shadow data exists). Abort criteria roll "
                "every moved device back to its previous model. Nothing is created on a "
                "4xx.",
                "security": bearer,
                "requestBody": CREATE_BODY,
                "responses": {
                    "201": _json(ROLLOUT, "created (the rollout job moves the canary)"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown model, version, alias or group"),
                    "409": _error(
                        "no target device, an unsigned version, or a device already in an "
                        "active rollout of that camera"
                    ),
                    "415": _error("not JSON"),
                },
            },
        },
        "/api/rollouts/{rollout}": {
            "get": {
                "summary": "One rollout: plan, waves, each device's state and reason",
                "security": bearer,
                "parameters": [ROLLOUT_PATH],
                "responses": {
                    "200": _json(ROLLOUT, "the rollout"),
                    **BAD,
                    **UNAUTH,
                    "404": _error("unknown rollout"),
                },
            }
        },
        "/api/rollouts/{rollout}/pause": _change(
            "Pause: no more moves; devices in flight are still judged (operator)", "running"
        ),
        "/api/rollouts/{rollout}/resume": _change("Resume a paused rollout (operator)", "paused"),
        "/api/rollouts/{rollout}/abort": _change(
            "Abort and roll every moved device back to its previous model (operator)",
            "running or paused",
        ),
    }
