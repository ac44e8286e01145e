"""``GET /api/drift/verdicts``: the drift judge's verdicts, newest first.

Query parameters (all optional): ``device``, ``camera``, ``verdict`` (ok |
not_judged | breach | model_drift | environment), ``limit`` (1..1000, default 100)
and ``before`` (a verdict id: the page after the one that ended there). See
`flowfleet.registry.fleet.drift` for what a verdict holds.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..errors import RegistryError
from ..fleet import drift
from ..fleet.drift_stats import VERDICTS
from .access import requires
from .api import int_arg, query_args

bp = Blueprint("drift", __name__)

PARAMS = ("device", "camera", "verdict", "limit", "before")


@bp.get("/api/drift/verdicts")
@requires("viewer")
def api_drift_verdicts():
    from flowfleet.contract import is_valid_name

    args = query_args(PARAMS)
    for name in ("device", "camera"):
        value = args.get(name)
        if value is not None and not is_valid_name(value):
            raise RegistryError(
                400, "invalid_parameter", f"{value!r} is not a valid {name} name", name
            )
    verdict = args.get("verdict")
    if verdict is not None and verdict not in VERDICTS:
        raise RegistryError(
            400, "invalid_parameter", f"verdict must be one of {', '.join(VERDICTS)}", "verdict"
        )
    limit = int_arg(args, "limit", 100, 1, 1000)
    before = int_arg(args, "before", 0, 1, 2**62) if "before" in args else None
    items = drift.verdicts(
        args.get("device"), args.get("camera"), limit=limit, before=before, verdict=verdict
    )
    return jsonify(
        {"verdicts": items, "next_before": items[-1]["id"] if len(items) == limit else None}
    )
