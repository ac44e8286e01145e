"""The S3 artifact store against moto's S3 server, started on a free port."""

from __future__ import annotations

import hashlib
import io

import pytest

from flowfleet.registry.catalog.artifacts import S3Store, open_store
from flowfleet.registry.catalog.keys import KeyRing
from flowfleet.registry.catalog.modelreg import MIB, ModelRegistry
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import release

TFLITE = "yolov8n_full_integer_quant.tflite"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def store(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = open_store("s3://models/flowfleet", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3Store) and s3.prefix == "flowfleet/"
    s3.client.create_bucket(Bucket="models")
    yield s3
    for obj in s3.client.list_objects_v2(Bucket="models").get("Contents", []):
        s3.client.delete_object(Bucket="models", Key=obj["Key"])
    s3.client.delete_bucket(Bucket="models")


def test_upload_download_range_and_delete_through_s3(store, tmp_path, data):
    db = regdb.open_database(tmp_path / "r.db")
    try:
        reg = ModelRegistry(db, store, KeyRing(tmp_path / "keys"), max_upload_bytes=8 * MIB)
        reg.start()
        with db.connection_context():
            auth.create_user("op", "operator", actor="test")
            token, _ = auth.create_token("op", actor="test")
        client = create_app(db, registry=reg).test_client()
        h = {"Authorization": f"Bearer {token}"}
        raw = (data / "models" / TFLITE).read_bytes()
        sha = hashlib.sha256(raw).hexdigest()

        resp = client.post(
            "/api/models/yolo/versions",
            data={"file": (io.BytesIO(raw), TFLITE)},
            headers=h,
            content_type="multipart/form-data",
        )
        assert resp.status_code == 201, resp.get_json()
        head = store.client.head_object(Bucket="models", Key=f"flowfleet/sha256/{sha}")
        assert head["ContentLength"] == len(raw)

        full = client.get("/api/models/yolo/versions/1/artifact", headers=h)
        assert full.status_code == 200 and full.data == raw
        assert full.headers["X-Checksum-Sha256"] == sha and full.headers["ETag"] == f'"{sha}"'
        part = client.get(
            "/api/models/yolo/versions/1/artifact", headers={**h, "Range": "bytes=10-19"}
        )
        assert part.status_code == 206 and part.data == raw[10:20]
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(raw)}"
        bad = client.get(
            "/api/models/yolo/versions/1/artifact", headers={**h, "Range": f"bytes={len(raw)}-"}
        )
        assert bad.status_code == 416

        assert client.delete("/api/models/yolo/versions/1", headers=h).status_code == 204
        assert not store.exists(sha)
    finally:
        release()
