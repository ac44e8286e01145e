"""A device's health over time (``GET /api/devices/<id>/health``) on real SQLite and
PostgreSQL, the beats stored through the registry's real ingest.

Checked: beats fold into equal buckets (means per camera and of the system figures,
the largest outbox depth, the last drop counter), a bucket without beats is left out,
a figure no beat reported is null, the range and ``points`` are bounded (errors name
the parameter), an unknown device is a 404, and the response matches the OpenAPI
document.
"""

from __future__ import annotations

import time

import jsonschema
import pytest

from flowfleet.contract import CameraHealth, Health, SystemHealth, Topics
from flowfleet.registry.fleet.health_series import MAX_RANGE_S, health_series
from flowfleet.registry.fleet.ingest import Ingestor
from flowfleet.registry.http import auth
from flowfleet.registry.http.openapi import openapi_document
from flowfleet.registry.http.web import create_app

TOPICS = Topics()
T0 = float(int(time.time()) // 3600 * 3600 - 3 * 3600)  # three hours ago, on the hour


def beat(seq: int, ts: float, depth: int, temp: float | None, fps: float, ms: float) -> Health:
    return Health(
        device="pi-1",
        seq=seq,
        ts=ts,
        uptime_s=ts - T0 + 1,
        outbox_depth=depth,
        outbox_dropped=seq,
        system=SystemHealth(soc_temp_c=temp, load_1m=1.0) if temp is not None else None,
        cameras=(
            CameraHealth(camera="door", state="running", fps=fps, inference_ms=ms),
            CameraHealth(camera="yard", state="running", fps=fps / 2, inference_ms=2 * ms),
        ),
    )


@pytest.fixture
def client(registry):
    ingest = Ingestor(registry.db, TOPICS)
    beats = [
        # First 10 minutes: three beats.
        beat(1, T0 + 10, 0, 50.0, 10.0, 20.0),
        beat(2, T0 + 200, 7, 52.0, 12.0, 30.0),
        beat(3, T0 + 590, 3, None, 14.0, 40.0),
        # Nothing in the second 10 minutes (the device was off); one in the third.
        beat(4, T0 + 1300, 1, 60.0, 5.0, 100.0),
    ]
    for b in beats:
        assert ingest.handle(TOPICS.health("pi-1"), b.to_json()) == "stored"
    app = create_app(registry.db, registry=registry, anonymous_read="none")
    with registry.db.connection_context():
        auth.create_user("vic", "viewer", actor="test")
        token, _ = auth.create_token("vic", actor="test")
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return c


def test_beats_fold_into_buckets(client):
    resp = client.get(f"/api/devices/pi-1/health?from={T0}&to={T0 + 1800}&points=3")
    assert resp.status_code == 200, resp.get_json()
    h = resp.get_json()
    assert h["step_s"] == 600
    assert h["t"] == [T0, T0 + 1200]  # the empty middle bucket is left out
    assert h["beats"] == [3, 1]
    assert h["outbox_depth"] == [7, 1]  # the largest
    assert h["outbox_dropped"] == [3, 4]  # the last
    assert h["temperature_c"] == [51.0, 60.0]  # the beat without a sensor does not count
    assert h["load_1m"] == [1.0, 1.0]
    assert h["cpu_percent"] == [None, None]
    assert h["cameras"]["door"] == {
        "fps": [12.0, 5.0],
        "inference_ms": [30.0, 100.0],
        "inference_p95_ms": [None, None],
    }
    assert h["cameras"]["yard"]["fps"] == [6.0, 2.5]
    schema = openapi_document()["paths"]["/api/devices/{device}/health"]["get"]["responses"]
    jsonschema.validate(h, schema["200"]["content"]["application/json"]["schema"])


def test_default_range_is_the_last_day(client):
    h = client.get("/api/devices/pi-1/health").get_json()
    assert h["to"] - h["from"] == 86400
    assert sum(h["beats"]) == 4 and len(h["t"]) <= 300


@pytest.mark.parametrize(
    "query, field",
    [
        (f"from={T0}&to={T0}", "to"),
        (f"from={T0}&to={T0 + MAX_RANGE_S + 1}", "from"),
        (f"from={T0}&to={T0 + 60}&points=1", "points"),
        (f"from={T0}&to={T0 + 60}&points=1001", "points"),
        ("from=yesterday", "from"),
        ("step=minute", "step"),
    ],
)
def test_bad_ranges_are_refused_naming_the_parameter(client, query, field):
    resp = client.get(f"/api/devices/pi-1/health?{query}")
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["field"] == field


def test_unknown_device_is_404(client):
    resp = client.get("/api/devices/nobody/health")
    assert resp.status_code == 404 and resp.get_json()["error"]["field"] == "device"


def test_long_ranges_sample_the_means_but_keep_every_outbox_peak(registry):
    """240 beats in two buckets: the means come from every 10th beat, the largest
    outbox depth from all of them (the peak is on a beat that is not parsed)."""
    ingest = Ingestor(registry.db, TOPICS)
    items = [
        (
            TOPICS.health("pi-1"),
            beat(i + 1, T0 + 10 * i, 99 if i == 5 else 1, 50.0, 10.0, 20.0).to_json(),
            time.time(),
        )
        for i in range(240)
    ]
    assert set(ingest.handle_batch(items)) == {"stored"}
    with registry.db.connection_context():
        h = health_series("pi-1", T0, T0 + 2400, 2)
    assert h["beats"] == [120, 120]
    assert h["outbox_depth"] == [99, 1]
    assert h["outbox_dropped"] == [120, 240]
    assert h["cameras"]["door"]["fps"] == [10.0, 10.0]
    assert h["temperature_c"] == [50.0, 50.0]
