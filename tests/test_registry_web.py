"""Registry web UI and JSON API on a real SQLite database.

The database is filled through the real ingest path (`Ingestor.handle`), and the
last test runs the whole service (`run_registry`) against a real mosquitto.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.contract import (
    CameraModel,
    CountBin,
    DriftSummary,
    Event,
    Health,
    LineCount,
    Reported,
    Status,
    Topics,
    ZoneCount,
)
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.catalog.modelreg import RegistryConfig
from flowfleet.registry.fleet.ingest import STORED, Ingestor
from flowfleet.registry.http.openapi import openapi_document
from flowfleet.registry.http.web import create_app
from flowfleet.registry.service import run_registry
from flowfleet.registry.store.db import open_database
from flowfleet.registry.testing import KINDS, fresh_database, temporary_database

TOPICS = Topics()
# Test data lies on the current day: the registry refuses timestamps more than two years
# old or a day ahead of its clock (`contract.MAX_AGE_S`, `MAX_CLOCK_AHEAD_S`).
T0 = float(int(time.time()) // 86_400 * 86_400)


def make_bin(device: str, seq: int, lines=(), zones=()) -> CountBin:
    start = T0 + 60 * seq
    return CountBin(device=device, seq=seq, start=start, end=start + 60, lines=lines, zones=zones)


def lc(camera: str, line: str, cls: str, in_: int, out: int) -> LineCount:
    return LineCount(camera=camera, line=line, class_=cls, in_=in_, out=out)


def zc(zone: str, cls: str, entries: int, exits: int, dwell: float) -> ZoneCount:
    return ZoneCount(
        camera="front",
        zone=zone,
        class_=cls,
        entries=entries,
        exits=exits,
        peak_occupancy=entries,
        dwell_s_sum=dwell,
        dwell_n=exits,
    )


def ev(device: str, seq: int, ts: float, type_: str = "camera_running", **fields) -> Event:
    return Event(device=device, seq=seq, ts=ts, type=type_, **fields)


def drift(device: str, seq: int, camera: str, start: float, **fields) -> DriftSummary:
    return DriftSummary(
        device=device,
        seq=seq,
        camera=camera,
        start=start,
        end=start + 300,
        frames=100,
        detections=150,
        confidence_hist=(0, 0, 0, 10, 20, 30, 40, 30, 15, 5),
        detections_per_frame=1.5,
        detections_hist=(10, 40, 30, 15, 5, 0, 0),
        class_mix={"person": 150},
        **fields,
    )


# An event message a hostile or broken device might send: shown as text, never markup.
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'

# A model name a hostile device might report: shown as text, never markup.
HOSTILE_MODEL = "<b onmouseover=alert(3)>yolo</b>"

# What the fixture ingests: (topic, payload). cam-1 misses seq 3 (one gap).
MESSAGES = [
    (TOPICS.status("cam-1"), Status(device="cam-1", state="online", agent_version="0.1.0")),
    (TOPICS.counts("cam-1"), make_bin("cam-1", 1, (lc("front", "door", "person", 3, 1),))),
    (
        TOPICS.counts("cam-1"),
        make_bin(
            "cam-1",
            2,
            (lc("front", "door", "person", 2, 2), lc("front", "door", "car", 1, 0)),
            (zc("lobby", "person", 4, 2, 30.0),),
        ),
    ),
    (TOPICS.counts("cam-1"), make_bin("cam-1", 4, (lc("front", "door", "person", 5, 0),))),
    (TOPICS.health("cam-1"), Health(device="cam-1", seq=1, ts=T0, uptime_s=12.5)),
    (TOPICS.counts("cam-2"), make_bin("cam-2", 1, (lc("yard", "gate", "truck", 1, 1),))),
    # Events: cam-1 seq 2 happened before seq 1 (ts decides "newest", not seq).
    (TOPICS.events("cam-1"), ev("cam-1", 1, T0 + 300, camera="front", message="up")),
    (
        TOPICS.events("cam-1"),
        ev(
            "cam-1",
            2,
            T0 + 100,
            "outbox_dropped",
            severity="warning",
            message="outbox cap dropped 4 health message(s)",
            data={"stream": "health", "n": 4, "policy": "keep_counts"},
        ),
    ),
    (
        TOPICS.events("cam-2"),
        ev("cam-2", 1, T0 + 200, "camera_failed", severity="error", message=HOSTILE),
    ),
    (TOPICS.drift("cam-1"), drift("cam-1", 1, "front", T0, model="yolo-v1")),
    (TOPICS.drift("cam-1"), drift("cam-1", 2, "back", T0)),
    (TOPICS.drift("cam-1"), drift("cam-1", 3, "front", T0 + 300, brightness=80.5)),
    # Reported state: cam-1 runs a registry model on front and its config file on back.
    (
        TOPICS.reported("cam-1"),
        Reported(
            device="cam-1",
            ts=T0 + 400,
            desired_version=2,
            cameras=(
                CameraModel(
                    camera="front",
                    model="yolov8n-int8",
                    version=2,
                    file="yolov8n-int8-v2.tflite",
                    update="activated",
                ),
                CameraModel(
                    camera="back",
                    file="config.tflite",
                    update="rolled_back",
                    reason="activate: no frames",
                ),
            ),
        ),
    ),
    (
        TOPICS.reported("cam-3"),
        Reported(
            device="cam-3",
            ts=T0 + 400,
            cameras=(CameraModel(camera="yard", model=HOSTILE_MODEL, version=1),),
        ),
    ),
]


@pytest.fixture(params=KINDS, scope="module")
def shared_db(request, tmp_path_factory):
    with temporary_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def db_url(shared_db):
    """The registry database, emptied: a SQLite file, then a PostgreSQL database."""
    return fresh_database(shared_db)


@pytest.fixture
def db(db_url):
    database = open_database(db_url)
    ingestor = Ingestor(database, TOPICS)
    for topic, message in MESSAGES:
        assert ingestor.handle(topic, message.to_json()) == STORED
    for n in range(3):
        ingestor.handle(TOPICS.counts("cam-2"), f"garbage {n}".encode())
    return database


@pytest.fixture
def client(db):
    return create_app(db).test_client()


def test_totals_sum_every_bin_per_device_camera_line_class(client):
    resp = client.get("/api/totals")

    assert resp.status_code == 200
    body = resp.get_json()
    assert body["device"] is None
    assert body["lines"] == [
        {"device": "cam-1", "camera": "front", "line": "door", "class": "car", "in": 1, "out": 0},
        {
            "device": "cam-1",
            "camera": "front",
            "line": "door",
            "class": "person",
            "in": 10,
            "out": 3,
        },
        {"device": "cam-2", "camera": "yard", "line": "gate", "class": "truck", "in": 1, "out": 1},
    ]
    assert body["zones"] == [
        {
            "device": "cam-1",
            "camera": "front",
            "zone": "lobby",
            "class": "person",
            "entries": 4,
            "exits": 2,
            "peak_occupancy": 4,
            "dwell_s_sum": 30.0,
            "dwell_n": 2,
            "dwell_s_avg": 15.0,
        }
    ]


def test_totals_device_filter(client):
    body = client.get("/api/totals?device=cam-2").get_json()

    assert body["device"] == "cam-2"
    assert [(r["device"], r["class"], r["in"]) for r in body["lines"]] == [("cam-2", "truck", 1)]
    assert body["zones"] == []


def test_devices_report_state_bins_and_gaps(client):
    body = client.get("/api/devices").get_json()

    by_id = {d["device"]: d for d in body["devices"]}
    assert list(by_id) == ["cam-1", "cam-2", "cam-3"]
    one = by_id["cam-1"]
    assert one["state"] == "online"
    assert one["agent_version"] == "0.1.0"
    assert (one["bins"], one["highest_seq"], one["gaps"]) == (3, 4, 1)
    assert one["health_beats"] == 1 and one["last_health"]["uptime_s"] == 12.5
    assert isinstance(one["last_seen"], float)
    two = by_id["cam-2"]
    assert (two["state"], two["bins"], two["gaps"], two["dead_letters"]) == ("unknown", 1, 0, 3)


def test_devices_carry_their_latest_reported_state(client):
    by_id = {d["device"]: d for d in client.get("/api/devices").get_json()["devices"]}

    assert by_id["cam-2"]["reported"] is None
    rep = by_id["cam-1"]["reported"]
    assert (rep["ts"], rep["desired_version"]) == (T0 + 400, 2)
    assert isinstance(rep["received_at"], float)
    front, back = rep["cameras"]
    assert front == {
        "camera": "front",
        "model": "yolov8n-int8",
        "version": 2,
        "sha256": None,
        "file": "yolov8n-int8-v2.tflite",
        "update": "activated",
        "update_model": None,
        "update_version": None,
        "reason": None,
        "update_ts": None,
    }
    assert (back["model"], back["file"], back["update"]) == (None, "config.tflite", "rolled_back")
    assert by_id["cam-3"]["reported"]["cameras"][0]["model"] == HOSTILE_MODEL


def test_devices_response_matches_the_openapi_schema(client):
    import jsonschema  # schemathesis' dependency

    document = openapi_document()
    op = document["paths"]["/api/devices"]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    schema = {**schema, "components": document["components"]}
    body = client.get("/api/devices").get_json()

    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    assert {d["reported"] is None for d in body["devices"]} == {True, False}


def test_dead_letters_newest_first_with_limit(client):
    body = client.get("/api/dead-letters?limit=2").get_json()

    letters = body["dead_letters"]
    assert [d["payload"] for d in letters] == ["garbage 2", "garbage 1"]
    assert all("not JSON" in d["reason"] and d["device"] == "cam-2" for d in letters)
    assert letters[0]["id"] > letters[1]["id"]


def test_events_newest_first_with_every_field(client):
    resp = client.get("/api/events")

    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["total"], body["limit"], body["offset"], body["next_offset"]) == (3, 100, 0, None)
    assert [(e["device"], e["seq"]) for e in body["events"]] == [
        ("cam-1", 1),
        ("cam-2", 1),
        ("cam-1", 2),
    ]
    dropped = body["events"][2]
    received_at = dropped.pop("received_at")
    assert isinstance(received_at, float)
    assert dropped == {
        "device": "cam-1",
        "seq": 2,
        "ts": T0 + 100,
        "type": "outbox_dropped",
        "severity": "warning",
        "camera": None,
        "message": "outbox cap dropped 4 health message(s)",
        "data": {"stream": "health", "n": 4, "policy": "keep_counts"},
    }
    assert body["events"][1]["message"] == HOSTILE  # JSON carries it verbatim


@pytest.mark.parametrize(
    ("query", "keys", "total", "next_offset"),
    [
        ("device=cam-1", [("cam-1", 1), ("cam-1", 2)], 2, None),
        ("device=cam-2", [("cam-2", 1)], 1, None),
        ("limit=2", [("cam-1", 1), ("cam-2", 1)], 3, 2),
        ("limit=2&offset=2", [("cam-1", 2)], 3, None),
        ("device=cam-1&limit=1&offset=1", [("cam-1", 2)], 2, None),
        ("offset=3", [], 3, None),
    ],
)
def test_events_filters_and_pages(client, query, keys, total, next_offset):
    body = client.get(f"/api/events?{query}").get_json()

    assert [(e["device"], e["seq"]) for e in body["events"]] == keys
    assert (body["total"], body["next_offset"]) == (total, next_offset)


def test_drift_newest_window_first_and_filters(client):
    body = client.get("/api/drift?device=cam-1").get_json()

    assert [(d["seq"], d["camera"]) for d in body["drift"]] == [
        (3, "front"),
        (2, "back"),
        (1, "front"),
    ]
    assert body["total"] == 3
    latest = body["drift"][0]
    assert latest["brightness"] == 80.5 and latest["blur"] is None and latest["model"] is None
    assert latest["confidence_hist"] == [0, 0, 0, 10, 20, 30, 40, 30, 15, 5]
    assert latest["class_mix"] == {"person": 150}
    front = client.get("/api/drift?device=cam-1&camera=front&limit=1").get_json()
    assert [d["seq"] for d in front["drift"]] == [3] and front["next_offset"] == 1
    assert client.get("/api/drift?camera=nowhere").get_json()["drift"] == []
    assert client.get("/api/drift?device=cam-2").get_json()["total"] == 0


@pytest.mark.parametrize(
    ("url", "status", "code", "field"),
    [
        ("/api/totals?device=no/such", 400, "invalid_parameter", "device"),
        ("/api/totals?devcie=cam-1", 400, "unknown_parameter", "devcie"),
        ("/api/totals?device=cam-1&device=cam-2", 400, "invalid_parameter", "device"),
        ("/api/totals?device=cam-404", 404, "unknown_device", "device"),
        ("/api/devices?verbose=1", 400, "unknown_parameter", "verbose"),
        ("/api/dead-letters?limit=0", 400, "invalid_parameter", "limit"),
        ("/api/dead-letters?limit=ten", 400, "invalid_parameter", "limit"),
        ("/api/dead-letters?limit=100000", 400, "invalid_parameter", "limit"),
        ("/api/events?device=cam-404", 404, "unknown_device", "device"),
        ("/api/events?device=a/b", 400, "invalid_parameter", "device"),
        ("/api/events?limit=0", 400, "invalid_parameter", "limit"),
        ("/api/events?limit=1001", 400, "invalid_parameter", "limit"),
        ("/api/events?offset=-1", 400, "invalid_parameter", "offset"),
        ("/api/events?offset=x", 400, "invalid_parameter", "offset"),
        ("/api/events?type=camera_failed", 400, "unknown_parameter", "type"),
        ("/api/drift?camera=a/b", 400, "invalid_parameter", "camera"),
        ("/api/drift?device=cam-404", 404, "unknown_device", "device"),
        ("/api/nope", 404, "not_found", None),
    ],
)
def test_api_errors_are_json(client, url, status, code, field):
    resp = client.get(url)

    assert resp.status_code == status
    assert resp.is_json
    error = resp.get_json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]


def test_wrong_method_under_api_is_a_json_405(client):
    resp = client.post("/api/totals")
    assert resp.status_code == 405
    assert resp.get_json()["error"]["code"] == "method_not_allowed"


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {
        "status": "ok",
        "database": "ok",
        "commands": {"pending": 0, "oldest_pending_s": None},
    }


def _scripts(client, page: str) -> str:
    """The text of every script a page loads; each must come from the registry itself."""
    import re

    srcs = re.findall(r'<script src="([^"]+)"', page)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
    assert srcs and styles
    text = ""
    for src in srcs + styles:
        # The registry machine may have no internet access: nothing from a CDN.
        assert src.startswith("/static/"), src
        resp = client.get(src)
        assert resp.status_code == 200, src
        text += resp.get_data(as_text=True) if src in srcs else ""
        resp.close()
    return text


def test_dashboard_renders_devices_offline_and_serves_its_own_scripts(client):
    resp = client.get("/")

    assert resp.status_code == 200
    page = resp.get_data(as_text=True)
    for text in ("cam-1", "cam-2", "online"):
        assert text in page
    scripts = _scripts(client, page)
    # It reads the series API, re-reads when its live stream says so, else polls.
    assert "/api/series" in scripts and 'new EventSource("/api/live")' in scripts
    assert 'loop("counts", counts, 2000, "refresh")' in scripts


def test_dashboard_shows_each_devices_camera_models_as_text(client):
    page = client.get("/").get_data(as_text=True)

    assert "<th>models</th>" in page
    assert "front: yolov8n-int8 v2; back: config.tflite (update rolled_back)" in page
    # The hostile model name is escaped server-side; the scripts use text nodes only.
    assert HOSTILE_MODEL not in page and "<b onmouseover" not in page
    assert "yard: &lt;b onmouseover=alert(3)&gt;yolo&lt;/b&gt; v1" in page
    scripts = _scripts(client, page)
    assert "models(r.reported)" in scripts and "innerHTML" not in scripts


def test_dashboard_shows_latest_events_as_text(client):
    page = client.get("/").get_data(as_text=True)

    assert "<h2>Events</h2>" in page
    for text in ("outbox_dropped", "camera_failed", "outbox cap dropped 4 health message(s)"):
        assert text in page
    # The hostile message is escaped server-side; the scripts fill cells with text nodes.
    assert HOSTILE not in page and "<script>alert(2)" not in page
    assert "&lt;img src=x onerror=" in page
    assert "innerHTML" not in _scripts(client, page) and "/api/events?limit=10" in page


def test_dashboard_renders_an_empty_registry(tmp_path):
    resp = create_app(open_database(tmp_path / "empty.db")).test_client().get("/")
    assert resp.status_code == 200
    assert "no devices yet" in resp.get_data(as_text=True)
    assert "no events yet" in resp.get_data(as_text=True)


# -- the whole service -------------------------------------------------------------


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_run_registry_ingests_serves_and_stops(broker, tmp_path, db_url):
    stop = threading.Event()
    ready: list[str] = []
    address = BrokerAddress(host=broker.host, port=broker.port)
    thread = threading.Thread(
        target=run_registry,
        kwargs={
            "db_path": db_url,
            "broker": address,
            "http_host": "127.0.0.1",
            "http_port": 0,
            "topics_root": TOPICS.root,
            "stop_event": stop,
            "client_id": "registry-service-test",
            "on_ready": ready.append,
            "registry_config": RegistryConfig.beside(tmp_path / "state.db"),
        },
    )
    thread.start()
    pub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="service-test-publisher",
        protocol=mqtt.MQTTv5,
    )
    try:
        deadline = time.monotonic() + 15
        while not ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready, "run_registry did not report ready"
        url = ready[0]
        assert _get_json(url + "healthz")["ingest"]["connected"] is True

        pub.connect(broker.host, broker.port)
        pub.loop_start()
        # Retained, so it arrives whenever the registry's subscription takes effect.
        status = Status(device="cam-7", state="online").to_json()
        pub.publish(TOPICS.status("cam-7"), status, qos=1, retain=True).wait_for_publish(5)
        bins = [make_bin("cam-7", s, (lc("front", "door", "person", s, 1),)) for s in range(1, 11)]
        for b in bins:
            pub.publish(TOPICS.counts("cam-7"), b.to_json(), qos=1).wait_for_publish(5)

        def person_in() -> int:
            try:
                lines = _get_json(url + "api/totals?device=cam-7")["lines"]
            except urllib.error.HTTPError as exc:
                assert exc.code == 404  # the device is not known yet
                return 0
            return lines[0]["in"] if lines else 0

        deadline = time.monotonic() + 15
        while person_in() != sum(range(1, 11)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert person_in() == 55
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert "cam-7" in resp.read().decode()
    finally:
        pub.disconnect()
        pub.loop_stop()
        stop.set()
        thread.join(15)
    assert not thread.is_alive(), "run_registry did not stop"
