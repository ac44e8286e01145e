"""Webhooks fed from the audit trail: a real HTTP receiver verifies every signature;
matching, retries with backoff, giving up, 410, exactly-once with several senders,
the API and the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest
from prometheus_client import REGISTRY

from flowfleet.cli import main
from flowfleet.registry.config import ConfigError, load_registry_config
from flowfleet.registry.fleet import webhook_records as records
from flowfleet.registry.fleet.webhooks import (
    WebhookJob,
    WebhookSender,
    WebhookSettings,
    dispatch,
    matches,
)
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.audit import audit
from flowfleet.registry.store.webhook_tables import WebhookCursor, WebhookDelivery
from flowfleet.registry.testing import fresh_database, release
from tests.webhook_receiver import Receiver

FAST = WebhookSettings(
    interval_s=0.05, timeout_s=0.4, backoff_initial_s=0.05, backoff_max_s=0.2, max_attempts=10
)


@pytest.fixture
def db(db_url):
    database = regdb.open_database(fresh_database(db_url))
    database.connect(reuse_if_open=True)
    yield database
    database.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def add_hook(db, receiver, name="ops", events=("drift.*", "rollout.abort"), **kw) -> dict:
    hook = records.create_webhook(db, name, receiver.url, list(events), actor="test", **kw)
    receiver.secrets[name] = hook["secret"]
    return hook


def run_until(job_or_sender, done, timeout=10.0):
    """Run passes until ``done()``; returns the number of passes."""
    deadline = time.monotonic() + timeout
    passes = 0
    while not done():
        assert time.monotonic() < deadline, "timed out"
        if isinstance(job_or_sender, WebhookJob):
            job_or_sender.run_once()
        else:
            job_or_sender.send_due()
        passes += 1
        time.sleep(0.02)
    return passes


def attempts_counted(outcome: str) -> float:
    """This process's flowfleet_registry_webhook_attempts_total{outcome}."""
    sample = REGISTRY.get_sample_value(
        "flowfleet_registry_webhook_attempts_total", {"outcome": outcome}
    )
    return sample or 0.0


def delivery_of(entry_id: int) -> dict:
    """The delivery of an audit entry (to the one webhook), {} while none is queued."""
    row = WebhookDelivery.get_or_none(WebhookDelivery.audit_entry == entry_id)
    return records.get_delivery(row.id) if row is not None else {}


@pytest.mark.parametrize(
    ("patterns", "action", "expected"),
    [
        (["drift.*"], "drift.rollback", True),
        (["drift.*"], "drift.environment", True),
        (["drift.*"], "rollout.abort", False),
        (["rollout.abort"], "rollout.abort", True),
        (["rollout.abort"], "rollout.aborted", False),
        (["rollout.?bort"], "rollout.abort", True),
        (["*"], "deployment.set", True),
        (["*"], "webhook.update", False),  # a catch-all does not hear webhook changes
        (["webhook.*"], "webhook.update", True),
        (["Drift.*"], "drift.rollback", False),  # case matters
    ],
)
def test_patterns_match_audit_actions(patterns, action, expected):
    assert matches(patterns, action) is expected


@pytest.mark.parametrize("failures", [1, 2, 3, 6, 40])
def test_backoff_doubles_with_jitter_up_to_the_maximum(failures):
    s = WebhookSettings(backoff_initial_s=10, backoff_max_s=100)
    base = min(100, 10 * 2 ** (failures - 1))
    waits = [s.backoff(failures) for _ in range(200)]
    assert all(base / 2 <= w <= base for w in waits)
    assert max(waits) - min(waits) > base / 10, "jittered"


def test_matching_entries_reach_a_real_receiver_signed_and_once(db, receiver):
    hook = add_hook(db, receiver)
    job = WebhookJob(db, FAST)
    try:
        entries = [
            audit("drift", "drift.rollback", "device:cam-1", "psi 0.4 > 0.2", psi=0.4),
            audit("rollouts", "rollout.create", "rollout:7", ""),
            audit("rollouts", "rollout.abort", "rollout:7", "3 of 10 drifted", failed=3),
            audit("user:x", "deployment.set", "device:cam-1", ""),
            audit("drift", "drift.environment", "device:cam-2", "dark"),
        ]
        run_until(job, lambda: len(receiver.delivered()) >= 3)
        job.run_once()  # nothing more is sent
    finally:
        job.stop()
    got = receiver.delivered()
    assert all(r.verified for r in got), "every request carries a valid signature"
    by_entry = {r.json["entry"]["id"]: r for r in got}
    wanted = [entries[i] for i in (0, 2, 4)]
    assert sorted(by_entry) == [e.id for e in wanted] and len(got) == 3
    for entry in wanted:
        r = by_entry[entry.id]
        body = r.json
        assert body["schema_version"] == 1 and body["webhook"] == "ops"
        assert body["event"] == entry.action == r.headers["X-Flowfleet-Event"]
        assert str(body["delivery"]) == r.headers["X-Flowfleet-Delivery"]
        assert body["time"] == entry.ts
        assert body["entry"] == {
            "id": entry.id,
            "ts": entry.ts,
            "actor": entry.actor,
            "action": entry.action,
            "target": entry.target,
            "reason": entry.reason,
            "details": json.loads(entry.details),
        }
        assert delivery_of(entry.id).get("status") == "delivered"
    assert by_entry[entries[2].id].json["entry"]["details"] == {"failed": 3}
    assert "secret" not in records.get_webhook("ops") and hook["secret"]


def test_a_webhook_gets_only_events_after_it_was_created(db, receiver):
    audit("drift", "drift.rollback", "device:old", "")
    job = WebhookJob(db, FAST)
    try:
        job.run_once()  # the cursor starts after the newest entry
        audit("drift", "drift.rollback", "device:before", "")
        add_hook(db, receiver)
        after = audit("drift", "drift.rollback", "device:after", "")
        run_until(job, lambda: receiver.delivered())
        job.run_once()
    finally:
        job.stop()
    assert [r.json["entry"]["id"] for r in receiver.delivered()] == [after.id]


def test_a_failing_receiver_is_retried_with_backoff_until_it_recovers(db, receiver):
    add_hook(db, receiver)
    receiver.script = [500, "hang"]
    entry = audit("drift", "drift.rollback", "device:cam-1", "")
    # Waits long enough that "not due yet" holds on a loaded machine too.
    settings = WebhookSettings(timeout_s=0.4, backoff_initial_s=0.4, backoff_max_s=0.4)
    sender = WebhookSender(db, settings)
    try:
        assert dispatch(db, settings) == 1
        assert sender.send_due() == 1  # 500
        assert sender.send_due() == 0, "not due again before its backoff"
        run_until(sender, lambda: delivery_of(entry.id)["attempts"] == 2)  # hangs: timeout
        receiver.stop()  # down: connection refused
        run_until(sender, lambda: delivery_of(entry.id)["attempts"] == 3)
        assert delivery_of(entry.id).get("status") == "pending"
        receiver.start()  # back on the same port
        run_until(sender, lambda: delivery_of(entry.id).get("status") == "delivered")
    finally:
        sender.close()
    log = delivery_of(entry.id)
    assert log["attempts"] == 4 and log["status_code"] == 200 and log["last_error"] is None
    attempts = log["attempt_log"]
    assert [a["number"] for a in attempts] == [1, 2, 3, 4]
    assert [a["status_code"] for a in attempts] == [500, None, None, 200]
    assert attempts[0]["error"].startswith("HTTP 500")
    assert "no answer within 0.4 s" in attempts[1]["error"]
    assert "cannot reach" in attempts[2]["error"] and "refused" in attempts[2]["error"]
    assert attempts[1]["duration_ms"] >= 400
    for before, after in itertools.pairwise(attempts):
        waited = after["started_at"] - (before["started_at"] + before["duration_ms"] / 1000)
        assert waited >= settings.backoff_initial_s / 2 - 0.01, "each retry waited its backoff"
    assert len(receiver.delivered()) == 1 and receiver.delivered()[0].verified


@pytest.mark.parametrize(
    ("settings", "attempts"),
    [
        (WebhookSettings(backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=3), 3),
        (
            WebhookSettings(
                backoff_initial_s=0.05, backoff_max_s=0.05, max_attempts=50, max_age_s=0.2
            ),
            None,  # given up by age, before the attempt limit
        ),
    ],
)
def test_a_delivery_is_given_up_after_max_attempts_or_max_age(db, receiver, settings, attempts):
    gave_up = attempts_counted("given_up")
    add_hook(db, receiver)
    receiver.script = [503] * 100
    entry = audit("drift", "drift.rollback", "device:cam-1", "")
    dispatch(db, settings)
    sender = WebhookSender(db, settings)
    try:
        run_until(sender, lambda: delivery_of(entry.id).get("status") == "given_up")
        assert sender.send_due() == 0
    finally:
        sender.close()
    d = delivery_of(entry.id)
    assert d["status_code"] == 503 and d["last_error"].startswith("HTTP 503")
    if attempts is not None:
        assert d["attempts"] == attempts
    else:  # by age: well before the 50 attempts, and never later than max_age_s
        assert d["attempts"] < 50
        assert d["given_up_at"] - d["created_at"] <= settings.max_age_s + 0.5
    assert len(receiver.requests) == d["attempts"]
    listed, total = records.list_deliveries(webhook="ops", status="given_up")
    assert total == 1 and listed[0]["id"] == d["id"]
    assert attempts_counted("given_up") == gave_up + 1


def test_410_gone_gives_up_and_disables_the_webhook(db, receiver):
    add_hook(db, receiver)
    receiver.script = [410]
    entry = audit("drift", "drift.rollback", "device:cam-1", "")
    job = WebhookJob(db, FAST)
    try:
        run_until(job, lambda: delivery_of(entry.id).get("status") == "given_up")
        audit("drift", "drift.rollback", "device:cam-2", "")
        job.run_once()
    finally:
        job.stop()
    hook = records.get_webhook("ops")
    assert not hook["enabled"] and "410" in hook["disabled_reason"]
    assert "disabled" in delivery_of(entry.id)["last_error"]
    assert WebhookDelivery.select().count() == 1, "a disabled webhook gets nothing new"
    assert len(receiver.requests) == 1
    trail = regdb.AuditEntry.select().where(regdb.AuditEntry.action == "webhook.disable")
    assert [(e.actor, e.target) for e in trail] == [("webhooks", "webhook:ops")]


def test_a_disabled_webhook_keeps_its_pending_deliveries_until_enabled(db, receiver):
    add_hook(db, receiver)
    entry = audit("drift", "drift.rollback", "device:cam-1", "")
    dispatch(db, FAST)
    records.update_webhook(db, "ops", actor="test", enabled=False, reason="receiver moving")
    audit("drift", "drift.rollback", "device:cam-2", "")  # not queued: disabled
    dispatch(db, FAST)
    sender = WebhookSender(db, FAST)
    try:
        assert sender.send_due() == 0 and receiver.requests == []
        assert records.get_webhook("ops")["disabled_reason"] == "receiver moving"
        records.update_webhook(db, "ops", actor="test", enabled=True)
        assert sender.send_due() == 1
    finally:
        sender.close()
    assert [r.json["entry"]["id"] for r in receiver.delivered()] == [entry.id]
    assert records.get_webhook("ops")["deliveries"] == {
        "pending": 0,
        "delivered": 1,
        "given_up": 0,
    }


def test_the_cursor_waits_for_an_entry_committed_late(db, db_url, receiver):
    """PostgreSQL may show entry n+1 before entry n commits: n is still queued once it
    commits. On SQLite (one writer) an id missing below a committed one never comes."""
    add_hook(db, receiver)
    first = audit("drift", "drift.rollback", "device:a", "")
    dispatch(db)
    assert WebhookCursor.get().last_id == first.id
    if isinstance(db, regdb.pw.PostgresqlDatabase):
        import psycopg2

        params = regdb.postgres_params(db_url)
        params["dbname"] = params.pop("database")
        other = psycopg2.connect(**params)  # a transaction left open
        with other.cursor() as cur:
            cur.execute(
                "INSERT INTO audit_entry (ts, actor, action, target, reason, details) "
                "VALUES (%s, 'drift', 'drift.rollback', 'device:late', '', '{}') RETURNING id",
                (time.time(),),
            )
            (late,) = cur.fetchone()
        later = audit("drift", "drift.rollback", "device:b", "")
        assert dispatch(db) == 1  # `later` is queued now ...
        cursor = WebhookCursor.get()
        assert cursor.last_id == first.id and cursor.gap_since is not None, "... the cursor waits"
        other.commit()
        other.close()
        assert dispatch(db) == 1  # the late entry
        queued = {d.audit_entry for d in WebhookDelivery.select()}
        assert queued == {first.id, late, later.id}
    else:
        audit("x", "x.y", "x", "").delete_instance()
        later = audit("drift", "drift.rollback", "device:b", "")
        assert dispatch(db) == 1
    assert WebhookCursor.get().last_id == later.id
    # A gap that is never filled (a rolled-back insert) is passed after gap_wait_s.
    if isinstance(db, regdb.pw.PostgresqlDatabase):
        db.execute_sql("SELECT nextval(pg_get_serial_sequence('audit_entry', 'id'))")
        last = audit("drift", "drift.rollback", "device:c", "")
        dispatch(db)
        assert WebhookCursor.get().last_id == later.id
        dispatch(db, WebhookSettings(gap_wait_s=0.0))
        assert WebhookCursor.get().last_id == last.id


def _second_process(db_url: str) -> subprocess.Popen:
    """A second registry process running a webhook job until its stdin closes."""
    code = (
        "import sys\n"
        "from flowfleet.registry.store.db import open_database\n"
        "from flowfleet.registry.fleet.webhooks import WebhookJob, WebhookSettings\n"
        f"db = open_database({db_url!r})\n"
        "job = WebhookJob(db, WebhookSettings(interval_s=0.02, timeout_s=2))\n"
        "job.start(); print('ready', flush=True); sys.stdin.read(); job.stop()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_two_registry_processes_deliver_each_event_exactly_once(db, db_url, receiver):
    for name in ("ops", "audit-log"):
        add_hook(db, receiver, name, events=("*",))
    other = _second_process(db_url)
    here = [WebhookJob(db, WebhookSettings(interval_s=0.02, timeout_s=2)) for _ in range(2)]
    try:
        for job in here:
            job.start()
        entries = [audit("t", f"deployment.set{i % 3}", f"device:{i}", "") for i in range(30)]
        deadline = time.monotonic() + 30
        while len(receiver.delivered()) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything sent twice would arrive by now
    finally:
        for job in here:
            job.stop()
        other.stdin.close()
        other.wait(20)
    got = receiver.delivered()
    assert all(r.verified for r in got)
    pairs = sorted((r.json["webhook"], r.json["entry"]["id"]) for r in got)
    wanted = sorted((n, e.id) for n in ("ops", "audit-log") for e in entries)
    assert pairs == wanted, "each event once per webhook"
    assert len({r.headers["X-Flowfleet-Delivery"] for r in got}) == 60
    assert WebhookDelivery.select().where(WebhookDelivery.attempts != 1).count() == 0


# -- API -----------------------------------------------------------------------------


@pytest.fixture
def api(db):
    tokens = {}
    for role in auth.ROLES:
        auth.create_user(f"{role}-user", role, actor="test")
        tokens[role], _ = auth.create_token(f"{role}-user", actor="test")
    client = create_app(db).test_client()

    def call(method, path, body=None, role="admin"):
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        return getattr(client, method)(path, json=body, headers=headers)

    return call


def test_api_round_trip_create_list_update_ping_redeliver_delete(db, api, receiver):
    resp = api("post", "/api/webhooks", {"name": "ops", "url": receiver.url, "events": ["drift.*"]})
    assert resp.status_code == 201, resp.get_json()
    created = resp.get_json()
    assert len(created["secret"]) >= 32 and created["enabled"] is True
    receiver.secrets["ops"] = created["secret"]
    listed = api("get", "/api/webhooks").get_json()
    assert listed["total"] == 1 and "secret" not in listed["webhooks"][0]
    assert "secret" not in api("get", "/api/webhooks/ops").get_json()

    resp = api("patch", "/api/webhooks/ops", {"enabled": False, "reason": "maintenance"})
    assert resp.get_json()["enabled"] is False
    assert api("post", "/api/webhooks/ops/ping").status_code == 409
    resp = api("patch", "/api/webhooks/ops", {"enabled": True, "events": ["drift.*", "x.y"]})
    assert resp.get_json()["events"] == ["drift.*", "x.y"]

    resp = api("post", "/api/webhooks/ops/ping")
    assert resp.status_code == 202
    ping = resp.get_json()
    assert ping["event"] == "ping" and ping["status"] == "pending"
    sender = WebhookSender(db, FAST)
    try:
        run_until(sender, lambda: receiver.delivered())
        got = receiver.delivered()[0]
        assert got.verified and got.json["event"] == "ping"
        assert got.json["entry"]["action"] == "webhook.ping"
        shown = api("get", f"/api/webhook-deliveries/{ping['id']}").get_json()
        assert shown["status"] == "delivered" and shown["attempt_log"][0]["status_code"] == 200

        resp = api("post", f"/api/webhook-deliveries/{ping['id']}/redeliver?reason=lost")
        assert resp.status_code == 202 and resp.get_json()["status"] == "pending"
        run_until(sender, lambda: len(receiver.delivered()) == 2)
    finally:
        sender.close()
    again = receiver.delivered()[1]
    assert again.headers["X-Flowfleet-Delivery"] == str(ping["id"]), "same delivery id"
    page = api("get", "/api/webhook-deliveries?webhook=ops&status=delivered").get_json()
    assert [d["id"] for d in page["deliveries"]] == [ping["id"]]
    assert page["deliveries"][0]["attempts"] == 2
    assert api("get", "/api/webhook-deliveries?status=pending").get_json()["total"] == 0
    scraped = api("get", "/metrics").get_data(as_text=True)
    assert "\nflowfleet_registry_webhook_deliveries_pending 0.0\n" in scraped

    assert api("delete", "/api/webhooks/ops?reason=done").status_code == 204
    assert api("get", "/api/webhooks/ops").status_code == 404
    assert api("get", "/api/webhook-deliveries").get_json()["total"] == 0
    trail = [
        e.action
        for e in regdb.AuditEntry.select().order_by(regdb.AuditEntry.id)
        if e.action.startswith("webhook.")
    ]
    assert trail == [
        "webhook.create",
        "webhook.update",
        "webhook.update",
        "webhook.ping",
        "webhook.redeliver",
        "webhook.delete",
    ]


GOOD = {"name": "ops", "url": "https://hooks.example/x", "events": ["drift.*"]}


@pytest.mark.parametrize(
    ("method", "path", "body", "role", "status", "field"),
    [
        ("post", "/api/webhooks", {**GOOD, "url": "ftp://hooks.example/x"}, "admin", 400, "url"),
        ("post", "/api/webhooks", {**GOOD, "url": "hooks.example/x"}, "admin", 400, "url"),
        ("post", "/api/webhooks", {**GOOD, "url": "http:///nohost"}, "admin", 400, "url"),
        ("post", "/api/webhooks", {**GOOD, "url": "http://h:99999/"}, "admin", 400, "url"),
        ("post", "/api/webhooks", {**GOOD, "events": ["drift.[x"]}, "admin", 400, "events"),
        ("post", "/api/webhooks", {**GOOD, "events": []}, "admin", 400, "events"),
        ("post", "/api/webhooks", {**GOOD, "events": "drift.*"}, "admin", 400, "events"),
        ("post", "/api/webhooks", {**GOOD, "events": [""]}, "admin", 400, "events"),
        ("post", "/api/webhooks", {**GOOD, "secret": "short"}, "admin", 400, "secret"),
        ("post", "/api/webhooks", {**GOOD, "name": "bad name"}, "admin", 400, "name"),
        ("post", "/api/webhooks", {**GOOD, "enabled": "yes"}, "admin", 400, "enabled"),
        ("post", "/api/webhooks", {**GOOD, "colour": "red"}, "admin", 400, "colour"),
        ("post", "/api/webhooks", {"name": "ops", "url": GOOD["url"]}, "admin", 400, "events"),
        ("post", "/api/webhooks", GOOD, "operator", 403, None),
        ("get", "/api/webhooks", None, "viewer", 403, None),
        ("patch", "/api/webhooks/kept", {"url": "gopher://x"}, "admin", 400, "url"),
        ("patch", "/api/webhooks/kept", {"events": ["a b"]}, "admin", 400, "events"),
        ("patch", "/api/webhooks/nope", {"enabled": False}, "admin", 404, "webhook"),
        ("delete", "/api/webhooks/nope", None, "admin", 404, "webhook"),
        ("post", "/api/webhooks/nope/ping", None, "admin", 404, "webhook"),
        ("get", "/api/webhook-deliveries?status=lost", None, "admin", 400, "status"),
        ("get", "/api/webhook-deliveries?webhook=nope", None, "admin", 404, "webhook"),
        ("get", "/api/webhook-deliveries/abc", None, "admin", 400, "delivery"),
        ("get", "/api/webhook-deliveries/999999", None, "admin", 404, "delivery"),
        ("post", "/api/webhook-deliveries/999999/redeliver", None, "admin", 404, "delivery"),
    ],
)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # checked before any write
def test_bad_webhook_requests_name_the_field_and_change_nothing(
    db, api, method, path, body, role, status, field
):
    assert api("post", "/api/webhooks", {**GOOD, "name": "kept"}).status_code == 201
    before = regdb.AuditEntry.select().count()
    resp = api(method, path, body, role)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["field"] == field
    assert regdb.AuditEntry.select().count() == before, "nothing audited"
    (kept,) = records.list_webhooks()
    assert (kept["url"], kept["events"], kept["enabled"]) == (GOOD["url"], ["drift.*"], True)


def test_a_second_webhook_of_the_same_name_is_refused(api):
    assert api("post", "/api/webhooks", GOOD).status_code == 201
    resp = api("post", "/api/webhooks", {**GOOD, "url": "https://other.example/"})
    assert resp.status_code == 409 and resp.get_json()["error"]["field"] == "name"
    assert records.list_webhooks()[0]["url"] == GOOD["url"]


# -- CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli(db, db_url, tmp_path, capsys):
    def run(*argv: str):
        release()  # each invocation opens the database afresh, like a new process
        rc = main(["registry", *argv, "--db", db_url, "--state-dir", str(tmp_path / "state")])
        out, err = capsys.readouterr()
        regdb.open_database(db_url)
        return rc, out, err

    return run


def test_cli_round_trip_add_list_ping_deliveries_redeliver_rm(cli, receiver):
    rc, out, err = cli("webhooks", "add", "ops", receiver.url, "--event", "drift.*", "--json")
    assert rc == 0, err
    created = json.loads(out)
    receiver.secrets["ops"] = created["secret"]
    rc, out, _ = cli("webhooks", "list")
    assert rc == 0 and out.startswith("ops\tenabled\t") and created["secret"] not in out
    rc, out, _ = cli("webhooks", "list", "--json")
    assert [w["name"] for w in json.loads(out)] == ["ops"]

    rc, out, err = cli("webhooks", "ping", "ops", "--json")
    assert rc == 0, err
    ping = json.loads(out)
    assert ping["status"] == "delivered" and receiver.delivered()[0].verified

    rc, out, _ = cli("webhooks", "deliveries", "--webhook", "ops", "--json")
    assert rc == 0 and [d["id"] for d in json.loads(out)["deliveries"]] == [ping["id"]]
    rc, out, _ = cli("webhooks", "deliveries", "--id", str(ping["id"]))
    assert json.loads(out)["attempt_log"][0]["status_code"] == 200
    rc, out, _ = cli("webhooks", "redeliver", str(ping["id"]), "--json")
    assert rc == 0 and json.loads(out)["status"] == "pending"

    rc, out, _ = cli("webhooks", "set", "ops", "--disable", "--json")
    assert rc == 0 and json.loads(out)["enabled"] is False
    rc, _, err = cli("webhooks", "ping", "ops")
    assert rc == 1 and "disabled" in err
    rc, out, _ = cli("webhooks", "rm", "ops")
    assert rc == 0 and "removed" in out
    rc, out, _ = cli("webhooks", "list")
    assert out.strip() == "no webhooks"


@pytest.mark.parametrize(
    ("argv", "rc", "message"),
    [
        (("add", "ops", "ftp://x/", "--event", "drift.*"), 2, "url: "),
        (("add", "ops", "https://x/", "--event", "drift.[x"), 2, "events: "),
        (("add", "ops", "https://x/", "--event", "a", "--secret", "short"), 2, "secret: "),
        (("rm", "nope"), 1, "webhook: no webhook 'nope'"),
        (("redeliver", "12345"), 1, "delivery: no webhook delivery 12345"),
        (("ping", "nope"), 1, "webhook: no webhook 'nope'"),
        (("deliveries", "--webhook", "nope"), 1, "webhook: no webhook 'nope'"),
    ],
)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # checked before any write
def test_cli_bad_input_exits_with_a_message_naming_the_field(cli, argv, rc, message):
    got, _out, err = cli("webhooks", *argv)
    assert got == rc and message in err, err
    assert cli("webhooks", "list")[1].strip() == "no webhooks"


def test_cli_ping_to_a_failing_receiver_exits_1_and_leaves_it_queued(cli, receiver):
    rc, out, _ = cli("webhooks", "add", "ops", receiver.url, "--event", "x", "--json")
    receiver.secrets["ops"] = json.loads(out)["secret"]
    receiver.script = [500]
    rc, out, err = cli("webhooks", "ping", "ops")
    assert rc == 1 and "HTTP 500" in err and "retries" in err
    rc, out, _ = cli("webhooks", "deliveries", "--status", "pending", "--json")
    assert json.loads(out)["total"] == 1


# -- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[webhooks]\ninterval = 2\n", "webhooks.interval: unknown key"),
        ("[webhooks]\nmax_attempts = 0\n", "webhooks.max_attempts: Input should be greater"),
        ("[webhooks]\ntimeout_s = -1\n", "webhooks.timeout_s: Input should be greater"),
        ('[webhooks]\nenabled = "sure"\n', "webhooks.enabled: Input should be a valid boolean"),
        (
            "[webhooks]\nbackoff_initial_s = 60\nbackoff_max_s = 10\n",
            "backoff_max_s must be at least backoff_initial_s",
        ),
    ],
)
def test_bad_webhooks_config_names_the_key(tmp_path, toml, expected):
    path = tmp_path / "registry.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_registry_config(path, check=False)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_webhooks_config_reaches_the_job_settings(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text("[webhooks]\nmax_attempts = 3\ntimeout_s = 2.5\nbackoff_initial_s = 1\n")
    s = load_registry_config(path, check=False).webhooks.job_settings()
    assert (s.max_attempts, s.timeout_s, s.backoff_initial_s, s.backoff_max_s) == (3, 2.5, 1, 3600)


# -- the service ---------------------------------------------------------------------


def test_the_running_registry_sends_audit_events_and_pings(broker, tmp_path, receiver):
    """run_registry wiring: its webhook job sends what was audited, and an API ping
    wakes it at once (its interval is far longer than the test)."""
    import threading
    import urllib.request

    from flowfleet.mqtt import BrokerAddress
    from flowfleet.registry.catalog.modelreg import RegistryConfig
    from flowfleet.registry.config import WebhooksSection
    from flowfleet.registry.service import run_registry

    path = tmp_path / "registry.db"
    db = regdb.open_database(path)
    with db.connection_context():
        auth.create_user("root", "admin", actor="test")
        token, _ = auth.create_token("root", actor="test")
        add_hook(db, receiver, events=("group.*",))
        audit("user:x", "group.create", "group:lobby", "new site")  # while it is down
    stop, ready = threading.Event(), []
    thread = threading.Thread(
        target=run_registry,
        kwargs={
            "db_path": str(path),
            "broker": BrokerAddress(broker.host, broker.port),
            "http_port": 0,
            "stop_event": stop,
            "client_id": "registry-webhooks-test",
            "on_ready": ready.append,
            "registry_config": RegistryConfig.beside(path),
            "webhooks": WebhooksSection(interval_s=600, timeout_s=2),
        },
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while (not ready or not receiver.delivered()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready, "run_registry did not report ready"
        (got,) = receiver.delivered()  # the job's first pass, at start
        assert got.verified and got.json["event"] == "group.create"
        assert got.json["entry"]["target"] == "group:lobby"
        request = urllib.request.Request(
            ready[0] + "api/webhooks/ops/ping",
            method="POST",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 202
            ping = json.loads(resp.read())
        deadline = time.monotonic() + 5
        while len(receiver.delivered()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.delivered()[1].json["delivery"] == ping["id"], "woken by the API"
    finally:
        stop.set()
        thread.join(20)
        release()
    assert not thread.is_alive(), "run_registry did not stop"
