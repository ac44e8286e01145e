"""Camera set-up end to end: a real registry (SQLite, ingest worker, command publisher,
HTTP), a real Mosquitto and a real agent counting a looping clip, shared by the tests
of this module (one stack, about 10 s to start).

Checked: a pushed line reaches the agent without restarting its camera, changes what
it counts (the unchanged line keeps its counter) and comes back as reported state
(``applied``); bad geometry is refused naming the field and changes nothing; a
snapshot leaves the device only when asked, and only signed-in users can see it; the
CLI's `cameras geometry get|set` does what the editor does.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from flowfleet.agent.config import AgentConfig
from flowfleet.agent.service import AgentService
from flowfleet.cli import main as cli_main
from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress
from flowfleet.provisioning.mosquitto import Broker
from flowfleet.registry.fleet.commands import CommandPublisher
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.http import auth, websession
from flowfleet.registry.http.web import create_app
from flowfleet.registry.testing import fresh_registry, release, temporary_database
from tests.test_webui import CHROMIUM, CHROMIUM_ARGS, DOCS_IMG, PASSWORD

DEVICE = "setup-cam"
CAMERA = "road"
# The clip's cars drive left to right through the middle; "corner" sees nothing.
CORNER = {"name": "corner", "points": [[5.0, 5.0], [5.0, 60.0]]}
GANTRY = {"name": "gantry", "points": [[480.0, 280.0], [480.0, 540.0]]}
HOMOGRAPHY = {
    "image": [[300.0, 280.0], [660.0, 280.0], [900.0, 530.0], [60.0, 530.0]],
    "ground": [[0.0, 30.0], [12.0, 30.0], [12.0, 0.0], [0.0, 0.0]],
}
COLLINEAR = [[0, 0], [10, 10], [20, 20], [30, 30]]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# The stack's database URL and state folder (the CLI's --db and --state-dir).
STACK_PATHS: dict[str, str] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, videos, int8_model):
    """(base URL, test client, operator token, device token, agent service)."""
    tmp = tmp_path_factory.mktemp("camsetup")
    with Broker(tmp / "broker") as broker, temporary_database("sqlite", tmp / "db") as url:
        reg = fresh_registry(url, tmp)
        STACK_PATHS.update(db=url, state=str(tmp))
        worker = IngestWorker(url, BrokerAddress(broker.host, broker.port), Topics())
        assert worker.start(wait=10), "the registry did not connect to the broker"
        commands = CommandPublisher(worker.db, worker.connection, tick_s=0.2)
        commands.start()
        app = create_app(reg.db, registry=reg, commands=commands)
        with reg.db.connection_context():
            auth.create_user("ops", "operator", actor="test")
            auth.create_user("fleet", "admin", actor="test")
            op, _ = auth.create_token("ops", actor="test")
            websession.set_password("ops", PASSWORD, actor="test")
            dev, _ = auth.create_token("fleet", actor="test", device=DEVICE)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        (tmp / "token").write_text(dev + "\n")
        with urllib.request.urlopen(f"{base}/api/keys") as resp:
            (tmp / "keys.json").write_bytes(resp.read())
        config = AgentConfig.model_validate(
            {
                "device_id": DEVICE,
                "state_dir": str(tmp / "state"),
                "bin_seconds": 3600,
                "health_seconds": 60,
                "drift_seconds": 0,
                "broker": {"host": broker.host, "port": broker.port},
                "registry": {
                    "url": base,
                    "token_file": str(tmp / "token"),
                    "keys_file": str(tmp / "keys.json"),
                },
                "cameras": [
                    {
                        "name": CAMERA,
                        "source": str(videos / "traffic_frames.mp4"),
                        "model": str(int8_model),
                        "loop": True,
                        "realtime": True,
                        "threads": 1,
                        "lines": [CORNER],
                    }
                ],
            }
        )
        service = AgentService(config)
        service.start()
        try:
            client = app.test_client()
            # The registry knows the camera once the agent's online status is stored.
            hdr = {"Authorization": f"Bearer {op}"}
            wait_for(
                lambda: (
                    client.get(
                        f"/api/devices/{DEVICE}/cameras/{CAMERA}/setup", headers=hdr
                    ).status_code
                    == 200
                ),
                20,
                "the device's camera to be known",
            )
            yield base, client, op, dev, service
        finally:
            service.stop(drain_timeout=1)
            server.shutdown()
            commands.stop()
            worker.stop()
            release()


def _setup(client, op) -> dict:
    resp = client.get(
        f"/api/devices/{DEVICE}/cameras/{CAMERA}/setup",
        headers={"Authorization": f"Bearer {op}"},
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def _line_total(service, line: str) -> int:
    with service._tally_lock:
        return sum(sum(v) for (cam, ln, _), v in service._tally.lines.items() if ln == line)


def test_a_pushed_line_changes_what_the_agent_counts(stack):
    _, client, op, _, service = stack
    cam = service.cameras[CAMERA]
    wait_for(lambda: cam.frames >= 5 and cam.pipeline is not None, 30, "frames")
    with cam.lock:
        pipeline, corner = cam.pipeline, cam.pipeline.lines[0]
    restarts = cam.restarts
    assert _line_total(service, "gantry") == 0
    resp = client.put(
        f"/api/devices/{DEVICE}/cameras/{CAMERA}/geometry",
        json={"lines": [CORNER, GANTRY], "zones": []},
        headers={"Authorization": f"Bearer {op}"},
    )
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["state"] == "pending" and body["desired"]["lines"][1]["name"] == "gantry"
    # The agent counts cars on the new line, in the same pipeline (no camera restart),
    # and the unchanged line kept its counter object.
    wait_for(lambda: _line_total(service, "gantry") >= 2, 30, "crossings of the pushed line")
    assert cam.pipeline is pipeline and cam.restarts == restarts
    assert [ln.name for ln in pipeline.lines] == ["corner", "gantry"]
    assert pipeline.lines[0] is corner
    assert [ln.name for ln in cam.config.lines] == ["corner", "gantry"]
    # The reported state brings the geometry back: the registry says "applied".
    setup = wait_for(
        lambda: (s := _setup(client, op))["state"] == "applied" and s, 20, "applied geometry"
    )
    assert [ln["name"] for ln in setup["reported"]["lines"]] == ["corner", "gantry"]
    # Persisted on the device: a restarted agent counts with it.
    assert "gantry" in (Path(service.config.state_dir) / "geometry.json").read_text()


def test_bad_geometry_is_refused_and_changes_nothing(stack):
    _, client, op, _, _ = stack
    before = _setup(client, op)
    version = client.get(
        f"/api/devices/{DEVICE}/deployments", headers={"Authorization": f"Bearer {op}"}
    ).get_json()["desired_version"]
    cases = [
        ({"lines": [{"name": "x", "points": [[1, 1], [1, 1]]}]}, "lines.0.points"),
        ({"lines": [GANTRY, {"name": "bad name!", "points": [[0, 0], [9, 9]]}]}, "lines.1.name"),
        ({"zones": [{"name": "z", "points": [[0, 0], [5, 5]]}]}, "zones.0.points"),
        ({"lines": [GANTRY, GANTRY]}, "lines.1.name"),
        ({"lines": [], "colour": "red"}, "colour"),
        ({"lines": [{**GANTRY, "hysteresis": 3}]}, "lines.0.hysteresis"),
        ({"homography": {"image": COLLINEAR, "ground": HOMOGRAPHY["ground"]}}, "homography.image"),
    ]
    for body, field in cases:
        resp = client.put(
            f"/api/devices/{DEVICE}/cameras/{CAMERA}/geometry",
            json=body,
            headers={"Authorization": f"Bearer {op}"},
        )
        assert resp.status_code == 400, (body, resp.get_json())
        err = resp.get_json()["error"]
        assert err["field"] == field and field in err["message"], err
    # An unknown camera is a 404.
    resp = client.put(
        f"/api/devices/{DEVICE}/cameras/nocam/geometry",
        json={"lines": [GANTRY]},
        headers={"Authorization": f"Bearer {op}"},
    )
    assert resp.status_code == 404 and resp.get_json()["error"]["field"] == "camera"
    after = _setup(client, op)
    assert (after["desired"], after["desired_version"]) == (
        before["desired"],
        before["desired_version"],
    )
    assert (
        client.get(
            f"/api/devices/{DEVICE}/deployments", headers={"Authorization": f"Bearer {op}"}
        ).get_json()["desired_version"]
        == version
    )


def test_a_pushed_homography_starts_speed_measurement(stack):
    _, client, op, _, service = stack
    cam = service.cameras[CAMERA]
    assert cam.config.speed is None and cam.pipeline.speed is None
    lines = [{"name": ln.name, "points": ln.points} for ln in cam.config.lines]
    resp = client.put(
        f"/api/devices/{DEVICE}/cameras/{CAMERA}/geometry",
        json={"lines": lines, "zones": [], "homography": HOMOGRAPHY},
        headers={"Authorization": f"Bearer {op}"},
    )
    assert resp.status_code == 200, resp.get_json()
    setup = wait_for(
        lambda: (s := _setup(client, op))["state"] == "applied" and s, 20, "applied homography"
    )
    assert setup["reported"]["homography"] == HOMOGRAPHY
    with cam.lock:
        assert cam.pipeline.speed is not None
        assert cam.pipeline.speed.spec.homography.image == tuple(map(tuple, HOMOGRAPHY["image"]))


def test_snapshots_only_when_asked_and_only_for_signed_in_users(stack):
    base, client, op, dev, service = stack
    url = f"/api/devices/{DEVICE}/cameras/{CAMERA}/snapshot"
    # Nothing was asked: the device sent nothing, and may not send unasked.
    assert client.get(url, headers={"Authorization": f"Bearer {op}"}).status_code == 404
    unasked = client.put(
        url + "?request=1",
        data=b"\xff\xd8\xff\xe0" + b"\0" * 16,
        content_type="image/jpeg",
        headers={"Authorization": f"Bearer {dev}"},
    )
    assert unasked.status_code == 409, unasked.get_json()
    resp = client.post(url + "/request", headers={"Authorization": f"Bearer {op}"})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["snapshot"]["state"] == "requested"
    wait_for(
        lambda: (_setup(client, op)["snapshot"] or {}).get("state") == "received",
        20,
        "the device's snapshot",
    )
    image = client.get(url, headers={"Authorization": f"Bearer {op}"})
    assert image.status_code == 200 and image.mimetype == "image/jpeg"
    assert image.data.startswith(b"\xff\xd8\xff")
    snap = _setup(client, op)["snapshot"]
    assert (snap["width"], snap["height"]) == (960, 540)
    assert image.headers["Cache-Control"] == "private, no-store"
    # Anonymous (even from loopback, where the dashboard is open) and device tokens: no.
    anon = urllib.request.Request(base + url)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(anon, timeout=5)
    assert err.value.code == 401
    assert client.get(url, headers={"Authorization": f"Bearer {dev}"}).status_code == 403
    # The request was answered once: sending it again is refused.
    again = client.put(
        url + f"?request={snap['request_id']}",
        data=image.data,
        content_type="image/jpeg",
        headers={"Authorization": f"Bearer {dev}"},
    )
    assert again.status_code == 409
    assert service.setup.served[CAMERA] == snap["request_id"]


def _cli(*argv: str) -> int:
    return cli_main(
        ["registry", *argv, "--db", STACK_PATHS["db"], "--state-dir", STACK_PATHS["state"]]
    )


def test_the_cli_gets_and_sets_a_geometry_like_the_editor(stack, tmp_path, capsys):
    _, client, op, _, service = stack
    geo = tmp_path / "geometry.json"
    assert _cli("cameras", "geometry", "get", DEVICE, CAMERA, "--file", str(geo)) == 0
    body = json.loads(geo.read_text())
    assert [ln["name"] for ln in body["lines"]] == [
        ln.name for ln in service.cameras[CAMERA].config.lines
    ]
    # Bad geometry: exit 2, the error names the field, nothing changes.
    before = _setup(client, op)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lines": [{"name": "x", "points": [[1, 1], [1, 1]]}]}))
    capsys.readouterr()
    assert _cli("cameras", "geometry", "set", DEVICE, CAMERA, "--file", str(bad)) == 2
    assert "lines.0.points" in capsys.readouterr().err
    assert _cli("cameras", "geometry", "set", DEVICE, "nocam", "--file", str(geo)) == 1
    after = _setup(client, op)
    assert (after["desired"], after["desired_version"]) == (
        before["desired"],
        before["desired_version"],
    )
    # A good one: queued like the editor's; the running registry publishes it and the
    # agent applies it.
    body["lines"].append({"name": "cli-line", "points": [[100.0, 100.0], [100.0, 400.0]]})
    geo.write_text(json.dumps(body))
    assert _cli("cameras", "geometry", "set", DEVICE, CAMERA, "--file", str(geo)) == 0
    assert "queued as desired state version" in capsys.readouterr().out
    wait_for(
        lambda: "cli-line" in [ln.name for ln in service.cameras[CAMERA].config.lines],
        30,
        "the agent to apply the CLI's geometry",
    )
    setup = wait_for(
        lambda: (s := _setup(client, op))["state"] == "applied" and s, 20, "applied geometry"
    )
    assert setup["reported"]["lines"][-1]["name"] == "cli-line"
    entries = client.get(
        f"/api/audit?target=device:{DEVICE}/camera:{CAMERA}",
        headers={"Authorization": f"Bearer {op}"},
    ).get_json()["entries"]
    assert entries[0]["action"] == "geometry.set" and entries[0]["actor"].startswith("cli:")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def test_a_line_dragged_in_the_browser_is_applied_by_the_agent(stack, browser, tmp_path):
    base, client, op, _, service = stack
    # The camera has a speed calibration (as after the homography test) to draw.
    lines = [{"name": ln.name, "points": ln.points} for ln in service.cameras[CAMERA].config.lines]
    resp = client.put(
        f"/api/devices/{DEVICE}/cameras/{CAMERA}/geometry",
        json={"lines": lines, "homography": HOMOGRAPHY},
        headers={"Authorization": f"Bearer {op}"},
    )
    assert resp.status_code == 200, resp.get_json()
    wait_for(lambda: _setup(client, op)["state"] == "applied", 30, "the calibration")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    # The suite runs four files at once on two cores: give each step a minute.
    page.set_default_timeout(60_000)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(base + "/login?next=/")
        page.fill("input[name=username]", "ops")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        page.goto(f"{base}/devices/{DEVICE}")
        page.wait_for_selector("#setup-svg line.line[data-name=corner]", state="attached")
        # An earlier test's snapshot may be shown already: wait for the one asked here.
        before = (_setup(client, op)["snapshot"] or {}).get("request_id") or 0
        page.click("#setup-snapshot-request")
        page.wait_for_function(
            "Number(document.getElementById('setup-image').getAttribute('data-request')) > "
            + str(before),
            timeout=40_000,
        )
        page.click("#setup-add-line")
        page.fill("#setup-name", "drawn")
        page.press("#setup-name", "Tab")
        assert page.get_attribute("#setup-state", "data-state") == "edited"
        # Drag the new line's B end 120 screen pixels down.
        handle = page.locator("#setup-svg circle.handle[data-kind=lines][data-point='1']").last
        page.locator("#setup-svg").scroll_into_view_if_needed()  # never replaced itself
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x, y + 60, steps=4)
        page.mouse.move(x, y + 120, steps=4)
        page.mouse.up()
        page.wait_for_selector("#setup-svg polygon.homography", state="attached")
        h1 = page.locator("#setup-svg circle.handle[data-kind=homography][data-point='0']")
        box = h1.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 40, y, steps=4)
        page.mouse.up()
        page.click("#setup-save")
        page.wait_for_selector("#setup-state[data-state=applied]", timeout=40_000)
        assert page.locator("#setup-svg line.line[data-name=drawn]").count() == 1
        page.screenshot(path=str(tmp_path / "webui-camsetup.png"), full_page=True)
        if os.environ.get("FLOWFLEET_UPDATE_SCREENSHOTS"):
            page.locator("#camera-setup").screenshot(
                path=str(DOCS_IMG / "webui-camsetup.jpg"), type="jpeg", quality=70
            )
    finally:
        ctx.close()
    assert errors == []
    drawn = next(ln for ln in service.cameras[CAMERA].config.lines if ln.name == "drawn")
    (_, ay), (_, by) = drawn.points
    assert by > ay + 50, "the dragged end moved down the image"
    reported = _setup(client, op)["reported"]
    names = [ln["name"] for ln in reported["lines"]]
    assert names[0] == "corner" and names[-1] == "drawn"
    # H1 moved right on the image; its ground metres stayed.
    assert reported["homography"]["image"][0][0] > HOMOGRAPHY["image"][0][0] + 10
    assert reported["homography"]["ground"] == HOMOGRAPHY["ground"]
    assert service.cameras[CAMERA].config.speed.homography.image[0][0] > 310
