"""REST API for webhooks (a Flask blueprint): ``/api/webhooks`` and
``/api/webhook-deliveries``. Admin only: a webhook's URL and secret decide where the
registry's audit trail goes.

Creating a webhook answers its secret once (generated unless given); nothing lists
it again. A ping or a redelivery is queued and the registry's webhook job woken, so
the answer (202) does not wait for the receiver; read the delivery to see how it went.
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify

from ..errors import RegistryError
from ..fleet import webhook_records as records
from .api import _actor, _json_body, _page, _paged, query_args, requires

bp = Blueprint("webhooks_api", __name__, url_prefix="/api")


def _db():
    return current_app.extensions["flowfleet_db"]


def _wake() -> None:
    job = current_app.extensions.get("flowfleet_webhooks")
    if job is not None:
        job.wake()


def _delivery_id(raw: str) -> int:
    if not re.fullmatch(records.DELIVERY_ID, raw):
        raise RegistryError(400, "invalid_parameter", f"{raw!r} is not a delivery id", "delivery")
    return int(raw)


@bp.get("/webhooks")
@requires("admin")
def list_webhooks():
    limit, offset = _page(query_args(("limit", "offset")))
    everything = records.list_webhooks()
    return jsonify(
        _paged("webhooks", everything[offset : offset + limit], len(everything), limit, offset)
    )


@bp.post("/webhooks")
@requires("admin")
def create_webhook():
    query_args(())
    body = _json_body(
        {"name": str, "url": str, "events": list, "secret": str, "enabled": bool, "reason": str},
        required=("name", "url", "events"),
    )
    created = records.create_webhook(
        _db(),
        body["name"],
        body["url"],
        body["events"],
        actor=_actor(),
        secret=body.get("secret"),
        enabled=body.get("enabled", True),
        reason=body.get("reason", ""),
    )
    resp = jsonify(created)
    resp.status_code = 201
    return resp


@bp.get("/webhooks/<name>")
@requires("admin")
def get_webhook(name: str):
    query_args(())
    return jsonify(records.get_webhook(name))


@bp.patch("/webhooks/<name>")
@requires("admin")
def update_webhook(name: str):
    query_args(())
    body = _json_body({"url": str, "events": list, "enabled": bool, "reason": str})
    updated = records.update_webhook(
        _db(),
        name,
        actor=_actor(),
        url=body.get("url"),
        events=body.get("events"),
        enabled=body.get("enabled"),
        reason=body.get("reason", ""),
    )
    if body.get("enabled"):
        _wake()  # its pending deliveries may go now
    return jsonify(updated)


@bp.delete("/webhooks/<name>")
@requires("admin")
def delete_webhook(name: str):
    args = query_args(("reason",))
    records.delete_webhook(_db(), name, actor=_actor(), reason=args.get("reason", ""))
    return "", 204


@bp.post("/webhooks/<name>/ping")
@requires("admin")
def ping_webhook(name: str):
    """Queue a ``ping`` event for the webhook whatever its patterns (202)."""
    query_args(())
    delivery = records.queue_ping(_db(), name, actor=_actor())
    _wake()
    resp = jsonify(records.get_delivery(delivery))
    resp.status_code = 202
    return resp


@bp.get("/webhook-deliveries")
@requires("admin")
def list_deliveries():
    args = query_args(("webhook", "status", "limit", "offset"))
    limit, offset = _page(args)
    items, total = records.list_deliveries(
        webhook=args.get("webhook"), status=args.get("status"), limit=limit, offset=offset
    )
    return jsonify(_paged("deliveries", items, total, limit, offset))


@bp.get("/webhook-deliveries/<delivery>")
@requires("admin")
def get_delivery(delivery: str):
    query_args(())
    return jsonify(records.get_delivery(_delivery_id(delivery)))


@bp.post("/webhook-deliveries/<delivery>/redeliver")
@requires("admin")
def redeliver(delivery: str):
    """Queue a delivery again with a fresh set of attempts (202)."""
    args = query_args(("reason",))
    out = records.redeliver(
        _db(), _delivery_id(delivery), actor=_actor(), reason=args.get("reason", "")
    )
    _wake()
    resp = jsonify(out)
    resp.status_code = 202
    return resp
