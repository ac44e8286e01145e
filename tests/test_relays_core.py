"""Relay pieces that need no cloud endpoint: the ``[relays]`` config, packing to
billing units, the report and its price table, the CLI, the API and /metrics, and
`flowfleet provision aws` against moto's IoT server."""

from __future__ import annotations

import json
import os
import time

import pytest

from flowfleet.cli import main
from flowfleet.configfile import ConfigError
from flowfleet.registry.config import load_registry_config
from flowfleet.registry.relays import outbox, report, usage
from flowfleet.registry.relays.base import Item, envelope, pack
from flowfleet.registry.relays.outbox import Route, Stored
from flowfleet.registry.relays.settings import GcpRelay
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import fresh_database, release

GOOD = """
[relays]
tick_s = 0.2
[relays.gcp]
project = "my-project-1"
topic = "fleet"
kinds = ["counts", "health"]
groups = ["lobby"]
pack_units = 2
[relays.azure]
connection_string_file = "secrets/azure.txt"
ca_file = "ca.pem"
[relays.aws]
endpoint = "abc-ats.iot.eu-west-1.amazonaws.com"
cert_file = "relay.crt"
key_file = "relay.key"
"""


def test_config_is_typed_validated_and_resolves_paths(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(GOOD)
    s = load_registry_config(path, check=False).relays
    assert set(s.configured()) == {"aws", "azure", "gcp"}
    assert s.gcp.kinds == ("counts", "health") and s.gcp.pack_units == 2
    assert s.azure.connection_string_file == str(tmp_path / "secrets" / "azure.txt")
    assert s.aws.cert_file == str(tmp_path / "relay.crt") and s.aws.publishes_per_s == 90
    routes = {r.relay: r for r in s.routes()}
    assert routes["gcp"].groups == ("lobby",) and routes["aws"].kinds == ("counts",)
    with pytest.raises(ConfigError, match=r"relays\.azure\.connection_string_file"):
        load_registry_config(path, check=True)  # the files it names must be readable
    for bad, where in [
        (GOOD.replace('topic = "fleet"', 'topic = "fleet"\ncolour = 1'), r"relays\.gcp\.colour"),
        (GOOD.replace('kinds = ["counts", "health"]', 'kinds = ["status"]'), r"relays\.gcp\.kinds"),
        (GOOD.replace("[relays.aws]", "[relays.aws]\npublishes_per_s = 150"), "publishes_per_s"),
        (GOOD.replace('ca_file = "ca.pem"', 'connection_string_env = "X"'), "exactly one"),
        (GOOD.replace("pack_units = 2", "backoff_initial_s = 9\nbackoff_max_s = 1"), "backoff"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=where) as err:
            load_registry_config(path, check=False)
        assert str(path) in str(err.value)


def _item(i: int, device: str = "cam-1", size: int = 300) -> Item:
    payload = json.dumps({"seq": i, "pad": "x" * (size - 22)})
    return Item(i, f"{device}/counts/{i}", device, "counts", i, payload, 0.0)


def test_packing_fills_billing_units_per_device_and_kind():
    from flowfleet.registry.relays.aws import IotCoreRelay
    from flowfleet.registry.relays.gcp import PubSubRelay

    aws = IotCoreRelay.__new__(IotCoreRelay)  # packing reads only the class's limits
    items = [_item(i, "cam-1") for i in range(1, 41)] + [_item(41, "cam-2")]
    packing = pack(items, aws, True, 1)
    assert [p.device for p in packing.packets].count("cam-2") == 1
    for p in packing.packets:
        assert p.size <= 5 * 1024 and p.body == envelope(p.device, p.kind, p.items)
        assert aws.units(p.size) == 1
    assert sum(len(p.items) for p in packing.packets) == 41
    assert len(packing.packets) == 1 + -(-40 // len(packing.packets[0].items))
    # Unpacked: one packet per message, the payload as stored.
    assert [p.body.decode() for p in pack(items[:3], aws, False, 1).packets] == [
        i.payload for i in items[:3]
    ]
    # Over the payload cap even alone: refused (parked), the others still go.
    big = _item(99, size=200 * 1024)
    out = pack([items[0], big], aws, True, 1)
    assert [r.item.msg_id for r in out.refused] == ["cam-1/counts/99"]
    assert len(out.packets) == 1
    gcp = PubSubRelay.__new__(PubSubRelay)
    assert gcp.units(10) == 1 and gcp.units(1000) == 1 and gcp.units(1001) == 2


@pytest.fixture
def db(tmp_path):
    url = fresh_database(str(tmp_path / "relay.db"))
    database = regdb.open_database(url)
    yield database, url
    release()


def test_report_estimates_bills_from_the_price_table(db):
    database, _ = db
    t = time.time()
    tally = usage.Tally(messages=10_000, publishes=1_000, bytes=1_000 * 4_000, units=1_000)
    for ms in (5.0, 5.0, 5.0, 40.0):
        tally.observe_ms(ms)
    with database.connection_context():
        usage.record("aws", t, tally)
        usage.record("gcp", t, tally)
        usage.record("azure", t, tally)
        rep = report.build_report(usage.hour_of(t), usage.hour_of(t) + 3600)
    by = {r["relay"]: r for r in rep["relays"]}
    prices = report.load_prices()
    month = report.MONTH_S / 3600  # one hour of traffic, scaled to a month
    aws = prices["aws"]
    conn = report.MONTH_S / 60 / 1e6 * aws["usd_per_million_connection_minutes"]
    assert by["aws"]["monthly"]["usd"] == round(1_000 * month / 1e6 * 1.00 + conn, 2)
    assert by["aws"]["latency_ms"]["p50"] >= 5.0 and by["aws"]["latency_ms"]["p99"] >= 40.0
    # Azure: 1,000 blocks/hour = 24,000 a day: one B1 unit (400,000 a day).
    assert by["azure"]["monthly"]["tier"] == {"tier": "B1", "units": 1, "usd": 10.0}
    # Pub/Sub: 4 MB an hour, published and delivered once: inside the free 10 GiB.
    assert by["gcp"]["monthly"]["usd"] == 0.0
    assert by["aws"]["monthly_doubled"]["usd"] > by["aws"]["monthly"]["usd"]
    assert by["aws"]["monthly"]["unpacked_usd"] > by["aws"]["monthly"]["usd"]
    assert by["gcp"]["price_source"].startswith("https://")
    assert rep["price_table_version"] == prices["version"]


def test_cli_report_status_parked_and_requeue(db, capsys):
    database, url = db
    t = time.time()
    with database.connection_context(), database.atomic():
        usage.record("gcp", t, usage.Tally(messages=5, publishes=2, bytes=3000, units=3))
        outbox.queue_stored(
            database, [Route("gcp", ("counts",))], [Stored("cam-1", "counts", 1, "{}", t)]
        )
        row = outbox.due("gcp", 1)[0]
        outbox.park(row.id, "refused by gcp: InvalidArgument")
    assert main(["relays", "report", "--db", url, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["relay"] for r in rep["relays"]] == ["gcp"] and rep["relays"][0]["messages"] == 5
    assert main(["relays", "report", "--db", url]) == 0
    assert "gcp" in capsys.readouterr().out
    assert main(["relays", "status", "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gcp"]["parked"] == 1
    assert main(["relays", "parked", "--db", url]) == 0
    assert "cam-1/counts/1" in capsys.readouterr().out
    assert main(["relays", "requeue", "gcp", "--db", url]) == 0
    assert "1 messages requeued" in capsys.readouterr().out
    with database.connection_context():
        assert len(outbox.due("gcp", 10)) == 1
    assert main(["relays", "report", "--db", url, "--hours", "0"]) == 2
    assert "--hours" in capsys.readouterr().err


def test_api_and_metrics(db):
    from prometheus_client.parser import text_string_to_metric_families

    from flowfleet.registry.http import auth
    from flowfleet.registry.http.web import create_app

    database, _ = db
    t = time.time()
    with database.connection_context(), database.atomic():
        auth.create_user("admin", "admin", actor="t")
        token, _ = auth.create_token("admin", actor="t")
        usage.record("aws", t, usage.Tally(messages=7, publishes=7, bytes=700, units=7))
        rows = [Stored("cam-1", "counts", s, "{}", t - 5) for s in (1, 2, 3)]
        outbox.queue_stored(database, [Route("aws", ("counts",))], rows)
        outbox.park(outbox.due("aws", 1)[0].id, "refused by aws: PUBACK TOPIC_NAME_INVALID")
    client = create_app(database).test_client()
    h = {"Authorization": f"Bearer {token}"}
    body = client.get("/api/relays", headers=h).get_json()
    (aws,) = body["relays"]
    assert aws["relay"] == "aws" and aws["queued"] == 2 and aws["parked"] == 1
    assert aws["usage"]["messages"] == 7 and aws["oldest_queued_s"] >= 5
    assert client.get("/api/relays?hours=0", headers=h).status_code == 400
    parked = client.get("/api/relays/parked?relay=aws", headers=h).get_json()["parked"]
    assert parked[0]["reason"].endswith("TOPIC_NAME_INVALID")
    assert client.get("/api/relays/parked?relay=ibm", headers=h).status_code == 404
    resp = client.post("/api/relays/aws/requeue", json={"reason": "fixed"}, headers=h)
    assert resp.get_json() == {"relay": "aws", "requeued": 1}
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert (
        samples[("flowfleet_registry_relay_outbox", (("relay", "aws"), ("state", "queued")))] == 3
    )
    assert samples[("flowfleet_registry_relay_oldest_queued_seconds", (("relay", "aws"),))] >= 5


def test_provision_aws_against_moto(tmp_path, monkeypatch, capsys):
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        args = ["provision", "aws", "--thing", "fleet-relay", "--out", str(tmp_path / "id")]
        args += ["--region", "eu-west-1", "--endpoint-url", url, "--json"]
        assert main(args) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["thing_created"] and first["policy_created"] and first["certificate_created"]
        key = tmp_path / "id" / "fleet-relay.key"
        assert os.stat(key).st_mode & 0o077 == 0
        assert (tmp_path / "id" / "fleet-relay.crt").read_text().startswith("-----BEGIN CERT")
        assert first["endpoint"]
        import boto3

        iot = boto3.client("iot", region_name="eu-west-1", endpoint_url=url)
        principals = iot.list_thing_principals(thingName="fleet-relay")["principals"]
        assert principals == [first["certificate_arn"]]
        doc = json.loads(iot.get_policy(policyName="fleet-relay-policy")["policyDocument"])
        assert doc["Statement"][1]["Resource"].endswith(":topic/flowfleet/*")
        # Again: everything exists, the certificate on disk is kept.
        assert main(args) == 0
        again = json.loads(capsys.readouterr().out)
        assert not (again["thing_created"] or again["policy_created"])
        assert not again["certificate_created"] and not again["policy_updated"]
        # Four connections: the policy gets a version allowing each one's client id.
        assert main([*args, "--connections", "4"]) == 0
        assert json.loads(capsys.readouterr().out)["policy_updated"]
        doc = json.loads(iot.get_policy(policyName="fleet-relay-policy")["policyDocument"])
        base = "arn:aws:iot:eu-west-1:*:client/"
        assert doc["Statement"][0]["Resource"] == [
            base + c for c in ("fleet-relay", "fleet-relay-2", "fleet-relay-3", "fleet-relay-4")
        ]
        assert main([*args, "--connections", "0"]) == 2
        assert main([*args[:3], "registry", *args[4:]]) == 2  # a reserved identity
    finally:
        server.stop()


def test_gcp_settings_refuse_a_bad_project():
    with pytest.raises(ValueError, match="project"):
        GcpRelay(project="X")
