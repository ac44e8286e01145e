"""The registry's Prometheus endpoint: names, labels and values after real actions.

Counters are per process, so each test compares a scrape before and after what it
does; the fleet gauges come from the database at scrape time.
"""

from __future__ import annotations

import io

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowfleet.contract import Topics
from flowfleet.registry.fleet.ingest import Ingestor
from flowfleet.registry.http.web import create_app

from .test_registry_ingest import make_event

TFLITE = "yolov8n_full_integer_quant.tflite"
TOPICS = Topics()


@pytest.fixture
def app(registry):
    return create_app(registry.db, registry=registry)


def scrape(client, **kw) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics", **kw)
    assert resp.status_code == 200, resp.data
    assert resp.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(after, before, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def upload(client, token_headers, name, raw, filename):
    return client.post(
        f"/api/models/{name}/versions",
        data={"file": (io.BytesIO(raw), filename)},
        headers=token_headers,
        content_type="multipart/form-data",
    )


def test_uploads_ingest_dead_letters_rollbacks_and_latency_are_counted(app, data):
    from flowfleet.registry.http import auth

    client = app.test_client()
    with app.extensions["flowfleet_model_registry"].db.connection_context():
        auth.create_user("ops", "operator", actor="t")
        token, _ = auth.create_token("ops", actor="t")
    headers = {"Authorization": f"Bearer {token}"}
    before = scrape(client)

    raw = (data / "models" / TFLITE).read_bytes()
    assert upload(client, headers, "yolo", raw, TFLITE).status_code == 201
    assert upload(client, headers, "yolo", raw, TFLITE).status_code == 200  # same bytes
    assert upload(client, headers, "yolo", b"not a model\n" * 50, "x.tflite").status_code == 422

    db = app.extensions["flowfleet_model_registry"].db
    ingest = Ingestor(db, TOPICS)
    with db.connection_context():
        event = make_event(device="cam-9", seq=1, type="model_rolled_back", severity="error")
        assert ingest.handle(TOPICS.events("cam-9"), event.to_json()) == "stored"
        assert ingest.handle(TOPICS.events("cam-9"), event.to_json()) == "duplicate"
        assert ingest.handle(TOPICS.events("cam-9"), b"{not json") == "dead-letter"
        assert ingest.handle("elsewhere/x", b"{}") == "dead-letter"

    after = scrape(client)
    m = "flowfleet_registry_uploads_total"
    assert delta(after, before, m, result="created", runtime="tflite") == 1
    assert delta(after, before, m, result="duplicate", runtime="tflite") == 1
    assert delta(after, before, m, result="refused", runtime="") == 1
    m = "flowfleet_registry_ingest_messages_total"
    assert delta(after, before, m, kind="events", outcome="stored") == 1
    assert delta(after, before, m, kind="events", outcome="duplicate") == 1
    assert delta(after, before, m, kind="events", outcome="dead-letter") == 1
    assert delta(after, before, m, kind="invalid", outcome="dead-letter") == 1
    assert delta(after, before, "flowfleet_registry_dead_letters_total") == 2
    assert delta(after, before, "flowfleet_registry_rollbacks_total") == 1
    # Fleet gauges read from the database.
    assert after[("flowfleet_registry_model_versions", ())] == 1
    assert after[("flowfleet_registry_dead_letters_stored", ())] == 2
    assert after[("flowfleet_registry_devices", (("state", "unknown"),))] == 1
    # Latency histogram: one series per route pattern, not per model name.
    count = "flowfleet_registry_http_request_duration_seconds_count"
    route = "/api/models/<name>/versions"
    assert delta(after, before, count, method="POST", endpoint=route, status="201") == 1
    assert delta(after, before, count, method="POST", endpoint=route, status="422") == 1


def test_metrics_follow_the_dashboard_read_policy(app):
    client = app.test_client()
    scrape(client)  # loopback, no token: allowed by the default "local" policy
    resp = client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert resp.status_code == 401
