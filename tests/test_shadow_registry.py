"""The registry's side of shadow comparisons, on SQLite and PostgreSQL: windows stored
once and malformed ones dead-lettered, requests that become desired states, the API,
and the pooled agreement the rollouts' count gate reads."""

from __future__ import annotations

import json
import time

import pytest

from flowfleet.contract import Desired, Topics, parse_payload
from flowfleet.registry.fleet import shadow
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.fleet.ingest import DEAD_LETTER, DUPLICATE, STORED, Ingestor
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store.db import AuditEntry, Command, DeadLetter, DriftSummary
from flowfleet.registry.store.shadow_tables import ShadowRequest, ShadowWindow
from tests.factories import shadow_window

TOPICS = Topics()
DEVICE = "cam-1"
TFLITE = "yolov8n_full_integer_quant.tflite"
DYN = "yolov8n_int8_dynamic.tflite"
T0 = float(int(time.time()) // 60 * 60) - 3600


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_windows_are_stored_once_and_pooled(registry):
    ingest = Ingestor(registry.db, TOPICS)
    topic = TOPICS.shadow(DEVICE)
    windows = [
        shadow_window(DEVICE, 1, T0, boxes=(120, 110), matched=100),
        shadow_window(DEVICE, 2, T0 + 60, boxes=(80, 80), matched=80),
        shadow_window(DEVICE, 3, T0 + 120, boxes=(0, 0), matched=0),
        shadow_window(DEVICE, 4, T0 + 60, camera="back", boxes=(10, 0), matched=0),
    ]
    assert [ingest.handle(topic, raw(w)) for w in windows] == [STORED] * 4
    assert ingest.handle(topic, raw(windows[0])) == DUPLICATE
    with registry.db.connection_context():
        assert ShadowWindow.select().count() == 4
        row = ShadowWindow.get(ShadowWindow.seq == 1)
        assert (row.camera, row.candidate_model, row.candidate_version) == (
            "front",
            "yolov8n-dyn",
            3,
        )
        assert (row.active_model, row.agreement, row.frames_compared) == (
            "yolov8n-int8",
            0.8696,
            150,
        )
        summary = shadow.shadow_agreement(DEVICE, "front", T0)
        assert (summary["windows"], summary["boxes_active"], summary["matched"]) == (3, 200, 180)
        assert summary["agreement"] == round(2 * 180 / 390, 4)
        assert summary["lowest_window_agreement"] == 0.8696
        assert (summary["first_start"], summary["last_end"]) == (T0, T0 + 180)
        later = shadow.shadow_agreement(DEVICE, "front", T0 + 60)
        assert (later["windows"], later["agreement"]) == (2, 1.0)
        none = shadow.shadow_agreement(DEVICE, "front", T0, candidate="other")
        assert (none["windows"], none["agreement"]) == (0, None)
        # The rollouts' count gate reads the same pool, and judges only enough boxes.
        gate = shadow.agreement_source(min_boxes=100)
        assert gate(DEVICE, "front", T0) == round(2 * 180 / 390, 4)
        assert gate(DEVICE, "front", T0 + 60) == 1.0  # 160 boxes
        assert gate(DEVICE, "front", T0 + 120) is None  # no boxes: not judged
        assert gate(DEVICE, "back", T0) is None  # 10 boxes: too few
        # The drift judge's hook: shadow windows overlapping a drift window of the
        # same active model (the factory's active model is yolov8n-int8 v2).
        hook = shadow.drift_shadow_source(min_boxes=100)
        active = "yolov8n-int8-v2-0123456789ab.tflite"
        drift_row = DriftSummary(device=DEVICE, camera="front", model=active)
        drift_row.start, drift_row.end = T0 + 30, T0 + 90  # overlaps windows 1 and 2
        assert hook(drift_row).agreement == round(2 * 180 / 390, 4)
        drift_row.start, drift_row.end = T0 + 200, T0 + 260  # none overlaps
        assert hook(drift_row) is None
        drift_row.model = "yolov8n-int8-v7-0123456789ab.tflite"  # another active model
        drift_row.start, drift_row.end = T0, T0 + 60
        assert hook(drift_row) is None
        items, total = shadow.shadow_windows(10, 0, DEVICE, "front")
        assert total == 3 and [w["seq"] for w in items] == [3, 2, 1]
        sent = {k: v for k, v in items[-1].items() if k != "received_at"}
        assert parse_payload("shadow", raw(sent), device=DEVICE).seq == 1


MALFORMED = [
    ("matched", {"matched": 500}, "matched 500 is more than the boxes"),
    ("agreement", {"agreement": None}, "agreement is given exactly when"),
    ("frames_compared", {"frames_compared": 601}, "frames_compared 601 is more than frames"),
    ("share", {"share": 0}, "share"),
    ("unknown field", {"gate": True}, "gate"),
    ("agreement range", {"agreement": 1.5}, "agreement"),
    ("lines", {"lines": [{"line": "door", "class": "car"}]}, "lines.0"),
    ("end", {"end": T0 - 1}, "before start"),
    (
        "candidate_drift",
        {"candidate_drift": {"frames": 149, "detections": 0, "confidence_hist": [0] * 10}},
        "candidate_drift.frames 149 is not frames_compared 150",
    ),
    ("candidate_drift bins", {"candidate_drift": {"frames": 150, "detections": 0}}, "confidence"),
]


@pytest.mark.parametrize(("case", "change", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_windows_are_dead_lettered(registry, case, change, reason):
    ingest = Ingestor(registry.db, TOPICS)
    body = {**shadow_window(DEVICE, 7, T0), **change}
    assert ingest.handle(TOPICS.shadow(DEVICE), raw(body)) == DEAD_LETTER
    with registry.db.connection_context():
        assert ShadowWindow.select().count() == 0
        (letter,) = DeadLetter.select()
        assert (letter.kind, letter.seq, letter.device) == ("shadow", 7, DEVICE)
        assert reason in letter.reason, letter.reason


@pytest.fixture
def app_and_tokens(registry, data):
    with registry.db.connection_context():
        registry.add_version(data / "models" / TFLITE, name="yolo", filename=TFLITE, actor="t")
        registry.add_version(data / "models" / DYN, name="yolo", filename=DYN, actor="t")
        registry.set_alias("yolo", "staging", 2, actor="t")
        tokens = {}
        for role in ("viewer", "operator"):
            auth.create_user(f"{role}-user", role, actor="t")
            tokens[role], _ = auth.create_token(f"{role}-user", actor="t")
    # A queue-only publisher: the desired states land in the commands outbox.
    app = create_app(registry.db, registry=registry, commands=CommandPublisher(registry.db))
    app.config["FLOWFLEET_PUBLISH_WAIT_S"] = 0
    return app.test_client(), tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def queued(registry) -> list[Desired]:
    with registry.db.connection_context():
        return [
            parse_payload("desired", bytes(c.payload), device=DEVICE)
            for c in Command.select().order_by(Command.id)
        ]


def test_shadow_requests_become_desired_states_beside_deployments(registry, app_and_tokens):
    client, tokens = app_and_tokens
    op = bearer(tokens["operator"])
    url = f"/api/devices/{DEVICE}/cameras/front/shadow"
    assert (
        client.post(
            f"/api/devices/{DEVICE}/deployments",
            json={"camera": "front", "model": "yolo", "version": 1},
            headers=op,
        ).status_code
        == 201
    )
    (first,) = queued(registry)
    assert first.shadow is None and b"shadow" not in first.to_json(), "as before shadows"

    resp = client.post(
        url,
        json={"model": "yolo", "alias": "staging", "share": 0.5, "reason": "canary"},
        headers=op,
    )
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert (body["shadow"]["model"], body["shadow"]["version"], body["shadow"]["share"]) == (
        "yolo",
        2,
        0.5,
    )
    desired = queued(registry)[-1]
    assert desired.version == 2 == body["shadow"]["desired_version"]
    assert desired.models["front"].version == 1, "the active model stays"
    assert desired.shadow["front"].model.version == 2 and desired.shadow["front"].share == 0.5
    assert desired.shadow["front"].model.signature and desired.shadow["front"].model.manifest

    # A later deploy keeps the shadow entry in the desired state.
    assert (
        client.post(
            f"/api/devices/{DEVICE}/deployments",
            json={"camera": "back", "model": "yolo", "version": 1},
            headers=op,
        ).status_code
        == 201
    )
    desired = queued(registry)[-1]
    assert set(desired.models) == {"back", "front"} and set(desired.shadow) == {"front"}

    listed = client.get(f"/api/shadow?device={DEVICE}", headers=bearer(tokens["viewer"])).get_json()
    assert [r["camera"] for r in listed["requests"]] == ["front"] and listed["windows"] == []

    # Refused, nothing changed: a viewer, an unknown version, a share out of range.
    n = len(queued(registry))
    refusals = [
        (bearer(tokens["viewer"]), {"model": "yolo", "version": 1}, 403),
        (op, {"model": "yolo", "version": 9}, 404),
        (op, {"model": "yolo", "version": 1, "share": 0}, 400),
        (op, {"model": "yolo", "version": 1, "share": 1.5}, 400),
        (op, {"model": "yolo", "version": 1, "alias": "staging"}, 400),
        (op, {"model": "yolo", "version": 1, "shares": 1}, 400),
    ]
    for headers, payload, status in refusals:
        resp = client.post(url, json=payload, headers=headers)
        assert resp.status_code == status, (payload, resp.get_json())
    assert len(queued(registry)) == n

    resp = client.delete(f"{url}?reason=done", headers=op)
    assert resp.status_code == 200, resp.get_json()
    desired = queued(registry)[-1]
    assert desired.shadow is None and set(desired.models) == {"back", "front"}
    assert client.delete(url, headers=op).status_code == 404
    with registry.db.connection_context():
        assert ShadowRequest.select().count() == 0
        actions = [
            a.action
            for a in AuditEntry.select().order_by(AuditEntry.id)
            if a.action.startswith("shadow.")
        ]
        assert actions == ["shadow.set", "shadow.clear"]


def test_the_api_lists_windows_and_the_pooled_agreement(registry, app_and_tokens):
    client, tokens = app_and_tokens
    ingest = Ingestor(registry.db, TOPICS)
    for seq in (1, 2):
        ingest.handle(TOPICS.shadow(DEVICE), raw(shadow_window(DEVICE, seq, T0 + 60 * seq)))
    viewer = bearer(tokens["viewer"])
    page = client.get(
        f"/api/shadow?device={DEVICE}&camera=front&limit=1", headers=viewer
    ).get_json()
    assert (page["total"], page["next_offset"], page["windows"][0]["seq"]) == (2, 1, 2)
    assert page["windows"][0]["candidate"]["model"] == "yolov8n-dyn"
    got = client.get(
        f"/api/shadow/agreement?device={DEVICE}&camera=front&since={T0}", headers=viewer
    )
    assert got.status_code == 200 and got.get_json()["windows"] == 2
    assert got.get_json()["agreement"] == round(2 * 200 / 460, 4)
    assert client.get("/api/shadow/agreement?device=x", headers=viewer).status_code == 400
    assert client.get("/api/shadow?device=a/b", headers=viewer).status_code == 400


def test_cli_sets_lists_and_clears_a_shadow(tmp_path, capsys, data, db_url):
    """`flowfleet registry shadow ...` in-process, on the module's database."""
    from flowfleet.cli import main
    from flowfleet.registry.testing import fresh_database, release

    url = fresh_database(db_url)
    state = tmp_path / "state"

    def run(*argv: str):
        release()  # each invocation opens the database afresh, like a new process
        rc = main(["registry", *argv, "--db", url, "--state-dir", str(state)])
        out, err = capsys.readouterr()
        return rc, out, err

    assert run("models", "add", str(data / "models" / DYN), "--name", "yolo")[0] == 0
    rc, out, _ = run("shadow", "set", DEVICE, "front", "yolo", "1", "--share", "0.2")
    assert rc == 0 and "shadow yolo v1; desired state version 1 queued" in out, out
    rc, out, err = run("shadow", "set", DEVICE, "front", "yolo", "1", "--share", "2")
    assert rc == 2 and "--share 2.0 is not in (0, 1]" in err
    rc, out, err = run("shadow", "set", DEVICE, "front", "nope", "1")
    assert rc != 0 and "nope" in err and len(err.strip().splitlines()) == 1
    release()
    Ingestor(regdb_open(url), TOPICS).handle(
        TOPICS.shadow(DEVICE), raw(shadow_window(DEVICE, 1, time.time() - 600))
    )
    rc, out, _ = run("shadow", "list", "--device", DEVICE)
    assert rc == 0 and "request\tcam-1/front\tyolo v1\tshare 0.2" in out
    assert "agreement 0.870" in out
    rc, out, _ = run("shadow", "agreement", DEVICE, "front", "--json")
    assert rc == 0 and json.loads(out)["windows"] == 1
    rc, out, _ = run("shadow", "clear", DEVICE, "front", "--json")
    assert rc == 0 and "shadow" not in json.loads(out)["desired"]
    assert run("shadow", "clear", DEVICE, "front")[0] != 0


def regdb_open(url: str):
    from flowfleet.registry.store import db as regdb

    return regdb.open_database(url)
