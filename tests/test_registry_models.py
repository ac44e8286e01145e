"""Model registry through its REST API, on SQLite and on PostgreSQL.

Uploads use the real models in ``$FLOWFLEET_DATA/models``; every request carries a
real token created through `flowfleet.registry.http.auth`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from flowfleet import signing
from flowfleet.registry.catalog.modelreg import MIB
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import fresh_registry

LIMIT = 4 * MIB  # upload limit in these tests: the sample models are 3.1-3.4 MiB
TFLITE = "yolov8n_full_integer_quant.tflite"
TFLITE_DYN = "yolov8n_int8_dynamic.tflite"
ONNX = "yolov8n_int8.onnx"


@pytest.fixture
def registry(db_url, tmp_path):
    reg = fresh_registry(db_url, tmp_path, max_upload_bytes=LIMIT)
    return reg


@pytest.fixture
def client(registry):
    return create_app(registry.db, registry=registry).test_client()


@pytest.fixture
def tokens(registry) -> dict[str, str]:
    """One token per role, plus 'nobody' (no header)."""
    out = {}
    with registry.db.connection_context():
        for role in auth.ROLES:
            auth.create_user(f"{role}-user", role, actor="test")
            out[role], _ = auth.create_token(f"{role}-user", actor="test")
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client, token, path_or_bytes, filename=None, name="yolo", **form):
    if isinstance(path_or_bytes, Path):
        data = path_or_bytes.read_bytes()
        filename = filename or path_or_bytes.name
    else:
        data = path_or_bytes
    body = {"file": (io.BytesIO(data), filename), **form}
    return client.post(
        f"/api/models/{name}/versions",
        data=body,
        headers=bearer(token),
        content_type="multipart/form-data",
    )


def error_of(resp) -> tuple[int, str, str | None]:
    assert resp.is_json, resp.data[:200]
    err = resp.get_json()["error"]
    assert err["message"]
    return resp.status_code, err["code"], err["field"]


# -- uploads -------------------------------------------------------------------------


def _truncated(data: Path) -> bytes:
    return (data / "models" / TFLITE).read_bytes()[:1_000_000]


UPLOADS = [
    # (id, bytes factory, filename, status, code-or-runtime)
    ("tflite", lambda d: (d / "models" / TFLITE).read_bytes(), TFLITE, 201, "tflite"),
    ("onnx", lambda d: (d / "models" / ONNX).read_bytes(), ONNX, 201, "onnx"),
    ("eim-elf", lambda d: Path(shutil.which("true")).read_bytes(), "model.eim", 201, "eim"),
    ("truncated-tflite", _truncated, "cut.tflite", 422, "invalid_model"),
    (
        "truncated-onnx",
        lambda d: (d / "models" / ONNX).read_bytes()[:2_000_000],
        "cut.onnx",
        422,
        "invalid_model",
    ),
    (
        "renamed-text",
        lambda d: (d / "models" / "coco_labels.txt").read_bytes(),
        "labels.tflite",
        422,
        "invalid_model",
    ),
    ("empty", lambda d: b"", "empty.onnx", 422, "invalid_model"),
    ("oversize", lambda d: b"\0\0\0\0TFL3" + b"\0" * LIMIT, "big.tflite", 413, "too_large"),
    (
        "traversal-dotdot",
        lambda d: (d / "models" / TFLITE).read_bytes(),
        "../../etc/x.tflite",
        400,
        "invalid_filename",
    ),
    (
        "traversal-backslash",
        lambda d: (d / "models" / TFLITE).read_bytes(),
        "..\\x.tflite",
        400,
        "invalid_filename",
    ),
    (
        "traversal-absolute",
        lambda d: (d / "models" / TFLITE).read_bytes(),
        "/etc/passwd",
        400,
        "invalid_filename",
    ),
    (
        "hidden-name",
        lambda d: (d / "models" / TFLITE).read_bytes(),
        ".bashrc",
        400,
        "invalid_filename",
    ),
]


@pytest.mark.parametrize(
    ("make", "filename", "status", "expect"),
    [u[1:] for u in UPLOADS],
    ids=[u[0] for u in UPLOADS],
)
def test_upload_table(client, tokens, data, registry, make, filename, status, expect):
    payload = make(data)
    resp = upload(client, tokens["operator"], payload, filename)

    assert resp.status_code == status, resp.get_json()
    if status == 201:
        body = resp.get_json()
        assert body["runtime"] == expect
        assert body["created"] is True
        assert body["version"] == 1
        assert body["sha256"] == hashlib.sha256(payload).hexdigest()
        assert body["size"] == len(payload)
        assert body["filename"] == filename
        assert registry.store.exists(body["sha256"])
    else:
        assert error_of(resp)[1:] == (expect, "file")
        with registry.db.connection_context():
            assert regdb.ModelVersion.select().count() == 0, "a refused upload changed nothing"
            assert regdb.RegistryModel.select().count() == 0
        assert not list((registry.store.root / "sha256").rglob("*")), "nothing stored"
        assert not list((registry.staging_dir).glob("upload-*")), "no staged file left"


def test_metadata_is_read_from_the_files(client, tokens, data):
    tfl = upload(client, tokens["operator"], data / "models" / TFLITE).get_json()["metadata"]
    assert tfl["inputs"][0]["shape"] == [1, 640, 640, 3]
    assert tfl["inputs"][0]["dtype"] == "int8"
    assert tfl["inputs"][0]["quantization"]["zero_point"] == -14
    assert tfl["outputs"][0]["shape"] == [1, 84, 8400]
    assert tfl["quantization"].startswith("full integer")
    assert tfl["output_layout"] == "yolov8 (80 classes)"

    dyn = upload(client, tokens["operator"], data / "models" / TFLITE_DYN).get_json()["metadata"]
    assert dyn["inputs"][0]["dtype"] == "float32"
    assert dyn["quantization"].startswith("dynamic range")

    onnx = upload(client, tokens["operator"], data / "models" / ONNX).get_json()["metadata"]
    assert onnx["inputs"][0] == {"name": "images", "shape": [1, 3, 640, 640], "dtype": "float32"}
    assert onnx["quantization"] == "dynamic int8"
    assert len(onnx["labels"]) == 80 and onnx["labels"][:3] == ["person", "bicycle", "car"]
    assert onnx["labels_source"] == "onnx metadata 'names'"


def test_labels_file_overrides_labels(client, tokens, data):
    resp = client.post(
        "/api/models/yolo/versions",
        data={
            "file": (io.BytesIO((data / "models" / TFLITE).read_bytes()), TFLITE),
            "labels": (
                io.BytesIO((data / "models" / "coco_labels.txt").read_bytes()),
                "labels.txt",
            ),
        },
        headers=bearer(tokens["operator"]),
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201
    assert resp.get_json()["metadata"]["labels"][:2] == ["person", "bicycle"]


def test_same_bytes_again_return_the_existing_version(client, tokens, data, registry):
    first = upload(client, tokens["operator"], data / "models" / TFLITE, notes="first")
    again = upload(
        client, tokens["operator"], data / "models" / TFLITE, filename="copy.tflite", name="other"
    )

    assert first.status_code == 201
    assert again.status_code == 200
    body = again.get_json()
    assert body["created"] is False
    assert (body["model"], body["version"], body["notes"]) == ("yolo", 1, "first")
    assert "already registered" in body["message"]
    with registry.db.connection_context():
        assert regdb.ModelVersion.select().count() == 1
        assert regdb.RegistryModel.select().count() == 1


def test_versions_are_numbered_per_model_and_never_reused(client, tokens, data):
    op = tokens["operator"]
    assert upload(client, op, data / "models" / TFLITE).get_json()["version"] == 1
    assert upload(client, op, data / "models" / ONNX).get_json()["version"] == 2
    assert upload(client, op, data / "models" / TFLITE_DYN, name="other").get_json()["version"] == 1
    assert client.delete("/api/models/yolo/versions/2", headers=bearer(op)).status_code == 204
    again = upload(client, op, data / "models" / ONNX)
    assert again.status_code == 201 and again.get_json()["version"] == 3

    listing = client.get("/api/models/yolo/versions", headers=bearer(tokens["viewer"])).get_json()
    assert [v["version"] for v in listing["versions"]] == [3, 1]
    models = client.get("/api/models", headers=bearer(tokens["viewer"])).get_json()
    assert [(m["name"], m["versions"], m["latest_version"]) for m in models["models"]] == [
        ("other", 1, 1),
        ("yolo", 2, 3),
    ]


def test_pagination(client, tokens, data):
    op = tokens["operator"]
    for i, f in enumerate((TFLITE, ONNX, TFLITE_DYN)):
        upload(client, op, data / "models" / f, name=f"m{i}")
    h = bearer(tokens["viewer"])
    page1 = client.get("/api/models?limit=2", headers=h).get_json()
    page2 = client.get(f"/api/models?limit=2&offset={page1['next_offset']}", headers=h).get_json()
    assert [m["name"] for m in page1["models"]] == ["m0", "m1"]
    assert (page1["total"], page1["next_offset"]) == (3, 2)
    assert [m["name"] for m in page2["models"]] == ["m2"]
    assert page2["next_offset"] is None


def test_notes_and_tags(client, tokens, data):
    op = bearer(tokens["operator"])
    resp = upload(
        client, tokens["operator"], data / "models" / TFLITE, notes="baseline", tags="int8, coco"
    )
    assert resp.get_json()["tags"] == ["int8", "coco"]
    patched = client.patch(
        "/api/models/yolo/versions/1",
        json={"notes": "better", "tags": ["x"], "reason": "review"},
        headers=op,
    )
    assert patched.status_code == 200
    assert (patched.get_json()["notes"], patched.get_json()["tags"]) == ("better", ["x"])
    bad = client.patch("/api/models/yolo/versions/1", json={"colour": "red"}, headers=op)
    assert error_of(bad) == (400, "unknown_field", "colour")
    bad = client.patch("/api/models/yolo/versions/1", json={"tags": ["no spaces"]}, headers=op)
    assert error_of(bad) == (400, "invalid_parameter", "tags")


# -- aliases and deletion --------------------------------------------------------------


def test_aliases_move_and_resolve(client, tokens, data):
    op = bearer(tokens["operator"])
    upload(client, tokens["operator"], data / "models" / TFLITE, alias="staging")
    upload(client, tokens["operator"], data / "models" / ONNX)

    resp = client.put("/api/models/yolo/aliases/production", json={"version": 1}, headers=op)
    assert resp.status_code == 200 and resp.get_json()["version"] == 1
    assert client.get("/api/models/yolo/versions/production", headers=op).get_json()["version"] == 1
    moved = client.put(
        "/api/models/yolo/aliases/production", json={"version": 2, "reason": "rollout"}, headers=op
    )
    assert moved.get_json()["version"] == 2
    assert client.get("/api/models/yolo/aliases", headers=op).get_json()["aliases"] == {
        "production": 2,
        "staging": 1,
    }
    v2 = client.get("/api/models/yolo/versions/production", headers=op).get_json()
    assert v2["version"] == 2 and v2["aliases"] == ["production"]

    assert error_of(
        client.put("/api/models/yolo/aliases/production", json={"version": 9}, headers=op)
    ) == (404, "unknown_version", "version")
    assert error_of(client.put("/api/models/yolo/aliases/production", json={}, headers=op)) == (
        400,
        "missing_field",
        "version",
    )
    assert error_of(
        client.put("/api/models/yolo/aliases/production", json={"version": "2"}, headers=op)
    ) == (400, "invalid_field", "version")
    assert error_of(
        client.put("/api/models/nope/aliases/production", json={"version": 1}, headers=op)
    ) == (404, "unknown_model", "name")
    assert error_of(client.get("/api/models/yolo/versions/canary", headers=op)) == (
        404,
        "unknown_version",
        "version",
    )


def test_deleting_an_aliased_version_is_refused(client, tokens, data, registry):
    op = bearer(tokens["operator"])
    body = upload(
        client, tokens["operator"], data / "models" / TFLITE, alias="production"
    ).get_json()

    assert error_of(client.delete("/api/models/yolo/versions/1", headers=op)) == (
        409,
        "version_in_use",
        "version",
    )
    assert registry.store.exists(body["sha256"])

    assert client.delete("/api/models/yolo/aliases/production", headers=op).status_code == 204
    assert (
        client.delete("/api/models/yolo/versions/1?reason=obsolete", headers=op).status_code == 204
    )
    assert not registry.store.exists(body["sha256"])
    assert error_of(client.get("/api/models/yolo/versions/1", headers=op)) == (
        404,
        "unknown_version",
        "version",
    )
    assert error_of(client.delete("/api/models/yolo/versions/1", headers=op)) == (
        404,
        "unknown_version",
        "version",
    )
    assert error_of(client.delete("/api/models/yolo/versions/latest", headers=op)) == (
        400,
        "invalid_parameter",
        "version",
    )


# -- audit trail -----------------------------------------------------------------------


def test_every_change_is_audited(client, tokens, data):
    op = bearer(tokens["operator"])
    upload(
        client, tokens["operator"], data / "models" / TFLITE, alias="staging", reason="first cut"
    )
    client.patch("/api/models/yolo/versions/1", json={"notes": "n"}, headers=op)
    client.put(
        "/api/models/yolo/aliases/production", json={"version": 1, "reason": "go"}, headers=op
    )
    client.delete("/api/models/yolo/aliases/staging", headers=op)
    client.delete("/api/models/yolo/aliases/production?reason=stop", headers=op)
    client.delete("/api/models/yolo/versions/1?reason=gone", headers=op)

    resp = client.get("/api/audit?target=model:yolo", headers=op)
    assert resp.status_code == 200
    entries = resp.get_json()["entries"]
    got = [(e["action"], e["target"], e["reason"]) for e in reversed(entries)]
    assert got == [
        ("model.create", "model:yolo", "first cut"),
        ("version.create", "model:yolo/v1", "first cut"),
        ("alias.set", "model:yolo/alias:staging", "first cut"),
        ("version.update", "model:yolo/v1", ""),
        ("alias.set", "model:yolo/alias:production", "go"),
        ("alias.delete", "model:yolo/alias:staging", ""),
        ("alias.delete", "model:yolo/alias:production", "stop"),
        ("version.delete", "model:yolo/v1", "gone"),
    ]
    assert all(e["actor"] == "user:operator-user" for e in entries)
    assert (
        entries[0]["details"]["sha256"]
        == hashlib.sha256((data / "models" / TFLITE).read_bytes()).hexdigest()
    )
    assert entries[4]["details"] == {"notes": {"old": "", "new": "n"}}
    # A viewer may not read the audit trail.
    assert error_of(client.get("/api/audit", headers=bearer(tokens["viewer"])))[:2] == (
        403,
        "forbidden",
    )


# -- downloads and signatures ----------------------------------------------------------


def test_download_sends_checksum_and_supports_ranges(client, tokens, data):
    raw = (data / "models" / TFLITE).read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    upload(client, tokens["operator"], data / "models" / TFLITE, alias="production")
    h = bearer(tokens["viewer"])

    full = client.get("/api/models/yolo/versions/production/artifact", headers=h)
    assert full.status_code == 200 and full.data == raw
    assert full.headers["X-Checksum-Sha256"] == sha
    assert full.headers["ETag"] == f'"{sha}"'
    assert full.headers["Accept-Ranges"] == "bytes"
    assert full.headers["Digest"].startswith("sha-256=")

    part = client.get(
        "/api/models/yolo/versions/1/artifact", headers={**h, "Range": "bytes=100-199"}
    )
    assert part.status_code == 206 and part.data == raw[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(raw)}"
    tail = client.get(
        "/api/models/yolo/versions/1/artifact", headers={**h, "Range": f"bytes={len(raw) - 10}-"}
    )
    assert tail.status_code == 206 and tail.data == raw[-10:]
    bad = client.get(
        "/api/models/yolo/versions/1/artifact", headers={**h, "Range": f"bytes={len(raw) + 5}-"}
    )
    assert bad.status_code == 416
    cached = client.get(
        "/api/models/yolo/versions/1/artifact", headers={**h, "If-None-Match": f'"{sha}"'}
    )
    assert cached.status_code == 304


def test_every_version_is_signed_and_verifies_with_the_public_bundle(
    client, tokens, data, tmp_path
):
    body = upload(client, tokens["operator"], data / "models" / ONNX).get_json()
    bundle = client.get("/api/keys").get_json()  # public: no token
    keys = signing.load_bundle(bundle)

    (sig,) = body["signatures"]
    doc = signing.verify_manifest(body["manifest"].encode(), sig["signature"], sig["key_id"], keys)
    assert (doc["name"], doc["version"], doc["sha256"], doc["runtime"]) == (
        "yolo",
        1,
        body["sha256"],
        "onnx",
    )
    assert doc["metadata"] == body["metadata"]
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(client.get(body["download_url"], headers=bearer(tokens["viewer"])).data)
    signing.verify_model(artifact, body["manifest"].encode(), sig["signature"], sig["key_id"], keys)

    tampered = body["manifest"].replace('"version":1', '"version":2').encode()
    with pytest.raises(signing.VerificationError, match="bad signature"):
        signing.verify_manifest(tampered, sig["signature"], sig["key_id"], keys)
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"x")
    with pytest.raises(signing.VerificationError, match="sha256"):
        signing.verify_model(
            artifact, body["manifest"].encode(), sig["signature"], sig["key_id"], keys
        )


def test_key_rotation_keeps_the_old_key_for_the_overlap(client, tokens, data, registry):
    first = upload(client, tokens["operator"], data / "models" / TFLITE).get_json()
    old_key = first["signatures"][0]["key_id"]
    old_bundle = signing.load_bundle(client.get("/api/keys").get_json())

    with registry.db.connection_context():
        new, retired = registry.rotate_keys(actor="test", overlap_s=3600, reason="yearly")
    assert [k.key_id for k in retired] == [old_key]

    v1 = client.get("/api/models/yolo/versions/1", headers=bearer(tokens["viewer"])).get_json()
    by_key = {s["key_id"]: s["signature"] for s in v1["signatures"]}
    assert set(by_key) == {old_key, new.key_id}, "rotation re-signs existing versions"
    bundle = client.get("/api/keys").get_json()
    assert [k["key_id"] for k in bundle["keys"]] == [new.key_id, old_key]
    expiry = bundle["keys"][1]["not_after"]
    assert expiry is not None and bundle["keys"][0]["not_after"] is None

    manifest = v1["manifest"].encode()
    # A device with only the old bundle still verifies during the overlap...
    signing.verify_manifest(
        manifest, by_key[old_key], old_key, {old_key: {**old_bundle[old_key], "not_after": expiry}}
    )
    # ...the new key verifies everything...
    signing.verify_manifest(manifest, by_key[new.key_id], new.key_id, signing.load_bundle(bundle))
    # ...and the old key is refused after the overlap.
    with pytest.raises(signing.VerificationError, match="expired"):
        signing.verify_manifest(
            manifest, by_key[old_key], old_key, signing.load_bundle(bundle), now=expiry + 1
        )
    second = upload(client, tokens["operator"], data / "models" / ONNX).get_json()
    assert [s["key_id"] for s in second["signatures"]] == [new.key_id]
    audit_actions = [
        e["action"]
        for e in client.get("/api/audit", headers=bearer(tokens["admin"])).get_json()["entries"]
    ]
    assert "key.rotate" in audit_actions


def test_signing_key_file_is_private(registry):
    files = list(registry.keys.key_dir.iterdir())
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert registry.keys.key_dir.stat().st_mode & 0o777 == 0o700


# -- OpenAPI ---------------------------------------------------------------------------


def test_openapi_document_covers_every_api_route(client):
    doc = client.get("/api/openapi.json").get_json()
    from openapi_spec_validator import validate

    validate(doc)
    app = client.application
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        # HTML pages for browsers (the dashboard, login, the models page, the web UI's
        # pages) are not API.
        if (
            rule.endpoint == "static"
            or rule.rule == "/"
            or rule.endpoint.startswith(("webauth.", "ui."))
        ):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <int:x> -> {x}
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method))
    assert served == documented


def test_version_responses_match_the_schema(client, tokens, data):
    import jsonschema

    doc = client.get("/api/openapi.json").get_json()
    upload(client, tokens["operator"], data / "models" / TFLITE)
    schema = {**doc["components"]["schemas"]["Version"], "components": doc["components"]}
    body = client.get("/api/models/yolo/versions/1", headers=bearer(tokens["viewer"])).get_json()
    jsonschema.validate(body, schema)
    json.dumps(body)
