"""REST API for device groups (a Flask blueprint under ``/api/groups``).

Access control is the API's (`flowfleet.registry.http.api.install_auth`): reading needs
a viewer token, changing a group or deploying to it an operator token.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..catalog.modelreg import RegistryError
from ..fleet import groups
from .api import (
    _actor,
    _json_body,
    _page,
    _paged,
    _registry,
    command_outcomes,
    deployment_body,
    deployment_commands,
    query_args,
    requires,
)

bp = Blueprint("groups_api", __name__, url_prefix="/api/groups")


@bp.get("")
@requires("viewer")
def list_groups():
    args = query_args(("limit", "offset"))
    limit, offset = _page(args)
    everything = groups.list_groups()
    return jsonify(
        _paged("groups", everything[offset : offset + limit], len(everything), limit, offset)
    )


@bp.get("/<name>")
@requires("viewer")
def get_group(name: str):
    query_args(())
    return jsonify(groups.get_group(name))


@bp.put("/<name>")
@requires("operator")
def set_group(name: str):
    """Create the group or replace its members."""
    query_args(())
    body = _json_body({"devices": list, "reason": str}, required=("devices",))
    if not all(isinstance(d, str) for d in body["devices"]):
        raise RegistryError(400, "invalid_field", "devices must be a list of strings", "devices")
    group, created = groups.set_group(
        _registry().db, name, body["devices"], actor=_actor(), reason=body.get("reason", "")
    )
    resp = jsonify(group)
    resp.status_code = 201 if created else 200
    return resp


@bp.delete("/<name>")
@requires("operator")
def delete_group(name: str):
    args = query_args(("reason",))
    groups.delete_group(_registry().db, name, actor=_actor(), reason=args.get("reason", ""))
    return "", 204


@bp.post("/<name>/deployments")
@requires("operator")
def deploy_to_group(name: str):
    """Deploy one model version to one camera name on every device of the group.

    201 when every device got its new desired state; 502 with the same body when
    some did not (``failed`` names them and why; deploy again to retry them).
    ``commands`` counts the queued desired states by status (published: the broker
    acknowledged it; queued: it will be published when the broker can take it).
    """
    query_args(())
    groups.members(name)  # 404 for an unknown group before anything else
    body, ref = deployment_body()
    publisher = deployment_commands()
    result = groups.deploy_to_group(
        _registry(),
        name,
        body["camera"],
        body["model"],
        ref,
        actor=_actor(),
        reason=body.get("reason", ""),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    outcomes = command_outcomes(publisher, [row["command_id"] for row in result["deployed"]])
    result["commands"] = {
        status: sum(1 for c in outcomes if c["status"] == status)
        for status in ("published", "queued", "superseded")
    }
    resp = jsonify(result)
    resp.status_code = 502 if result["failed"] else 201
    return resp
