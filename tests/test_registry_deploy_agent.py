"""A deployment end to end: the registry publishes, a real agent activates the model.

A real registry (SQLite) served over HTTP, its publisher wired to a real
`MqttConnection` on a real Mosquitto, and an in-process `AgentService` counting a
looping video (set-up shared with tests/test_agent_update.py). The agent downloads
with a *device token*: it may fetch only what is deployed to it.
"""

from __future__ import annotations

import pytest

from flowfleet.agent.service import AgentService
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.registry.http import auth
from tests.test_agent_update import (
    DEVICE,
    DYN,
    FULL,
    Watcher,
    make_config,
    running_file,
    served_registry,
    upload,
    wait_frames,
)


@pytest.fixture
def deploying_registry(tmp_path, broker):
    """(base URL, test client, operator token, device token) of a served registry
    that publishes desired states through a real MQTT connection; the device token
    is bound to DEVICE (``tokens create --device``)."""
    conn = MqttConnection("test-registry", BrokerAddress(broker.host, broker.port))
    conn.start()
    assert conn.wait_connected(10)

    try:
        with served_registry(tmp_path, connection=conn) as served:
            base, client, op, _ = served
            app = client.application
            db = app.extensions["flowfleet_model_registry"].db
            with db.connection_context():
                auth.create_user("fleet", "admin", actor="test")
                device_token, _ = auth.create_token("fleet", actor="test", device=DEVICE)
            yield base, client, op, device_token
    finally:
        conn.stop()


def test_a_deployment_is_activated_by_the_agent(
    tmp_path, broker, deploying_registry, videos, int8_model, data
):
    base, client, op, dev = deploying_registry
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    artifact = "/api/models/yolo-dyn/versions/1/artifact"
    refused = client.get(artifact, headers={"Authorization": f"Bearer {dev}"})
    assert refused.status_code == 403, "not deployed to the device yet"
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
