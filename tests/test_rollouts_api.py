"""Staged rollouts through the REST API, the CLI, the config file and the registry
service (tests/test_rollouts.py has the state machine itself)."""

# The deployment tests' ``tokens`` fixture is imported below; pytest injects it by name.
# ruff: noqa: F811

from __future__ import annotations

import json
import threading
import time

import pytest

from flowfleet.cli import main
from flowfleet.configfile import ConfigError
from flowfleet.mqtt import BrokerAddress
from flowfleet.registry.catalog.modelreg import ModelRegistry, RegistryConfig
from flowfleet.registry.config import RolloutsSection, load_registry_config
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.fleet.rollout_job import RolloutJob
from flowfleet.registry.fleet.rollout_steps import RolloutStepper
from flowfleet.registry.fleet.rollouts import create_rollout
from flowfleet.registry.http.web import create_app
from flowfleet.registry.service import run_registry
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.db import AuditEntry, Deployment
from flowfleet.registry.store.rollout_tables import Rollout
from flowfleet.registry.testing import release
from tests.simdevices import start_fleet, stop_fleet
from tests.test_registry_deploy import bearer, tokens  # noqa: F401 - fixture
from tests.test_rollouts import CAMERA, FILES, MODEL, two_versions, wait_for


@pytest.fixture
def api(registry, data):
    """(test client, the app's rollout job, not started); yolo v1 and v2 registered
    and v1 deployed to devices a, b, c."""
    two_versions(registry, data)
    for d in "abc":
        registry.deploy(d, CAMERA, MODEL, 1, actor="test")
    app = create_app(registry.db, registry=registry, commands=CommandPublisher(registry.db))
    job = RolloutJob(RolloutStepper(registry), tick_s=0.1)
    app.extensions["flowfleet_rollout_job"] = job
    app.extensions["flowfleet_rollout_defaults"] = {"soak_s": 42.0}
    return app.test_client(), job


def body(**changes) -> dict:
    out = {
        "model": MODEL,
        "version": 2,
        "camera": CAMERA,
        "targets": {"devices": ["a", "b", "c"]},
        "plan": {"canary": {"devices": ["a"]}, "waves": 2},
        "reason": "v2 is better",
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def test_rollouts_are_created_shown_paused_resumed_and_aborted_over_the_api(api, tokens):
    client, job = api
    op, viewer = bearer(tokens["operator"]), bearer(tokens["viewer"])
    resp = client.post("/api/rollouts", json=body(), headers=op)
    assert resp.status_code == 201, resp.get_json()
    r = resp.get_json()
    rid = r["id"]
    assert resp.headers["Location"] == f"/api/rollouts/{rid}"
    assert (r["state"], r["version"], r["plan"]["soak_s"], r["plan"]["waves"]) == (
        "running",
        2,
        42.0,  # the registry's default, under the request's own plan
        2,
    )
    assert [d["device"] for d in r["waves"][0]["devices"]] == ["a"]
    job.tick()  # the canary moves
    shown = client.get(f"/api/rollouts/{rid}", headers=viewer).get_json()
    assert shown["waves"][0]["devices"][0]["state"] == "moving"
    assert shown["waves"][0]["devices"][0]["previous"] == {"model": MODEL, "version": 1}
    assert Deployment.get(device="a").version == 2

    def post(action, **kw):
        return client.post(f"/api/rollouts/{rid}/{action}", headers=op, **kw)

    assert post("pause", json={"reason": "look first"}).get_json()["state"] == "paused"
    assert post("pause").status_code == 409
    assert post("resume").get_json()["state"] == "running"
    listed = client.get("/api/rollouts?state=running", headers=viewer).get_json()
    assert [x["id"] for x in listed["rollouts"]] == [rid] and listed["total"] == 1
    assert listed["rollouts"][0]["devices"] == {"moving": 1, "pending": 2}
    aborted = post("abort", json={"reason": "changed my mind"}).get_json()
    assert aborted["state"] == "aborted", "the app's job runs the abort at once"
    assert aborted["waves"][0]["devices"][0]["state"] == "reverted"
    assert Deployment.get(device="a").version == 1
    assert post("abort").status_code == 409
    trail = client.get(f"/api/audit?target=rollout:{rid}", headers=op).get_json()["entries"]
    assert [e["action"] for e in reversed(trail)] == [
        "rollout.create",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
        "rollout.aborted",
    ]
    assert trail[-1]["actor"] == "user:operator-user"


@pytest.mark.parametrize(
    ("changes", "token", "status", "field"),
    [
        ({}, "viewer", 403, None),
        ({}, None, 401, None),
        ({"plan": {"waves": 0}}, "operator", 400, "plan.waves"),
        ({"model": "nope"}, "operator", 404, "model"),
        ({"version": None}, "operator", 400, "version"),
        ({"targets": {"tags": ["nobody"]}}, "operator", 409, "targets"),
        ({"extra": 1}, "operator", 400, "extra"),
    ],
)
def test_bad_requests_are_refused_and_create_nothing(api, tokens, changes, token, status, field):
    client, _ = api
    headers = bearer(tokens[token]) if token else {}
    resp = client.post("/api/rollouts", json=body(**changes), headers=headers)
    assert resp.status_code == status, resp.get_json()
    if field is not None:
        assert resp.get_json()["error"]["field"] == field
    assert Rollout.select().count() == 0


def test_unknown_rollouts_and_bad_ids(api, tokens):
    client, _ = api
    viewer = bearer(tokens["viewer"])
    assert client.get("/api/rollouts/99", headers=viewer).status_code == 404
    assert client.get("/api/rollouts/x", headers=viewer).status_code == 400
    assert client.get("/api/rollouts?state=lost", headers=viewer).status_code == 400


# -- the CLI ------------------------------------------------------------------------------


def test_the_cli_creates_shows_and_aborts_and_refuses_bad_input_with_exit_2(
    registry, data, db_url, tmp_path, capsys
):
    two_versions(registry, data)
    for d in ("a", "b"):
        registry.deploy(d, CAMERA, MODEL, 1, actor="test")

    def run(*argv: str):
        release()  # each invocation opens the database afresh, like a new process
        rc = main(["registry", "--db", db_url, "--state-dir", str(tmp_path / "s"), *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    create = ("rollouts", "create", MODEL, "2", "--camera", CAMERA, "--device", "a")
    rc, out, err = run(*create, "--device", "b", "--waves", "0")
    assert rc == 2 and "plan.waves" in err, err
    rc, out, err = run("rollouts", "create", "nope", "2", "--camera", CAMERA, "--all")
    assert rc == 2 and "model: no model 'nope'" in err, err
    rc, out, err = run(*create, "--tag", "none-has-it", "--plan-json", "[1]")
    assert rc == 2 and "--plan-json: must be a JSON object" in err
    rc, out, err = run("rollouts", "create", MODEL, "2", "--camera", CAMERA, "--tag", "none")
    assert rc == 2 and "targets: the targets name no device" in err, err
    rc, out, err = run(*create, "--abort-percent", "sad=5")
    assert rc == 2 and "--abort-percent: 'sad' is not one of" in err, err
    rc, out, err = run("rollouts", "list")
    assert (rc, out.strip()) == (0, "no rollouts")

    rc, out, err = run(*create, "--device", "b", "--canary", "b", "--soak", "5", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert [d["device"] for d in r["waves"][0]["devices"]] == ["b"]
    assert r["plan"]["soak_s"] == 5.0
    rc, out, err = run("rollouts", "pause", str(r["id"]), "--reason", "wait")
    assert (rc, out.strip()) == (0, f"rollout {r['id']}: paused")
    rc, out, err = run("rollouts", "show", str(r["id"]))
    assert rc == 0 and "paused" in out and "canary (waiting):" in out
    rc, out, err = run("rollouts", "abort", str(r["id"]), "--json")
    assert rc == 0 and json.loads(out)["state"] == "aborted"
    rc, out, err = run("rollouts", "resume", str(r["id"]))
    assert rc == 2 and "is aborted" in err
    rc, out, err = run("rollouts", "list", "--json")
    assert [x["state"] for x in json.loads(out)] == ["aborted"]
    actors = {e.actor for e in AuditEntry.select().where(AuditEntry.action == "rollout.abort")}
    assert len(actors) == 1 and actors.pop().startswith("cli:")


# -- the config file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[rollouts]\ntick = 5\n", "rollouts.tick: unknown key"),
        ("[rollouts]\ntick_s = 0\n", "rollouts.tick_s: Input should be greater than 0"),
        ("[rollouts]\ntick_s = 5\nlease_s = 5\n", "lease_s (5) must be longer than tick_s"),
        ("[rollouts]\nwaves = 0\n", "rollouts.waves: Input should be greater than or equal to 1"),
    ],
)
def test_the_rollouts_section_is_validated(tmp_path, toml, expected):
    path = tmp_path / "registry.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_registry_config(path, check=False)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_the_rollouts_section_gives_plan_defaults(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text("[rollouts]\nenabled = false\ntick_s = 2\nsoak_s = 60\nwaves = 4\n")
    s = load_registry_config(path, check=False).rollouts
    assert (s.enabled, s.tick_s, s.lease_s) == (False, 2.0, None)
    assert s.plan_defaults() == {"waves": 4, "soak_s": 60.0}


# -- the registry service: the job runs, and a restarted registry resumes -------------------


def test_a_restarted_registry_service_resumes_the_rollout(tmp_path, broker, data):
    path = tmp_path / "reg.sqlite"
    db = regdb.open_database(path)
    reg = ModelRegistry.from_config(db, RegistryConfig.beside(path))
    reg.start()
    for f in FILES:
        reg.add_version(data / "models" / f, name=MODEL, filename=f, actor="test")
    address = BrokerAddress(broker.host, broker.port)
    devices = ["s-1", "s-2", "s-3"]
    sims = start_fleet(address, devices, camera=CAMERA, beat_s=0.2)
    section = RolloutsSection(tick_s=0.1, lease_s=0.5, soak_s=1.0, beat_timeout_s=2.5)

    def serve() -> tuple[threading.Thread, threading.Event]:
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=run_registry,
            args=(path, address, "127.0.0.1", 0, "flowfleet/v1", stop),
            kwargs={"on_ready": lambda url: ready.set(), "rollouts": section},
            daemon=True,
        )
        thread.start()
        assert ready.wait(20), "the registry did not start"
        return thread, stop

    thread, stop = serve()
    try:
        for d in devices:
            reg.deploy(d, CAMERA, MODEL, 1, actor="test")
        wait_for(lambda: all(s.running == (MODEL, 1) for s in sims), 15, "v1 everywhere")
        r = create_rollout(
            reg,
            model=MODEL,
            ref=2,
            camera=CAMERA,
            targets={"devices": devices},
            plan={**section.plan_defaults(), "canary": {"count": 1}, "waves": 2},
            actor="test",
        )
        wait_for(lambda: Rollout.get_by_id(r["id"]).wave >= 1, 15, "the canary to succeed")
        stop.set()
        thread.join(30)
        assert Rollout.get_by_id(r["id"]).state == "running"
        time.sleep(0.3)  # the devices keep beating while no registry runs
        thread, stop = serve()
        wait_for(lambda: Rollout.get_by_id(r["id"]).state == "succeeded", 20, "the rollout")
        assert all(s.running == (MODEL, 2) and s.versions_sent(MODEL) == [1, 2] for s in sims)
    finally:
        stop.set()
        thread.join(30)
        stop_fleet(sims)
        release()
