"""REST API for staged rollouts (a Flask blueprint under ``/api/rollouts``).

Reading needs a viewer token; creating, pausing, resuming and aborting an operator
token (declared with `requires`, enforced by `flowfleet.registry.http.access`). The
rollout job (``app.extensions["flowfleet_rollout_job"]``, set by the registry
service) is woken after a change, and runs an abort at once; without it (an app
without the service) the rows wait for a registry that runs the job.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ..errors import RegistryError
from ..fleet import rollouts
from .api import _actor, _json_body, _page, _paged, _registry, query_args, requires, version_ref

bp = Blueprint("rollouts_api", __name__, url_prefix="/api/rollouts")

MAX_ROLLOUT_ID = 2**31 - 1


def _job():
    return current_app.extensions.get("flowfleet_rollout_job")


def _wake() -> None:
    job = _job()
    if job is not None:
        job.wake()


def _rollout_id(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ROLLOUT_ID:
        raise RegistryError(400, "invalid_parameter", f"{raw!r} is not a rollout id", "rollout")
    return int(raw)


def _reason_body() -> str:
    """The optional ``{"reason": ...}`` of a pause, resume or abort (no body: "")."""
    if not request.get_data(cache=True):
        return ""
    return _json_body({"reason": str}).get("reason", "")


@bp.get("")
@requires("viewer")
def list_rollouts():
    args = query_args(("state", "limit", "offset"))
    limit, offset = _page(args)
    items, total = rollouts.page_rollouts(args.get("state"), limit, offset)
    return jsonify(_paged("rollouts", items, total, limit, offset))


@bp.post("")
@requires("operator")
def create_rollout():
    """Create a rollout; the rollout job moves its canary at its next step."""
    query_args(())
    body = _json_body(
        {
            "model": str,
            "version": int,
            "alias": str,
            "camera": str,
            "targets": dict,
            "plan": dict,
            "reason": str,
        },
        required=("model", "camera", "targets"),
    )
    ref = version_ref(body)
    defaults = current_app.extensions.get("flowfleet_rollout_defaults") or {}
    result = rollouts.create_rollout(
        _registry(),
        model=body["model"],
        ref=ref,
        camera=body["camera"],
        targets=body["targets"],
        plan={**defaults, **body.get("plan", {})},
        actor=_actor(),
        reason=body.get("reason", ""),
    )
    _wake()
    resp = jsonify(result)
    resp.status_code = 201
    resp.headers["Location"] = f"/api/rollouts/{result['id']}"
    return resp


@bp.get("/<rollout>")
@requires("viewer")
def get_rollout(rollout: str):
    query_args(())
    return jsonify(rollouts.get_rollout(_rollout_id(rollout)))


@bp.post("/<rollout>/pause")
@requires("operator")
def pause(rollout: str):
    query_args(())
    rid = _rollout_id(rollout)
    result = rollouts.pause_rollout(_registry().db, rid, actor=_actor(), reason=_reason_body())
    return jsonify(result)


@bp.post("/<rollout>/resume")
@requires("operator")
def resume(rollout: str):
    query_args(())
    rid = _rollout_id(rollout)
    result = rollouts.resume_rollout(_registry().db, rid, actor=_actor(), reason=_reason_body())
    _wake()
    return jsonify(result)


@bp.post("/<rollout>/abort")
@requires("operator")
def abort(rollout: str):
    """Abort: every moved device goes back to its previous model (at once when this
    registry runs the rollout job, else at the job's next step)."""
    query_args(())
    rid = _rollout_id(rollout)
    job = _job()
    result = rollouts.abort_rollout(
        _registry().db,
        rid,
        actor=_actor(),
        reason=_reason_body(),
        stepper=job.stepper if job is not None else None,
    )
    return jsonify(result)
