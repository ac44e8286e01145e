"""A deployment end to end: the registry publishes, a real agent activates the model.

A real registry (SQLite) served over HTTP, its publisher wired to a real
`MqttConnection` on a real Mosquitto, and an in-process `AgentService` counting a
looping video (set-up shared with tests/test_agent_update.py).
"""

from __future__ import annotations

import threading

import pytest
from werkzeug.serving import make_server

from flowfleet.agent.service import AgentService
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.registry import auth
from flowfleet.registry import db as regdb
from flowfleet.registry.artifacts import LocalStore
from flowfleet.registry.keys import KeyRing
from flowfleet.registry.modelreg import MIB, ModelRegistry, PublishError
from flowfleet.registry.testing import reset_database, temporary_database
from flowfleet.registry.web import create_app
from tests.test_agent_update import (
    DEVICE,
    DYN,
    FULL,
    Watcher,
    make_config,
    running_file,
    upload,
    wait_frames,
)


@pytest.fixture
def deploying_registry(tmp_path, broker):
    """(base URL, test client, operator token, device token) of a served registry
    that publishes desired states through a real MQTT connection."""
    conn = MqttConnection("test-registry", BrokerAddress(broker.host, broker.port))
    conn.start()
    assert conn.wait_connected(10)

    def publish(topic: str, payload: bytes, retain: bool = True) -> int:
        mid = conn.publish(topic, payload, qos=1, retain=retain)
        if mid is None:
            raise PublishError("not connected")
        return mid

    with temporary_database("sqlite", tmp_path / "db") as url:
        db = regdb.open_database(url)
        reset_database(db)
        reg = ModelRegistry(
            db,
            LocalStore(tmp_path / "artifacts"),
            KeyRing(tmp_path / "keys"),
            max_upload_bytes=8 * MIB,
            staging_dir=tmp_path / "incoming",
        )
        reg.start()
        app = create_app(db, registry=reg, publish=publish)
        with db.connection_context():
            auth.create_user("ops", "operator", actor="test")
            auth.create_user(DEVICE, "viewer", actor="test")
            op_token, _ = auth.create_token("ops", actor="test")
            dev_token, _ = auth.create_token(DEVICE, actor="test")
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", app.test_client(), op_token, dev_token
        finally:
            server.shutdown()
            thread.join(5)
            conn.stop()


def test_a_deployment_is_activated_by_the_agent(
    tmp_path, broker, deploying_registry, videos, int8_model, data
):
    base, client, op, dev = deploying_registry
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    config = make_config(tmp_path, broker, base, dev, videos, int8_model)
    watcher = Watcher(broker)
    service = AgentService(config)
    service.start()
    try:
        wait_frames(service, 3)
        assert running_file(service) == FULL
        resp = client.post(
            f"/api/devices/{DEVICE}/deployments",
            json={"camera": "road", "model": "yolo-dyn", "version": 1, "reason": "e2e"},
            headers={"Authorization": f"Bearer {op}"},
        )
        assert resp.status_code == 201, resp.get_json()
        ev = watcher.wait_event("model_activated")
        assert (ev.data["model"], ev.data["version"], ev.data["sha256"]) == (
            "yolo-dyn",
            1,
            dyn["sha256"],
        )
        assert running_file(service).startswith("yolo-dyn-v1-")
        wait_frames(service, 3)
    finally:
        service.stop()
        watcher.close()
