"""Registry ingest against a real mosquitto and a real SQLite file.

Messages are published by a plain paho client, exactly as an agent (or anything
else on the network) would, and the assertions read what the registry stored.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import paho.mqtt.client as mqtt
import peewee as pw
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
from flowfleet.registry.fleet.ingest import (
    DEAD_LETTER,
    DEFERRED,
    DUPLICATE,
    STORED,
    Ingestor,
)
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.http.web import devices, drift_summaries, events, totals
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import KINDS, fresh_database, temporary_database

TOPICS = Topics()
DEVICE = "cam-1"
# Test data lies on the current day: the registry refuses timestamps more than two years
# old or a day ahead of its clock (`contract.MAX_AGE_S`, `MAX_CLOCK_AHEAD_S`).
T0 = float(int(time.time()) // 86_400 * 86_400)

# -- factories -------------------------------------------------------------------


def make_bin(device: str = DEVICE, seq: int = 1, *, lines=None, zones=None) -> CountBin:
    if lines is None:
        lines = [line_count(in_=seq % 3 + 1, out=seq % 2)]
    start = T0 + 60 * seq
    return CountBin(
        device=device,
        seq=seq,
        start=start,
        end=start + 60,
        lines=tuple(lines),
        zones=tuple(zones or ()),
    )


def line_count(camera="front", line="door", cls="person", in_=1, out=0) -> LineCount:
    return LineCount(camera=camera, line=line, class_=cls, in_=in_, out=out)


def zone_count(camera="front", zone="lobby", cls="person", entries=1, exits=1) -> ZoneCount:
    return ZoneCount(
        camera=camera,
        zone=zone,
        class_=cls,
        entries=entries,
        exits=exits,
        peak_occupancy=entries,
        dwell_s_sum=2.5 * exits,
        dwell_n=exits,
    )


def varied_bins(device: str, n: int) -> list[CountBin]:
    """N bins spread over two cameras, lines and classes, with zones on some."""
    bins = []
    for seq in range(1, n + 1):
        lines = [
            line_count("front", "door", "person", in_=seq % 4, out=(seq * 3) % 5),
            line_count("front", "door", "bicycle", in_=seq % 2, out=0),
            line_count("back", "gate", "car", in_=(seq * 7) % 3, out=seq % 3),
        ]
        zones = [zone_count(entries=seq % 3, exits=seq % 2)] if seq % 2 else []
        bins.append(make_bin(device, seq, lines=lines, zones=zones))
    return bins


def expected_line_totals(bins: list[CountBin]) -> dict[tuple, tuple[int, int]]:
    acc: Counter = Counter()
    for b in bins:
        for lc in b.lines:
            key = (b.device, lc.camera, lc.line, lc.class_)
            acc[(*key, "in")] += lc.in_
            acc[(*key, "out")] += lc.out
    keys = {k[:4] for k in acc}
    return {k: (acc[(*k, "in")], acc[(*k, "out")]) for k in keys}


def line_totals_by_key(result: dict) -> dict[tuple, tuple[int, int]]:
    return {
        (r["device"], r["camera"], r["line"], r["class"]): (r["in"], r["out"])
        for r in result["lines"]
    }


def make_event(device: str = DEVICE, seq: int = 1, **changes) -> Event:
    fields = {
        "device": device,
        "seq": seq,
        "ts": T0 + seq,
        "type": "outbox_dropped",
        "severity": "warning",
        "message": f"outbox cap dropped {seq} health message(s)",
        "data": {"stream": "health", "n": seq, "first_seq": 1, "policy": "keep_counts"},
    }
    return Event(**{**fields, **changes})


def make_drift(device: str = DEVICE, seq: int = 1, **changes) -> DriftSummary:
    start = T0 + 300 * seq
    fields = {
        "device": device,
        "seq": seq,
        "camera": "front",
        "model": "yolov8n_full_integer_quant.tflite",
        "start": start,
        "end": start + 300,
        "frames": 2990,
        "detections": 4123,
        "confidence_hist": (0, 310, 402, 388, 371, 420, 612, 801, 690, 129),
        "detections_per_frame": 1.3789,
        "detections_hist": (812, 1020, 640, 401, 117, 0, 0),
        "class_mix": {"person": 3900, "bicycle": 223},
        "brightness": 112.4,
    }
    return DriftSummary(**{**fields, **changes})


def raw(message) -> dict:
    return json.loads(message.to_json())


# -- helpers ---------------------------------------------------------------------


class Publisher:
    """A plain paho client, standing in for an agent."""

    def __init__(self, broker, client_id: str = "test-publisher") -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"broker did not acknowledge {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stored_bins(device: str | None = None) -> int:
    query = regdb.CountBin.select()
    if device is not None:
        query = query.where(regdb.CountBin.device == device)
    return query.count()


def wait_subscribed(pub: Publisher, device: str = DEVICE) -> None:
    """Block until the worker's subscription is live.

    A retained status reaches the worker whenever its subscription takes effect, so
    seeing it stored proves that later publishes will be delivered too.
    """
    pub.publish(TOPICS.status(device), Status(device=device, state="online").to_json(), True)
    wait_until(lambda: regdb.Device.get_or_none(id=device, state="online"), what="subscription")


@pytest.fixture
def address(broker) -> BrokerAddress:
    return BrokerAddress(host=broker.host, port=broker.port)


@pytest.fixture(params=KINDS, scope="module")
def shared_db(request, tmp_path_factory) -> str:
    with temporary_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def db_path(shared_db) -> str:
    """The registry database, emptied: a SQLite file, then a PostgreSQL database."""
    return fresh_database(shared_db)


@pytest.fixture
def worker(db_path, address):
    w = IngestWorker(db_path, address, TOPICS, client_id="registry-under-test")
    assert w.start(wait=10), "registry did not connect to the broker"
    yield w
    w.stop()


@pytest.fixture
def publisher(broker, worker):
    pub = Publisher(broker)
    wait_subscribed(pub)
    yield pub
    pub.close()


# -- over MQTT -------------------------------------------------------------------


def test_published_bins_are_stored_and_totals_equal_the_sums(worker, publisher):
    bins = varied_bins(DEVICE, 40) + varied_bins("cam-2", 15)
    for b in bins:
        publisher.publish(TOPICS.counts(b.device), b.to_json())

    wait_until(lambda: stored_bins() == len(bins), what="all bins stored")

    assert line_totals_by_key(totals()) == expected_line_totals(bins)
    zones = {(r["device"], r["zone"]): r for r in totals()["zones"]}
    mine = [z for b in bins if b.device == DEVICE for z in b.zones]
    assert zones[(DEVICE, "lobby")]["entries"] == sum(z.entries for z in mine)
    assert zones[(DEVICE, "lobby")]["dwell_n"] == sum(z.dwell_n for z in mine)
    by_device = {d["device"]: d for d in devices()}
    assert by_device[DEVICE]["bins"] == 40
    assert by_device[DEVICE]["highest_seq"] == 40
    assert by_device[DEVICE]["gaps"] == 0
    assert by_device["cam-2"]["state"] == "unknown"  # auto-created, no status yet
    assert worker.outcomes[DEAD_LETTER] == 0


def test_messages_delivered_twice_are_stored_once(worker, publisher):
    bins = varied_bins(DEVICE, 20)
    beats = [Health(device=DEVICE, seq=s, ts=T0 + s, uptime_s=s) for s in (1, 2, 3)]
    for _ in range(2):
        for msg in bins:
            publisher.publish(TOPICS.counts(DEVICE), msg.to_json())
        for msg in beats:
            publisher.publish(TOPICS.health(DEVICE), msg.to_json())

    wait_until(lambda: worker.outcomes[DUPLICATE] == len(bins) + len(beats), what="duplicates")

    assert stored_bins() == len(bins)
    assert regdb.HealthBeat.select().count() == len(beats)
    assert line_totals_by_key(totals()) == expected_line_totals(bins)
    assert regdb.DeadLetter.select().count() == 0


def test_published_events_and_drift_are_stored_once(worker, publisher):
    """An agent's events and drift summaries over MQTT, each delivered twice."""
    evs = [make_event(seq=s) for s in (1, 2, 3)]
    drifts = [make_drift(seq=s) for s in (1, 2)]
    for _ in range(2):
        for ev in evs:
            publisher.publish(TOPICS.events(DEVICE), ev.to_json())
        for dr in drifts:
            publisher.publish(TOPICS.drift(DEVICE), dr.to_json())

    wait_until(lambda: worker.outcomes[DUPLICATE] == len(evs) + len(drifts), what="duplicates")

    assert regdb.Event.select().count() == len(evs)
    assert regdb.DriftSummary.select().count() == len(drifts)
    assert worker.outcomes[DEAD_LETTER] == 0
    items, total = events()
    assert total == 3 and [e["seq"] for e in items] == [3, 2, 1]
    assert items[0]["data"] == {"stream": "health", "n": 3, "first_seq": 1, "policy": "keep_counts"}


def _wrong_schema() -> bytes:
    return json.dumps({**raw(make_bin()), "schema": 2}).encode()


def _negative_count() -> bytes:
    body = raw(make_bin())
    body["lines"][0]["in"] = -3
    return json.dumps(body).encode()


MALFORMED = [
    # id, topic, payload, words the reason must contain
    ("non-json", TOPICS.counts(DEVICE), b"\xffnot json{", ["not JSON"]),
    ("json-array", TOPICS.counts(DEVICE), b"[1, 2]", ["list", "not an object"]),
    ("schema-version", TOPICS.counts(DEVICE), _wrong_schema(), ["'schema'", "version 2"]),
    ("negative-count", TOPICS.counts(DEVICE), _negative_count(), ["lines.0.in", "greater"]),
    (
        "device-mismatch",
        TOPICS.counts(DEVICE),
        make_bin(device="cam-9").to_json(),
        ["'device'", "cam-9", DEVICE],
    ),
    (
        "unknown-kind",
        f"{TOPICS.root}/devices/{DEVICE}/bogus",
        make_bin().to_json(),
        ["unknown kind", "bogus"],
    ),
    (
        "kind-mismatch",
        TOPICS.health(DEVICE),
        make_bin().to_json(),
        ["'kind'", "counts"],
    ),
    ("oversize", TOPICS.counts(DEVICE), b"x" * (200 * 1024), ["over the", "limit"]),
]


@pytest.mark.parametrize(
    ("topic", "payload", "words"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_message_is_dead_lettered_and_ingest_goes_on(
    worker, publisher, topic, payload, words
):
    publisher.publish(TOPICS.counts(DEVICE), make_bin(seq=1).to_json())
    publisher.publish(topic, payload)
    publisher.publish(TOPICS.counts(DEVICE), make_bin(seq=2).to_json())

    wait_until(lambda: stored_bins() == 2, what="valid bins after the bad one")

    letters = list(regdb.DeadLetter.select())
    assert len(letters) == 1
    letter = letters[0]
    assert letter.topic == topic
    assert letter.device == DEVICE
    for word in words:
        assert word in letter.reason, f"{word!r} not in reason {letter.reason!r}"
    assert letter.payload_size == len(payload)
    assert bytes(letter.payload) == payload[: regdb.DEAD_LETTER_MAX_BYTES]
    # Counted by the worker just after its batch committed: the rows may show first.
    wait_until(lambda: worker.outcomes[DEAD_LETTER] == 1, what="the dead letter counted")


def test_registry_restart_receives_what_was_published_while_down(broker, db_path, address):
    first = IngestWorker(db_path, address, TOPICS, client_id="registry-restart")
    assert first.start(wait=10)
    pub = Publisher(broker)
    try:
        wait_subscribed(pub)
        first.stop()

        bins = varied_bins(DEVICE, 30)
        for b in bins:
            pub.publish(TOPICS.counts(DEVICE), b.to_json())
        time.sleep(0.3)
        assert stored_bins() == 0, "nothing is stored while the registry is down"

        second = IngestWorker(db_path, address, TOPICS, client_id="registry-restart")
        assert second.start(wait=10)
        try:
            wait_until(lambda: stored_bins() == len(bins), what="queued bins after restart")
            assert line_totals_by_key(totals()) == expected_line_totals(bins)
        finally:
            second.stop()
    finally:
        pub.close()


# -- Ingestor directly (no broker): edge cases of storage ------------------------


@pytest.fixture
def ingestor(db_path) -> Ingestor:
    return Ingestor(regdb.open_database(db_path), TOPICS)


def test_same_seq_with_different_content_keeps_the_first(ingestor):
    first = make_bin(seq=7, lines=[line_count(in_=5)])
    second = make_bin(seq=7, lines=[line_count(in_=6)])

    assert ingestor.handle(TOPICS.counts(DEVICE), first.to_json()) == STORED
    assert ingestor.handle(TOPICS.counts(DEVICE), second.to_json()) == DEAD_LETTER
    assert ingestor.handle(TOPICS.counts(DEVICE), first.to_json()) == DUPLICATE

    assert totals()["lines"][0]["in"] == 5
    (letter,) = regdb.DeadLetter.select()
    assert "seq 7" in letter.reason and "different content" in letter.reason


def test_equivalent_json_is_a_duplicate_not_a_conflict(ingestor):
    bin_ = make_bin(seq=3)
    reordered = json.dumps(dict(reversed(list(raw(bin_).items()))), indent=2).encode()

    assert ingestor.handle(TOPICS.counts(DEVICE), bin_.to_json()) == STORED
    assert ingestor.handle(TOPICS.counts(DEVICE), reordered) == DUPLICATE


@pytest.mark.parametrize(
    ("sequence", "state", "version"),
    [
        ([("online", "1.2.0")], "online", "1.2.0"),
        ([("online", "1.2.0"), ("offline", None)], "offline", "1.2.0"),
        ([("offline", None), ("online", "2.0")], "online", "2.0"),
    ],
)
def test_status_updates_the_device_in_arrival_order(ingestor, sequence, state, version):
    for st, ver in sequence:
        msg = Status(device=DEVICE, state=st, ts=1e9, agent_version=ver)
        assert ingestor.handle(TOPICS.status(DEVICE), msg.to_json()) == STORED
    dev = regdb.Device.get_by_id(DEVICE)
    assert (dev.state, dev.agent_version) == (state, version)
    assert dev.last_seen is not None and dev.first_seen <= dev.last_seen


def test_gaps_count_missing_sequence_numbers(ingestor):
    for seq in (1, 2, 5, 9):
        assert ingestor.handle(TOPICS.counts(DEVICE), make_bin(seq=seq).to_json()) == STORED
    (dev,) = devices()
    assert (dev["bins"], dev["highest_seq"], dev["gaps"]) == (4, 9, 5)


def test_a_broken_database_defers_the_message_and_never_dead_letters_it(db_path):
    """Dead letters are for wrong messages: a registry fault leaves no trace."""
    ingestor = Ingestor(regdb.open_database(db_path), TOPICS, retry_s=0.3)
    db = ingestor.db
    db.execute_sql('DROP TABLE "line_total"')  # storing a bin now fails mid-transaction

    outcome = ingestor.handle(TOPICS.counts(DEVICE), make_bin(seq=1).to_json())

    assert outcome == DEFERRED
    assert regdb.DeadLetter.select().count() == 0
    assert stored_bins() == 0, "the failed transaction left no half-stored bin"
    assert regdb.Device.select().count() == 0

    # A wrong message still needs the dead-letter table; without it, nothing is lost
    # either: the message is deferred for redelivery.
    db.execute_sql('DROP TABLE "dead_letter"')
    assert ingestor.handle(TOPICS.counts(DEVICE), b"not json") == DEFERRED


# -- events and drift summaries (Ingestor directly) ----------------------------------

# kind, factory, table, what the conflict reason calls it, a change of content
SEQUENCED = [
    ("events", make_event, regdb.Event, "event", {"message": "something else"}),
    ("drift", make_drift, regdb.DriftSummary, "drift summary", {"frames": 1}),
    ("health", None, regdb.HealthBeat, "health beat", {"uptime_s": 99.0}),
    ("counts", None, regdb.CountBin, "count bin", {"lines": (line_count(in_=9),)}),
]


def _factory(kind: str, factory):
    if factory is not None:
        return factory
    if kind == "health":
        return lambda seq=1, **ch: Health(
            **{"device": DEVICE, "seq": seq, "ts": T0 + seq, "uptime_s": 1.0, **ch}
        )
    return lambda seq=1, **ch: make_bin(seq=seq, lines=ch.get("lines"))


@pytest.mark.parametrize(
    ("kind", "factory", "table", "what", "change"),
    SEQUENCED,
    ids=[case[0] for case in SEQUENCED],
)
def test_sequenced_kinds_are_stored_once_and_conflicts_keep_the_first(
    ingestor, kind, factory, table, what, change
):
    make = _factory(kind, factory)
    topic = TOPICS.device(DEVICE, kind)
    first, other = make(seq=5), make(seq=6)
    conflicting = make(seq=5, **change)
    assert first.to_json() != conflicting.to_json()

    assert ingestor.handle(topic, first.to_json()) == STORED
    assert ingestor.handle(topic, other.to_json()) == STORED
    assert ingestor.handle(topic, first.to_json()) == DUPLICATE
    assert ingestor.handle(topic, conflicting.to_json()) == DEAD_LETTER

    assert table.select().count() == 2
    kept = table.get(table.device == DEVICE, table.seq == 5)
    assert json.loads(kept.payload) == raw(first), "the first copy is kept"
    (letter,) = regdb.DeadLetter.select()
    assert letter.reason.startswith(f"{what} seq 5 was already stored with different content")
    assert letter.topic == topic and letter.device == DEVICE
    assert bytes(letter.payload) == conflicting.to_json()


def test_event_columns_and_api_shape(ingestor):
    ev = make_event(seq=4, camera="front", severity="error", type="camera_failed")
    quiet = make_event(seq=5, severity="info", message="", data={})
    for msg in (ev, quiet):
        assert ingestor.handle(TOPICS.events(DEVICE), msg.to_json()) == STORED

    row = regdb.Event.get(regdb.Event.seq == 4)
    assert (row.device_id, row.ts, row.type, row.severity, row.camera, row.message) == (
        DEVICE,
        ev.ts,
        "camera_failed",
        "error",
        "front",
        ev.message,
    )
    items, total = events()
    assert total == 2
    assert items[1] == {
        "device": DEVICE,
        "seq": 4,
        "ts": ev.ts,
        "type": "camera_failed",
        "severity": "error",
        "camera": "front",
        "message": ev.message,
        "data": dict(ev.data),
        "received_at": row.received_at,
    }
    assert (items[0]["seq"], items[0]["camera"], items[0]["message"], items[0]["data"]) == (
        5,
        None,
        "",
        {},
    )


def test_drift_summary_is_stored_with_its_window(ingestor):
    dr = make_drift(seq=2, camera="back", model=None, mean_box_area=0.03)
    assert ingestor.handle(TOPICS.drift(DEVICE), dr.to_json()) == STORED

    row = regdb.DriftSummary.get()
    assert (row.device_id, row.seq, row.camera, row.model, row.start, row.end) == (
        DEVICE,
        2,
        "back",
        None,
        dr.start,
        dr.end,
    )
    (item,), total = drift_summaries(camera="back")
    assert total == 1
    assert item["confidence_hist"] == list(dr.confidence_hist)
    assert item["mean_box_area"] == 0.03 and item["latency_ms_p50"] is None
    assert drift_summaries(camera="front") == ([], 0)


def test_reordered_event_data_is_a_duplicate_not_a_conflict(ingestor):
    ev = make_event(seq=3)
    body = raw(ev)
    body["data"] = dict(reversed(list(body["data"].items())))
    reordered = json.dumps(dict(reversed(list(body.items())))).encode()

    assert ingestor.handle(TOPICS.events(DEVICE), ev.to_json()) == STORED
    assert ingestor.handle(TOPICS.events(DEVICE), reordered) == DUPLICATE


def test_sequences_are_per_kind(ingestor):
    """Event seq 1, drift seq 1, beat seq 1 and bin seq 1 are four different messages."""
    for kind, message in (
        ("events", make_event(seq=1)),
        ("drift", make_drift(seq=1)),
        ("health", Health(device=DEVICE, seq=1, ts=T0, uptime_s=1)),
        ("counts", make_bin(seq=1)),
    ):
        assert ingestor.handle(TOPICS.device(DEVICE, kind), message.to_json()) == STORED
    assert regdb.DeadLetter.select().count() == 0


def _event_with(**fields) -> bytes:
    return json.dumps({**raw(make_event()), **fields}).encode()


def _drift_with(**fields) -> bytes:
    return json.dumps({**raw(make_drift()), **fields}).encode()


def _without(message, field: str) -> bytes:
    body = raw(message)
    del body[field]
    return json.dumps(body).encode()


MALFORMED_SEQUENCED = [
    # id, kind, payload, words the reason must contain
    ("event-type", "events", _event_with(type="Camera Failed"), ["'type'", "pattern"]),
    ("event-severity", "events", _event_with(severity="fatal"), ["'severity'", "info"]),
    ("event-seq-zero", "events", _event_with(seq=0), ["'seq'", "greater"]),
    ("event-no-ts", "events", _without(make_event(), "ts"), ["'ts'", "required"]),
    ("event-long-message", "events", _event_with(message="x" * 1025), ["'message'", "1024"]),
    ("event-nested-data", "events", _event_with(data={"n": [1, 2]}), ["data.n"]),
    ("event-extra-field", "events", _event_with(colour="red"), ["'colour'", "not permitted"]),
    ("event-bad-camera", "events", _event_with(camera="a/b"), ["'camera'", "pattern"]),
    (
        "drift-confidence-bins",
        "drift",
        _drift_with(confidence_hist=[1, 2, 3]),
        ["'confidence_hist'", "10"],
    ),
    ("drift-negative-frames", "drift", _drift_with(frames=-1), ["'frames'", "greater"]),
    ("drift-no-camera", "drift", _without(make_drift(), "camera"), ["'camera'", "required"]),
    ("drift-brightness", "drift", _drift_with(brightness=300), ["'brightness'", "255"]),
    ("drift-kind", "drift", make_event().to_json(), ["'kind'", "events"]),
]


@pytest.mark.parametrize(
    ("kind", "payload", "words"),
    [case[1:] for case in MALFORMED_SEQUENCED],
    ids=[case[0] for case in MALFORMED_SEQUENCED],
)
def test_malformed_event_or_drift_is_dead_lettered_naming_the_field(ingestor, kind, payload, words):
    topic = TOPICS.device(DEVICE, kind)
    assert ingestor.handle(topic, payload) == DEAD_LETTER

    (letter,) = regdb.DeadLetter.select()
    for word in words:
        assert word in letter.reason, f"{word!r} not in reason {letter.reason!r}"
    assert (letter.topic, letter.device, bytes(letter.payload)) == (topic, DEVICE, payload)
    assert regdb.Event.select().count() == 0
    assert regdb.DriftSummary.select().count() == 0


# -- reported state (Ingestor directly) ------------------------------------------------


def make_reported(ts: float, model: str = "yolov8n-int8", version: int = 2, **changes) -> Reported:
    """Reported state taken ``ts`` seconds after T0."""
    ts = T0 + ts
    fields = {
        "device": DEVICE,
        "ts": ts,
        "desired_version": version + 1,
        "cameras": (
            CameraModel(
                camera="door",
                model=model,
                version=version,
                sha256="ab" * 32,
                file=f"{model}-v{version}.tflite",
                update="activated",
                update_model=model,
                update_version=version,
                update_ts=ts - 1,
            ),
            CameraModel(camera="back", file="config.tflite", update="failed", reason="sha: bad"),
        ),
    }
    return Reported(**{**fields, **changes})


def stored_reported() -> dict | None:
    (dev,) = [d for d in devices() if d["device"] == DEVICE]
    return dev["reported"]


def test_reported_state_is_stored_and_shown_per_device(ingestor):
    msg = make_reported(500.0)
    assert ingestor.handle(TOPICS.reported(DEVICE), msg.to_json()) == STORED

    row = regdb.ReportedState.get_by_id(DEVICE)
    assert (row.ts, row.desired_version) == (msg.ts, 3)
    assert json.loads(row.payload) == raw(msg)
    rep = stored_reported()
    assert rep == {
        "ts": msg.ts,
        "desired_version": 3,
        "cameras": [
            {
                "camera": "door",
                "model": "yolov8n-int8",
                "version": 2,
                "sha256": "ab" * 32,
                "file": "yolov8n-int8-v2.tflite",
                "update": "activated",
                "update_model": "yolov8n-int8",
                "update_version": 2,
                "reason": None,
                "update_ts": msg.ts - 1,
            },
            {
                "camera": "back",
                "model": None,
                "version": None,
                "sha256": None,
                "file": "config.tflite",
                "update": "failed",
                "update_model": None,
                "update_version": None,
                "reason": "sha: bad",
                "update_ts": None,
            },
        ],
        "received_at": row.received_at,
    }
    assert regdb.DeadLetter.select().count() == 0


def test_a_device_without_reported_state_shows_null(ingestor):
    assert ingestor.handle(TOPICS.counts(DEVICE), make_bin().to_json()) == STORED
    assert stored_reported() is None


def test_newer_reported_state_replaces_the_stored_one(ingestor):
    old, new = make_reported(100.0, version=1), make_reported(200.0, version=2)
    assert ingestor.handle(TOPICS.reported(DEVICE), old.to_json()) == STORED
    assert ingestor.handle(TOPICS.reported(DEVICE), new.to_json()) == STORED

    assert regdb.ReportedState.select().count() == 1
    row = regdb.ReportedState.get_by_id(DEVICE)
    assert (row.ts, row.desired_version, json.loads(row.payload)) == (T0 + 200.0, 3, raw(new))
    assert stored_reported()["cameras"][0]["version"] == 2


def test_older_reported_state_does_not_replace_a_newer_one(ingestor):
    """A retained copy redelivered late (older ts) changes nothing."""
    new, old = make_reported(200.0, version=2), make_reported(100.0, version=1)
    assert ingestor.handle(TOPICS.reported(DEVICE), new.to_json()) == STORED
    assert ingestor.handle(TOPICS.reported(DEVICE), old.to_json()) == DUPLICATE
    assert ingestor.handle(TOPICS.reported(DEVICE), new.to_json()) == DUPLICATE

    row = regdb.ReportedState.get_by_id(DEVICE)
    assert (row.ts, json.loads(row.payload)) == (T0 + 200.0, raw(new))
    assert stored_reported()["cameras"][0]["model"] == "yolov8n-int8"
    assert stored_reported()["cameras"][0]["version"] == 2
    assert regdb.DeadLetter.select().count() == 0


def test_reported_state_is_kept_per_device(ingestor):
    assert ingestor.handle(TOPICS.reported(DEVICE), make_reported(200.0).to_json()) == STORED
    other = make_reported(100.0, device="cam-2", version=1)
    assert ingestor.handle(TOPICS.reported("cam-2"), other.to_json()) == STORED

    by_device = {d["device"]: d["reported"] for d in devices()}
    assert by_device[DEVICE]["ts"] == T0 + 200.0 and by_device["cam-2"]["ts"] == T0 + 100.0


def _reported_with(**fields) -> bytes:
    return json.dumps({**raw(make_reported(100.0)), **fields}).encode()


def _reported_camera_with(**fields) -> bytes:
    body = raw(make_reported(100.0))
    body["cameras"][0].update(fields)
    return json.dumps(body).encode()


MALFORMED_REPORTED = [
    # id, payload, words the reason must contain
    ("no-ts", _without(make_reported(100.0), "ts"), ["'ts'", "required"]),
    ("ts-text", _reported_with(ts="yesterday"), ["'ts'", "number"]),
    ("desired-zero", _reported_with(desired_version=0), ["'desired_version'", "greater"]),
    ("cameras-object", _reported_with(cameras={"door": {}}), ["'cameras'"]),
    ("bad-camera", _reported_camera_with(camera="a/b"), ["cameras.0.camera", "pattern"]),
    ("bad-sha", _reported_camera_with(sha256="xyz"), ["cameras.0.sha256", "pattern"]),
    ("bad-update", _reported_camera_with(update="exploded"), ["cameras.0.update"]),
    ("extra-camera-field", _reported_camera_with(colour="red"), ["cameras.0.colour"]),
    ("long-reason", _reported_camera_with(reason="x" * 1025), ["cameras.0.reason", "1024"]),
    ("kind", make_event().to_json(), ["'kind'", "events"]),
    (
        "device-mismatch",
        make_reported(100.0, device="cam-9").to_json(),
        ["'device'", "cam-9", DEVICE],
    ),
]


@pytest.mark.parametrize(
    "payload, words",
    [case[1:] for case in MALFORMED_REPORTED],
    ids=[case[0] for case in MALFORMED_REPORTED],
)
def test_malformed_reported_state_is_dead_lettered_naming_the_field(ingestor, payload, words):
    topic = TOPICS.reported(DEVICE)
    assert ingestor.handle(topic, payload) == DEAD_LETTER

    (letter,) = regdb.DeadLetter.select()
    for word in words:
        assert word in letter.reason, f"{word!r} not in reason {letter.reason!r}"
    assert (letter.topic, letter.device, bytes(letter.payload)) == (topic, DEVICE, payload)
    assert regdb.ReportedState.select().count() == 0


def test_a_malformed_reported_state_leaves_the_stored_one(ingestor):
    good = make_reported(100.0)
    assert ingestor.handle(TOPICS.reported(DEVICE), good.to_json()) == STORED
    newer_but_bad = json.dumps({**raw(make_reported(300.0)), "desired_version": -1}).encode()
    assert ingestor.handle(TOPICS.reported(DEVICE), newer_but_bad) == DEAD_LETTER
    assert stored_reported()["ts"] == T0 + 100.0


def test_published_reported_state_is_stored_over_mqtt(worker, publisher):
    """Retained, like an agent publishes it; the newest wins."""
    for ts in (100.0, 300.0, 200.0):
        msg = make_reported(ts, version=int(ts // 100))
        publisher.publish(TOPICS.reported(DEVICE), msg.to_json(), retain=True)

    wait_until(lambda: worker.outcomes[DUPLICATE] == 1, what="the stale copy")
    assert stored_reported()["ts"] == T0 + 300.0
    assert stored_reported()["cameras"][0]["version"] == 3
    assert worker.outcomes[DEAD_LETTER] == 0


# -- database opening ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "url"])
def test_open_database_accepts_paths_and_sqlite_urls(tmp_path, form):
    path = tmp_path / "sub" / "r.db"
    db = regdb.open_database(path if form == "path" else f"sqlite:///{path}")
    assert path.exists()
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert set(db.get_tables()) >= {"device", "count_bin", "line_total", "dead_letter"}
    assert regdb.open_database(path) is db


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        ("postgresql://u@no-such-host.invalid/db", pw.OperationalError, "no-such-host"),
        ("postgresql://u@h", ValueError, "names no database"),
        ("mysql://u@h/db", ValueError, "unsupported database URL"),
        (":memory:", ValueError, "in-memory"),
    ],
)
def test_open_database_refuses_what_it_cannot_serve(url, error, words):
    with pytest.raises(error, match=words):
        regdb.open_database(url)


def test_unbound_database_is_refused(tmp_path):
    other = pw.SqliteDatabase(str(tmp_path / "x.db"))
    with pytest.raises(RuntimeError, match="open_database"):
        Ingestor(other, TOPICS)
