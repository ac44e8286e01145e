"""The Azure IoT Hub relay against a Mosquitto TLS listener laid out like IoT Hub's
MQTT endpoint: the connection string's host points at it, the broker only lets in
the username and SAS token IoT Hub expects (computed here with Microsoft's published
algorithm), and the test's subscriber checks topic, properties and payload. Also:
a poison message is parked while the queue moves, and the broker stopped and
restarted loses nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
import urllib.parse

import pytest

from flowfleet.registry.relays import outbox, usage
from flowfleet.registry.relays.azure import API_VERSION, ConnectionString, IotHubRelay
from flowfleet.registry.relays.base import ENVELOPE_SCHEMA
from flowfleet.registry.relays.job import RelayRunner
from flowfleet.registry.relays.settings import AzureRelay
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.relay_tables import RelayMessage
from flowfleet.registry.testing import fresh_database, release
from tests.relay_endpoints import (
    Collector,
    TlsBroker,
    any_db_fixture,  # noqa: F401 (the any_db fixture)
    bin_messages,
    drain,
    queue_bins,
    ride_out_an_outage,
)

DEVICE = "relay-1"
KEY = base64.b64encode(b"flowfleet relay test key, 32 by").decode()
NOW = 1_900_000_000.0  # the relay's clock: the token's expiry is NOW + token_ttl_s
TTL = 3600


def reference_token(uri: str, key: str, expiry: int) -> str:
    """Microsoft's documented Python sample for IoT Hub SAS tokens (written out here,
    independently of the relay's code)."""
    sign_key = f"{urllib.parse.quote_plus(uri)}\n{expiry}"
    signature = base64.b64encode(
        hmac.HMAC(base64.b64decode(key), sign_key.encode("utf-8"), hashlib.sha256).digest()
    )
    return "SharedAccessSignature " + urllib.parse.urlencode(
        {"sr": uri, "sig": signature, "se": str(expiry)}
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    username = f"localhost/{DEVICE}/?api-version={API_VERSION}"
    token = reference_token(f"localhost/devices/{DEVICE}", KEY, int(NOW) + TTL)
    broker = TlsBroker(tmp_path_factory.mktemp("iothub"), users={username: token}).start()
    collector = Collector(broker, "devices/#")
    yield broker, collector
    collector.close()
    broker.stop()


@pytest.fixture
def db(tmp_path):
    url = fresh_database(str(tmp_path / "relay.db"))
    database = regdb.open_database(url)
    yield database
    release()


def _relay(broker, key: str = KEY, **changes) -> tuple[IotHubRelay, AzureRelay]:
    values = dict(
        connection_string_env="UNUSED_IN_TEST",
        port=broker.tls_port,
        ca_file=str(broker.ca.cert),
        token_ttl_s=TTL,
        timeout_s=3.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        pack_units=2,
    )
    values.update(changes)
    settings = AzureRelay(**values)
    conn = ConnectionString.parse(f"HostName=localhost;DeviceId={DEVICE};SharedAccessKey={key}")
    return IotHubRelay(settings, clock=lambda: NOW, connection=conn), settings


def _queue(database, stream) -> None:
    queue_bins(database, "azure", stream)


def _received(collector, since: int, ids: int) -> list[tuple[str, dict, dict]]:
    """(topic, properties, envelope) of the messages after ``since`` until ``ids``
    device messages arrived."""
    deadline = time.monotonic() + 20
    out: list = []
    while time.monotonic() < deadline:
        out = []
        for topic, payload in collector.messages[since:]:
            prefix = f"devices/{DEVICE}/messages/events/"
            assert topic.startswith(prefix), topic
            props = dict(urllib.parse.parse_qsl(topic[len(prefix) :]))
            out.append((topic, props, json.loads(payload)))
        if sum(len(e["ids"]) for _, _, e in out) >= ids:
            break
        time.sleep(0.05)
    return out


def test_messages_reach_the_hub_with_its_topic_properties_and_token(hub, db):
    broker, collector = hub
    start = len(collector.messages)
    _queue(db, bin_messages(2, 10))
    relay, settings = _relay(broker)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        assert drain(runner) == 20
    finally:
        runner.stop()
    got = _received(collector, start, 20)
    ids = []
    for _, props, env in got:
        assert env["schema"] == ENVELOPE_SCHEMA
        assert props["$.mid"] == env["ids"][0]
        assert props["$.ct"] == "application/json" and props["$.ce"] == "utf-8"
        assert props["device"] == env["device"] and props["kind"] == "counts"
        assert int(props["count"]) == len(env["messages"]) == len(env["ids"])
        for msg_id, payload in zip(env["ids"], env["messages"], strict=True):
            assert msg_id == f"{payload['device']}/counts/{payload['seq']}"
        ids += env["ids"]
    assert sorted(ids) == sorted(f"cam-{d}/counts/{s}" for d in range(2) for s in range(1, 11))
    sizes = [len(json.dumps(env, separators=(",", ":"))) for _, _, env in got]
    assert all(s <= 2 * 4096 for s in sizes)  # packed up to pack_units = 2 units of 4 KB
    with db.connection_context():
        used = usage.summary(time.time() - 3600, time.time() + 1)["azure"]
    assert used["messages"] == 20 and used["publishes"] == len(got)
    assert used["units"] == sum(math.ceil(s / 4096) for s in sizes)


def test_a_wrong_key_is_refused_and_nothing_leaves_the_outbox(hub, db):
    broker, _ = hub
    _queue(db, bin_messages(1, 3))
    wrong = base64.b64encode(b"another key, not the device's!!").decode()
    relay, settings = _relay(broker, key=wrong)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        result = runner.run_once()
    finally:
        runner.stop()
    assert result.failed == 3 and "refused" in result.error
    with db.connection_context():
        assert RelayMessage.select().where(RelayMessage.attempts == 1).count() == 3


def test_poison_message_is_parked_and_the_queue_moves(hub, db):
    broker, collector = hub
    start = len(collector.messages)
    stream = bin_messages(1, 3)
    body = json.loads(stream[1][1])
    body["padding"] = "x" * (300 * 1024)  # over IoT Hub's 256 KB device-to-cloud cap
    stream[1] = (stream[1][0], json.dumps(body).encode(), stream[1][2])
    _queue(db, stream)
    relay, settings = _relay(broker)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        assert drain(runner) == 2
    finally:
        runner.stop()
    got = _received(collector, start, 2)
    assert sorted(i for _, _, e in got for i in e["ids"]) == ["cam-0/counts/1", "cam-0/counts/3"]
    with db.connection_context():
        parked = outbox.parked("azure")
    assert [p["msg_id"] for p in parked] == ["cam-0/counts/2"]
    assert "payload cap" in parked[0]["reason"]


def test_broker_stopped_and_restarted_nothing_lost(hub, any_db):
    db = any_db
    broker, collector = hub
    start = len(collector.messages)
    _queue(db, bin_messages(2, 10))
    relay, settings = _relay(broker, breaker_failures=2, breaker_cooldown_s=0.3, timeout_s=1.0)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        more = bin_messages(2, 10, first_seq=11)
        ride_out_an_outage(runner, broker, collector, lambda: _queue(db, more), 10)
    finally:
        runner.stop()
    got = _received(collector, start, 40)
    ids = {i for _, _, e in got for i in e["ids"]}
    assert ids == {f"cam-{d}/counts/{s}" for d in range(2) for s in range(1, 21)}


def _fail_passes(runner, n: int) -> None:
    for _ in range(n):
        while time.monotonic() < runner.next_try:
            time.sleep(0.01)  # the backoff (a few tens of ms here)
        assert runner.run_once().error


def test_repeated_failures_park_only_while_the_circuit_is_closed(hub, db):
    broker, _ = hub
    wrong = base64.b64encode(b"another key, not the device's!!").decode()
    _queue(db, bin_messages(1, 2))
    quick = dict(backoff_initial_s=0.01, backoff_max_s=0.02, breaker_cooldown_s=0.02)
    # Circuit closed (5 failures to open): the 2nd failed send parks them.
    relay, settings = _relay(broker, key=wrong, max_attempts=2, breaker_failures=5, **quick)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        _fail_passes(runner, 2)
    finally:
        runner.stop()
    with db.connection_context():
        parked = outbox.parked("azure")
        assert len(parked) == 2 and "gave up after 2 failed sends" in parked[0]["reason"]
        RelayMessage.delete().execute()
    # An outage: the circuit opens at the 1st failure; later failures do not count.
    _queue(db, bin_messages(1, 2))
    relay, settings = _relay(broker, key=wrong, max_attempts=2, breaker_failures=1, **quick)
    runner = RelayRunner(db, relay, settings, lease_s=5)
    try:
        _fail_passes(runner, 4)
    finally:
        runner.stop()
    with db.connection_context():
        assert outbox.parked("azure") == []
        assert [r.attempts for r in RelayMessage.select()] == [1, 1]


def _mids(collector, since: int, n: int) -> list[str]:
    """The message ids ($.mid) of unpacked messages after ``since``, once ``n`` came."""
    prefix = f"devices/{DEVICE}/messages/events/"
    got = collector.wait_for(since + n)[since:]
    return [dict(urllib.parse.parse_qsl(t[len(prefix) :]))["$.mid"] for t, _ in got]


def test_daily_quota_holds_messages_until_the_next_utc_day(hub, db):
    """tier S1 x1: 400,000 blocks a day. With all but 3 used earlier today, a pass sends
    3 messages and holds the other 7 in the outbox (not failed, not parked), reported
    in the metrics, the state and the report; the next UTC day they go."""
    from flowfleet.registry import metrics
    from flowfleet.registry.relays import report
    from flowfleet.registry.relays.quota import day_start

    broker, collector = hub
    start = len(collector.messages)
    relay, settings = _relay(broker, pack=False, tier="S1", units=1)
    noon = day_start(time.time()) + 12 * 3600
    clock = [noon]
    with db.connection_context(), db.atomic():
        # The morning's traffic, as the relay recorded it (4 KB blocks).
        usage.record("azure", noon - 3600, usage.Tally(messages=1, publishes=1, units=399_997))
    _queue(db, bin_messages(1, 10))
    runner = RelayRunner(db, relay, settings, lease_s=5, clock=lambda: clock[0])
    try:
        first = runner.run_once()
        assert (first.forwarded, first.held, first.failed, first.parked) == (3, 7, 0, 0)
        again = runner.run_once()  # still today: nothing goes, nothing fails
        assert (again.taken, again.forwarded, again.held) == (0, 0, 7)
        assert metrics.RELAY_QUOTA_HELD.labels("azure")._value.get() == 1
        assert metrics.RELAY_QUOTA_LEFT.labels("azure")._value.get() == 0
        state = runner.state()["quota"]
        assert state["held"] and state["tier"] == "S1" and state["blocks_per_day"] == 400_000
        assert state["resets_at"] == noon - 12 * 3600 + 86400
        with db.connection_context():
            rows = list(RelayMessage.select().order_by(RelayMessage.id))
            body = report.build_report(noon - 7200, noon + 1, quotas={"azure": state})
        assert [r.msg_id for r in rows] == [f"cam-0/counts/{s}" for s in range(4, 11)]
        assert all(r.attempts == 0 and r.parked_at is None for r in rows)
        (entry,) = body["relays"]
        assert entry["quota"]["used_today"] == 400_000 and entry["quota"]["left_today"] == 0
        assert "held in the outbox until 00:00 UTC" in report.render_text(body)
        assert _mids(collector, start, 3) == [f"cam-0/counts/{s}" for s in (1, 2, 3)]
        clock[0] = noon + 12 * 3600 + 1  # 00:00:01 UTC the next day
        resumed = runner.run_once()
        assert (resumed.forwarded, resumed.held) == (7, 0)
        assert metrics.RELAY_QUOTA_HELD.labels("azure")._value.get() == 0
        assert runner.state()["quota"]["left_today"] == 400_000 - 7
    finally:
        runner.stop()
    assert _mids(collector, start, 10) == [f"cam-0/counts/{s}" for s in range(1, 11)]
    with db.connection_context():
        assert RelayMessage.select().count() == 0


def test_quota_settings_are_checked_at_load():
    from pydantic import ValidationError

    base = dict(connection_string_env="AZ")
    assert AzureRelay(**base, tier="B3", units=10).tier == "B3"
    for bad, why in (
        (dict(tier="F1", units=2), "tier F1 has 1 to 1 units"),
        (dict(tier="S3", units=11), "tier S3 has 1 to 10 units"),
        (dict(units=4), "units needs tier"),
        (dict(tier="S4"), "tier"),
    ):
        with pytest.raises(ValidationError, match=why):
            AzureRelay(**base, **bad)
