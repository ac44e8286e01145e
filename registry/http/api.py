"""REST API of the model registry (a Flask blueprint).

Access control (tokens, device tokens, web sessions with CSRF, roles, anonymous
dashboard reads) is `flowfleet.registry.http.access`; views declare the least role they
need with `requires`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for

from ..catalog.modelreg import (
    DEFAULT_PAGE,
    MAX_PAGE,
    ModelRegistry,
    RegistryError,
    check_name,
    check_target,
)
from ..errors import comma_list
from ..fleet.commands import CommandPublisher
from ..store.db import Deployment
from .access import install_auth, requires  # noqa: F401  (install_auth: re-exported)
from .auth import Principal
from .openapi import openapi_document
from .queries import _paged

MAX_VERSION = 2**31 - 1
bp = Blueprint("models_api", __name__, url_prefix="/api")


def _registry() -> ModelRegistry:
    reg = current_app.extensions.get("flowfleet_model_registry")
    if reg is None:
        raise RegistryError(503, "not_configured", "this registry has no model store configured")
    return reg


def _actor() -> str:
    p: Principal | None = g.get("principal")
    return f"user:{p.name}" if p else "anonymous"


def error_response(exc: RegistryError):
    body = {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}
    resp = jsonify(body)
    resp.status_code = exc.status
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="flowfleet-registry"'
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


# -- request parsing ------------------------------------------------------------------


def query_args(allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, refusing unknown or repeated ones (400)."""
    out = {}
    for name in request.args:
        if name not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise RegistryError(
                400,
                "unknown_parameter",
                f"unknown query parameter {name!r} (allowed: {hint})",
                name,
            )
        values = request.args.getlist(name)
        if len(values) > 1:
            raise RegistryError(
                400, "invalid_parameter", f"{name!r} given {len(values)} times", name
            )
        out[name] = values[0]
    return out


def int_arg(args: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise RegistryError(
            400,
            "invalid_parameter",
            f"{name} must be an integer from {lo} to {hi}, got {raw!r}",
            name,
        )
    return value


def _page(args: dict[str, str]) -> tuple[int, int]:
    return (
        int_arg(args, "limit", DEFAULT_PAGE, 1, MAX_PAGE),
        int_arg(args, "offset", 0, 0, 2**31 - 1),
    )


def _json_body(allowed: dict[str, type], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not request.is_json:
        raise RegistryError(
            415, "unsupported_media_type", "send a JSON object (Content-Type: application/json)"
        )
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        raise RegistryError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RegistryError(400, "invalid_json", "the request body must be a JSON object")
    for key, value in body.items():
        if key not in allowed:
            raise RegistryError(
                400, "unknown_field", f"unknown field {key!r} (allowed: {', '.join(allowed)})", key
            )
        # JSON Schema counts 3.0 as an integer; bool is an int in Python, never here
        # (true is a bool only where a field is declared bool).
        if allowed[key] is int and isinstance(value, float) and value.is_integer():
            value = body[key] = int(value)
        wrong_bool = isinstance(value, bool) and allowed[key] is not bool
        if not isinstance(value, allowed[key]) or wrong_bool:
            raise RegistryError(400, "invalid_field", f"{key!r} has the wrong type", key)
    for key in required:
        if key not in body:
            raise RegistryError(400, "missing_field", f"{key!r} is required", key)
    return body


def _version_number(ref: str) -> int:
    if not ref.isdigit() or not 1 <= int(ref) <= MAX_VERSION:
        raise RegistryError(400, "invalid_parameter", f"{ref!r} is not a version number", "version")
    return int(ref)


def _with_links(d: dict) -> dict:
    d["download_url"] = url_for("models_api.download", name=d["model"], ref=d["version"])
    return d


# -- routes ------------------------------------------------------------------------------


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


@bp.get("/keys")
def public_keys():
    query_args(())
    return jsonify(_registry().keys.bundle())


@bp.get("/models")
@requires("viewer")
def list_models():
    limit, offset = _page(query_args(("limit", "offset")))
    items, total = _registry().list_models(limit, offset)
    return jsonify(_paged("models", items, total, limit, offset))


@bp.get("/models/<name>")
@requires("viewer")
def get_model(name: str):
    query_args(())
    return jsonify(_registry().model_info(name))


@bp.get("/models/<name>/versions")
@requires("viewer")
def list_versions(name: str):
    limit, offset = _page(query_args(("limit", "offset")))
    items, total = _registry().list_versions(name, limit, offset)
    return jsonify(_paged("versions", [_with_links(i) for i in items], total, limit, offset))


@bp.post("/models/<name>/versions")
@requires("operator")
def upload_version(name: str):
    query_args(())
    reg = _registry()
    if not request.mimetype == "multipart/form-data":
        raise RegistryError(
            415,
            "unsupported_media_type",
            "upload the model as multipart/form-data with a 'file' part",
            "file",
        )
    form = request.form
    for key in form:
        if key not in ("notes", "tags", "target", "alias", "reason"):
            raise RegistryError(400, "unknown_field", f"unknown form field {key!r}", key)
    upload = request.files.get("file")
    if upload is None:
        raise RegistryError(400, "missing_field", "the upload has no 'file' part", "file")
    for key in request.files:
        if key not in ("file", "labels"):
            raise RegistryError(400, "unknown_field", f"unknown file part {key!r}", key)
    from ..catalog.modelreg import check_filename

    filename = check_filename(upload.filename)
    labels = None
    if "labels" in request.files:
        text = request.files["labels"].read(1 << 20).decode("utf-8", errors="replace")
        labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not labels:
            raise RegistryError(400, "invalid_field", "the labels file has no labels", "labels")
    tags = comma_list(form.get("tags", ""))
    target = comma_list(form.get("target", "")) or None
    if target is not None:
        check_target(target)  # before the upload is copied
    staged = reg.staged_copy(upload.stream)
    try:
        version, created = reg.add_version(
            staged,
            name=name,
            filename=filename,
            actor=_actor(),
            notes=form.get("notes", ""),
            tags=tags,
            alias=form.get("alias") or None,
            labels=labels,
            target=target,
            reason=form.get("reason", ""),
        )
    finally:
        staged.unlink(missing_ok=True)
    body = _with_links(reg.version_dict(version))
    body["created"] = created
    if not created:
        body["message"] = (
            f"these bytes are already registered as {version.model.name} "
            f"version {version.version}; "
            "nothing was changed"
        )
    resp = jsonify(body)
    resp.status_code = 201 if created else 200
    resp.headers["Location"] = url_for(
        "models_api.get_version", name=version.model.name, ref=version.version
    )
    return resp


@bp.get("/models/<name>/versions/<ref>")
@requires("viewer")
def get_version(name: str, ref: str):
    query_args(())
    reg = _registry()
    return jsonify(_with_links(reg.version_dict(reg.version(name, ref))))


@bp.patch("/models/<name>/versions/<ref>")
@requires("operator")
def update_version(name: str, ref: str):
    query_args(())
    number = _version_number(ref)
    body = _json_body({"notes": str, "tags": list, "reason": str})
    tags = body.get("tags")
    if tags is not None and not all(isinstance(t, str) for t in tags):
        raise RegistryError(400, "invalid_field", "tags must be a list of strings", "tags")
    reg = _registry()
    v = reg.update_version(
        name,
        number,
        actor=_actor(),
        notes=body.get("notes"),
        tags=tags,
        reason=body.get("reason", ""),
    )
    return jsonify(_with_links(reg.version_dict(v)))


@bp.delete("/models/<name>/versions/<ref>")
@requires("operator")
def delete_version(name: str, ref: str):
    args = query_args(("reason",))
    number = _version_number(ref)
    _registry().delete_version(name, number, actor=_actor(), reason=args.get("reason", ""))
    return "", 204


@bp.get("/models/<name>/versions/<ref>/artifact")
@requires("viewer")
def download(name: str, ref: str):
    query_args(())
    reg = _registry()
    p: Principal | None = g.get("principal")
    v = reg.version(name, ref) if p is None or p.device is None else _deployed(reg, p, name, ref)
    resp = _serve_artifact(reg, v.sha256, v.size, v.filename)
    digest_b64 = base64.b64encode(binascii.unhexlify(v.sha256)).decode()
    resp.headers["X-Checksum-Sha256"] = v.sha256
    resp.headers["Digest"] = f"sha-256={digest_b64}"
    resp.headers["Repr-Digest"] = f"sha-256=:{digest_b64}:"
    resp.headers["X-Model-Version"] = str(v.version)
    return resp


def _deployed(reg: ModelRegistry, p: Principal, name: str, ref: str):
    """The version ``ref`` of ``name`` if it is deployed to the device token's device.

    An unknown model, version or alias is refused like an undeployed one (403), so a
    device token cannot probe what the registry holds.
    """
    try:
        v = reg.version(name, ref)
    except RegistryError as exc:
        if exc.status != 404:
            raise
        v = None
    if v is None or not (
        Deployment.select()
        .where(
            (Deployment.device == p.device)
            & (Deployment.model == v.model.name)
            & (Deployment.version == v.version)
        )
        .exists()
    ):
        number = v.version if v is not None else ref
        raise RegistryError(
            403, "forbidden", f"model {name} version {number} is not deployed to device {p.device}"
        )
    return v


def _serve_artifact(reg: ModelRegistry, sha256: str, size: int, filename: str) -> Response:
    """Stream an artifact in 256 KiB blocks, honouring If-None-Match, If-Range and one
    byte range (werkzeug's send_file reads 8 KiB at a time, a third slower)."""
    headers = {
        "ETag": f'"{sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "no-cache",
    }
    if request.if_none_match.contains(sha256):
        return Response(status=304, headers=headers)
    start, length, status = 0, size, 200
    rng = request.range
    if_range = request.headers.get("If-Range")
    if rng is not None and (if_range is None or if_range.strip() == f'"{sha256}"'):
        bounds = rng.range_for_length(size) if len(rng.ranges) == 1 else None
        if bounds is None:
            resp = error_response(
                RegistryError(
                    416, "range_not_satisfiable", f"the artifact has {size} bytes", "Range"
                )
            )
            resp.headers.update(headers)
            resp.headers["Content-Range"] = f"bytes */{size}"
            return resp
        start, stop = bounds
        length, status = stop - start, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(length)
    return Response(
        reg.store.read_range(sha256, start, length),
        status=status,
        mimetype="application/octet-stream",
        headers=headers,
        direct_passthrough=True,
    )


@bp.get("/models/<name>/aliases")
@requires("viewer")
def list_aliases(name: str):
    query_args(())
    info = _registry().model_info(name)
    return jsonify({"model": name, "aliases": info["aliases"]})


@bp.put("/models/<name>/aliases/<alias>")
@requires("operator")
def set_alias(name: str, alias: str):
    query_args(())
    body = _json_body({"version": int, "reason": str}, required=("version",))
    if not 1 <= body["version"] <= MAX_VERSION:
        raise RegistryError(
            400, "invalid_field", f"version must be from 1 to {MAX_VERSION}", "version"
        )
    reg = _registry()
    row = reg.set_alias(name, alias, body["version"], actor=_actor(), reason=body.get("reason", ""))
    return jsonify(
        {
            "model": name,
            "alias": row.name,
            "version": row.version.version,
            "updated_at": row.updated_at,
            "updated_by": row.updated_by,
        }
    )


@bp.delete("/models/<name>/aliases/<alias>")
@requires("operator")
def delete_alias(name: str, alias: str):
    args = query_args(("reason",))
    _registry().delete_alias(name, alias, actor=_actor(), reason=args.get("reason", ""))
    return "", 204


@bp.get("/devices/<device>/deployments")
@requires("viewer")
def list_deployments(device: str):
    query_args(())
    return jsonify(_registry().deployments(device))


@bp.post("/devices/<device>/deployments")
@requires("operator")
def deploy(device: str):
    """Store a deployment and queue the device's retained desired state (published
    after commit; ``command.status`` says whether the broker acknowledged it yet)."""
    query_args(())
    reg = _registry()
    check_name(device, "device", "device id")
    body, ref = deployment_body()
    publisher = deployment_commands()
    desired, row = reg.deploy(
        device,
        body["camera"],
        body["model"],
        ref,
        actor=_actor(),
        reason=body.get("reason", ""),
        commands=publisher,
        topics=current_app.extensions.get("flowfleet_topics"),
    )
    (command,) = command_outcomes(publisher, [row["command_id"]])
    resp = jsonify(
        {
            "deployment": row,
            "desired": json.loads(desired.to_json()),
            "topic": current_app.extensions["flowfleet_topics"].desired(device),
            "command": command,
        }
    )
    resp.status_code = 201
    return resp


def version_ref(body: dict[str, Any]) -> str | int:
    """The version number or alias a request body names (exactly one of ``version``
    and ``alias``); 400 naming the field otherwise. Unknown ones are the caller's 404."""
    if ("version" in body) == ("alias" in body):
        raise RegistryError(
            400, "invalid_field", "give exactly one of 'version' and 'alias'", "version"
        )
    if "version" in body:
        if not 1 <= body["version"] <= MAX_VERSION:
            raise RegistryError(
                400, "invalid_field", f"version must be from 1 to {MAX_VERSION}", "version"
            )
        return body["version"]
    return check_name(body["alias"], "alias", "alias name")


def deployment_body() -> tuple[dict[str, Any], str | int]:
    """The JSON body of a deployment request and the version or alias it names;
    404 for an unknown model, version or alias."""
    body = _json_body(
        {"camera": str, "model": str, "version": int, "alias": str, "reason": str},
        required=("camera", "model"),
    )
    ref = version_ref(body)
    check_name(body["model"], "model", "model name")
    check_name(body["camera"], "camera", "camera name")
    _registry().version(body["model"], ref)
    return body, ref


def deployment_commands() -> CommandPublisher:
    """The app's command publisher; 503 when it has none (nothing is stored)."""
    publisher = current_app.extensions.get("flowfleet_commands")
    if publisher is None:
        raise RegistryError(
            503,
            "no_publisher",
            "this registry has no command publisher for desired states "
            "(deploy through a running 'flowfleet registry' service); nothing was stored",
        )
    return publisher


# How long a deploy request waits for the broker's PUBACK before it answers "queued"
# (not at all while the broker is unreachable); the command is published either way.
PUBLISH_WAIT_S = 1.0


def command_outcomes(publisher: CommandPublisher, ids: list[int]) -> list[dict[str, Any]]:
    """The commands ``ids`` after a short wait for their publication."""
    wait = current_app.config.get("FLOWFLEET_PUBLISH_WAIT_S", PUBLISH_WAIT_S)
    return publisher.wait_published(ids, wait)


@bp.get("/audit")
@requires("operator")
def audit_log():
    args = query_args(("limit", "offset", "target"))
    limit, offset = _page(args)
    items, total = _registry().audit_log(limit, offset, args.get("target"))
    return jsonify(_paged("entries", items, total, limit, offset))
