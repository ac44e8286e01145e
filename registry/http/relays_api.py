"""REST API of the cloud relays (a Flask blueprint): ``/api/relays``.

``GET /api/relays`` (viewer): per relay its outbox (queued, parked, oldest), its live
state in this process (circuit breaker, last error) and what it forwarded over the
last ``hours`` (default 24). ``GET /api/relays/report`` (viewer): the comparison
report (`flowfleet.registry.relays.report`) over the last ``hours``: per cloud the
volume, failures, latency and the estimated monthly bill now, with twice the fleet and
unpacked, and which tier or packing setting costs least. ``GET /api/relays/parked``
(operator): the parked messages with their reasons. ``POST
/api/relays/<relay>/requeue`` (operator, audited): send a relay's parked messages
again, once their cause is fixed.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from ..errors import RegistryError
from ..relays import outbox, report, usage
from ..relays.clouds import CLOUDS
from ..store.audit import audit
from .api import _actor, _json_body, int_arg, query_args, requires

bp = Blueprint("relays_api", __name__, url_prefix="/api")


def _relay(raw: str) -> str:
    if raw not in CLOUDS:
        raise RegistryError(
            404, "not_found", f"no relay {raw!r} (one of {', '.join(CLOUDS)})", "relay"
        )
    return raw


@bp.get("/relays")
@requires("viewer")
def list_relays():
    args = query_args(("hours",))
    hours = int_arg(args, "hours", 24, 1, 24 * 366)
    job = current_app.extensions.get("flowfleet_relays")
    live = job.state() if job is not None else {}
    depth = outbox.depth()
    t = time.time()
    used = usage.summary(t - hours * 3600, t + 1)
    out = []
    for name in CLOUDS:
        d = depth.get(name, {"queued": 0, "parked": 0, "oldest_queued_s": 0.0})
        u = used.get(name)
        if name not in live and not u and not d["queued"] and not d["parked"]:
            continue
        out.append(
            {
                "relay": name,
                "running": name in live,
                "queued": d["queued"],
                "parked": d["parked"],
                "oldest_queued_s": round(d["oldest_queued_s"], 3),
                "state": live.get(name),
                "usage": _usage(u),
            }
        )
    return jsonify({"relays": out, "hours": hours})


def _usage(u: dict | None) -> dict:
    keys = ("messages", "publishes", "bytes", "units", "failures", "retries", "parked")
    if not u:
        return {**{k: 0 for k in keys}, "latency_ms": {"p50": None, "p95": None, "p99": None}}
    return {**{k: u[k] for k in keys}, "latency_ms": u["latency_ms"]}


@bp.get("/relays/report")
@requires("viewer")
def relay_report():
    """The cloud comparison over the last ``hours`` (default 168, a week)."""
    args = query_args(("hours",))
    hours = int_arg(args, "hours", 168, 1, 24 * 366)
    until = time.time()
    job = current_app.extensions.get("flowfleet_relays")
    quotas = {n: st["quota"] for n, st in (job.state() if job is not None else {}).items()}
    body = report.build_report(until - hours * 3600, until, quotas=quotas)
    return jsonify({**body, "hours": hours})


@bp.get("/relays/parked")
@requires("operator")
def list_parked():
    args = query_args(("relay", "limit"))
    relay = _relay(args["relay"]) if "relay" in args else None
    limit = int_arg(args, "limit", 100, 1, 1000)
    return jsonify({"parked": outbox.parked(relay, limit)})


@bp.post("/relays/<relay>/requeue")
@requires("operator")
def requeue(relay: str):
    query_args(())
    name = _relay(relay)
    body = _json_body({"reason": str})
    n = outbox.requeue_parked(name)
    audit(_actor(), "relay.requeue", f"relay:{name}", body.get("reason") or "", messages=n)
    job = current_app.extensions.get("flowfleet_relays")
    if job is not None:
        job.wake()
    return jsonify({"relay": name, "requeued": n})
