"""The registry's web UI in a real browser: Debian's chromium driven by Playwright.

One registry (SQLite, a real Mosquitto, the rollout job), three simulated devices that
speak the wire protocol and take model updates, and one browser serve every test of
this module (module scope keeps the whole file to a few tens of seconds). Count bins
are published through the broker into the registry's real ingest. Screenshots of
every page go to the test's tmp folder; with ``FLOWFLEET_UPDATE_SCREENSHOTS=1`` they
also replace the ones in docs/img/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.contract import (
    CameraHealth,
    CountBin,
    DriftSummary,
    Health,
    LineCount,
    Status,
    SystemHealth,
    Topics,
)
from flowfleet.mqtt import BrokerAddress
from flowfleet.provisioning.mosquitto import Broker
from flowfleet.registry.catalog.modelreg import ModelRegistry, RegistryConfig
from flowfleet.registry.config import ConfigError, MapSection, RolloutsSection, load_registry_config
from flowfleet.registry.fleet.devices import create_device
from flowfleet.registry.fleet.drift import DriftJudge, JudgeOptions
from flowfleet.registry.fleet.drift_stats import Settings
from flowfleet.registry.http import auth, websession
from flowfleet.registry.service import run_registry
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import release
from tests.simdevices import start_fleet, stop_fleet
from tests.test_rollouts import CAMERA, FILES, MODEL, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse battery"
DEVICES = {"sim-a": (48.8584, 2.2945), "sim-b": (48.8606, 2.3376), "sim-c": (48.8530, 2.3499)}
# Unreachable on purpose: the map must draw its markers when tiles never load.
TILES = "http://tiles.invalid/{z}/{x}/{y}.png"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
PAGE_BUDGET = 500 * 1024  # bytes a page may weigh with its scripts and styles
TOPICS = Topics()


@pytest.fixture(scope="module")
def browser_type():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p.chromium


# The suite runs four test files at once on two cores: a page step may take a while.
STEP_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser(browser_type):
    b = browser_type.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


def _publish_bins(address: BrokerAddress) -> dict[str, int]:
    """Count bins of the last minutes for sim-a and sim-b through the broker; returns
    what they add up to per class."""
    pub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="webui-test-bins",
        protocol=mqtt.MQTTv5,
    )
    pub.connect(address.host, address.port)
    pub.loop_start()
    # sim-a announces itself online (retained, as the agent's status topic is).
    status = Status(device="sim-a", state="online").to_json()
    pub.publish(TOPICS.status("sim-a"), status, qos=1, retain=True).wait_for_publish(5)
    sent = {"person": 0, "car": 0}
    minute = int(time.time()) // 60 * 60
    try:
        for device in ("sim-a", "sim-b"):
            for seq in range(1, 6):
                start = minute - 60 * (6 - seq)
                rows = (
                    LineCount(camera=CAMERA, line="door", class_="person", in_=seq, out=1),
                    LineCount(camera=CAMERA, line="road", class_="car", in_=2 * seq, out=0),
                )
                b = CountBin(device=device, seq=seq, start=start, end=start + 60, lines=rows)
                pub.publish(TOPICS.counts(device), b.to_json(), qos=1).wait_for_publish(5)
                sent["person"] += seq + 1
                sent["car"] += 2 * seq
    finally:
        pub.disconnect()
        pub.loop_stop()
    return sent


@pytest.fixture(scope="module")
def site(tmp_path_factory, data):
    """The running registry: {url, registry, sims, sent, shots, token}."""
    tmp = tmp_path_factory.mktemp("webui")
    shots = tmp / "screenshots"
    shots.mkdir()
    path = tmp / "registry.sqlite"
    db = regdb.open_database(path)
    reg = ModelRegistry.from_config(db, RegistryConfig.beside(path))
    reg.start()
    reg.add_version(data / "models" / FILES[0], name=MODEL, filename=FILES[0], actor="test")
    for name, role in (("olive", "operator"), ("vera", "viewer")):
        auth.create_user(name, role, actor="test")
        websession.set_password(name, PASSWORD, actor="test")
    token, _ = auth.create_token("olive", actor="test")
    for device, (lat, lon) in DEVICES.items():
        create_device(db, device, {"location": {"latitude": lat, "longitude": lon}}, actor="test")
    with Broker(tmp / "broker") as broker:
        address = BrokerAddress(broker.host, broker.port)
        sims = start_fleet(address, list(DEVICES), camera=CAMERA, beat_s=0.5)
        stop, ready = threading.Event(), []
        thread = threading.Thread(
            target=run_registry,
            args=(path, address, "127.0.0.1", 0, TOPICS.root, stop),
            kwargs={
                "on_ready": ready.append,
                "client_id": "webui-registry",
                "rollouts": RolloutsSection(
                    tick_s=0.1, lease_s=0.5, soak_s=1.0, beat_timeout_s=2.5
                ),
                "map_section": MapSection(tiles=TILES, attribution="test tiles"),
            },
            daemon=True,
        )
        thread.start()
        try:
            wait_for(lambda: bool(ready), 20, "the registry to start")
            for device in DEVICES:
                reg.deploy(device, CAMERA, MODEL, 1, actor="test")
            wait_for(lambda: all(s.running == (MODEL, 1) for s in sims), 15, "v1 everywhere")
            sent = _publish_bins(address)
            url = ready[0].rstrip("/")
            wait_for(lambda: _people(url) == sent["person"], 15, "the bins to be stored")
            yield {
                "url": url,
                "registry": reg,
                "sims": sims,
                "sent": sent,
                "shots": shots,
                "token": token,
                "address": address,
            }
        finally:
            stop.set()
            thread.join(30)
            stop_fleet(sims)
            release()


def _get(url: str, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _people(url: str) -> int:
    now = int(time.time())
    res = _get(f"{url}/api/series?kind=lines&step=hour&from={now - 7200}&to={now}&group=class")
    return sum(
        s["total"]["in"] + s["total"]["out"] for s in res["series"] if s["key"]["class"] == "person"
    )


def _login(browser, site, name: str):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(site["url"] + "/login?next=/")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(site["url"] + "/")
    return ctx, page


@pytest.fixture(scope="module")
def operator(browser, site):
    ctx, page = _login(browser, site, "olive")
    yield page
    ctx.close()


def shot(site, page, name: str) -> None:
    target = site["shots"] / f"{name}.png"
    page.screenshot(path=str(target))
    if os.environ.get("FLOWFLEET_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(exist_ok=True)
        shutil.copyfile(target, DOCS_IMG / f"webui-{name}.png")


# -- tests ----------------------------------------------------------------------------


# What a page weighs: the document, its scripts, styles and images (not the API data
# its scripts fetch, which is what the page shows).
WEIGHT_JS = """() => performance.getEntries()
  .filter((e) => e.entryType === "navigation" ||
    (e.entryType === "resource" && !["fetch", "xmlhttprequest"].includes(e.initiatorType)))
  .reduce((a, e) => a + e.decodedBodySize, 0)"""


def test_sign_in_shows_the_shell_on_every_page_within_the_weight_budget(site, operator):
    page = operator
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    for path, name in (
        ("/", "dashboard"),
        ("/map", "map"),
        ("/devices", "devices"),
        ("/devices/sim-a", "device"),
        ("/models", "models"),
        ("/rollouts", "rollouts"),
        ("/events", "events"),
        ("/relays", "relays"),
    ):
        page.goto(site["url"] + path)
        assert page.locator("header.shell nav a[aria-current=page]").count() == 1, path
        who = page.inner_text("#who")
        assert "olive" in who and "operator" in who, path
        page.wait_for_selector("#refresh.status:has-text('updated')", timeout=10_000)
        weight = page.evaluate(WEIGHT_JS)
        assert 0 < weight < PAGE_BUDGET, f"{path} weighs {weight} bytes"
        shot(site, page, name)
    assert not errors, f"script errors: {errors}"
    # Times are the viewer's, with the UTC value on hover.
    page.goto(site["url"] + "/devices")
    first = page.locator("#devices time").first
    first.wait_for()
    assert first.get_attribute("title").endswith(" UTC")


def test_error_pages_are_styled_and_anonymous_reads_are_read_only(browser, site):
    # Dark mode follows the system's preference.
    ctx = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    page = ctx.new_page()
    resp = page.goto(site["url"] + "/no-such-page")
    assert resp.status == 404 and page.locator("header.shell").count() == 1
    assert "404" in page.inner_text("h1")
    resp = page.goto(site["url"] + "/models")
    assert resp.status == 401 and "Sign in" in page.inner_text("main")
    shot(site, page, "error-401")
    resp = page.goto(site["url"] + "/")  # anonymous dashboard from localhost
    assert resp.status == 200 and "not signed in" in page.inner_text("#who")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(18, 21, 26)"
    page.wait_for_selector("#refresh.status:has-text('updated')")
    shot(site, page, "dashboard-dark")
    ctx.close()


def test_dashboard_numbers_equal_the_api(site, operator):
    page = operator
    page.goto(site["url"] + "/")
    for tile in ("people-hour", "vehicles-hour", "people-today", "people-range"):
        page.wait_for_selector(f"#{tile}[data-source]")
    sent = site["sent"]
    for people, vehicles in (("people-hour", "vehicles-hour"), ("people-today", "vehicles-today")):
        source = page.get_attribute(f"#{people}", "data-source")
        api = _get(site["url"] + source)
        per = {s["key"]["class"]: s["total"]["in"] + s["total"]["out"] for s in api["series"]}
        assert int(page.get_attribute(f"#{people}", "data-value")) == per["person"]
        assert int(page.get_attribute(f"#{vehicles}", "data-value")) == per["car"]
        assert per == {"person": sent["person"], "car": sent["car"]}
        assert page.inner_text(f"#{people}") == f"{sent['person']:,}"
    page.wait_for_selector("#flow[data-points] canvas")
    assert int(page.get_attribute("#flow", "data-total")) == sent["person"] + sent["car"]
    page.wait_for_selector("#busiest-lines tr:has-text('road')")
    assert page.locator("#classes tr").count() == 2
    # A new bin reaches the open dashboard within 2 s of ingest (issue 17's goal),
    # through the live stream: while it is open the page re-reads only every 30 s.
    page.wait_for_selector("body[data-live=sse]")
    events = int(page.get_attribute("body", "data-live-events") or 0)
    before = int(page.get_attribute("#people-hour", "data-value"))
    pub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="webui-test-live",
        protocol=mqtt.MQTTv5,
    )
    pub.connect(site["address"].host, site["address"].port)
    pub.loop_start()
    try:
        start = int(time.time()) // 60 * 60
        rows = (LineCount(camera=CAMERA, line="door", class_="person", in_=7, out=0),)
        b = CountBin(device="sim-c", seq=1, start=start, end=start + 60, lines=rows)
        t0 = time.monotonic()
        pub.publish(TOPICS.counts("sim-c"), b.to_json(), qos=1).wait_for_publish(5)
        page.wait_for_selector(f"#people-hour[data-value='{before + 7}']", timeout=5000)
        shown_s = time.monotonic() - t0
    finally:
        pub.disconnect()
        pub.loop_stop()
    print(f"a bin reached the open dashboard {shown_s:.2f} s after it was published")
    assert int(page.get_attribute("body", "data-live-events")) > events, "not by the stream"
    # The goal is 2 s; the bound leaves room for a loaded test machine (and is far
    # below the 30 s re-read, so the stream brought it).
    assert shown_s < 5.0, "ingest, one stream tick and one re-read must fit"
    fleet = _get(site["url"] + "/api/devices")["devices"]
    for presence in ("online", "unknown"):
        want = sum(d["presence"] == presence for d in fleet)
        page.wait_for_selector(f"#n-{presence}:text-is('{want}')")
    assert sum(d["presence"] == "online" for d in fleet) == 1


def test_the_map_draws_every_device_with_tiles_blocked(browser, site):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(STEP_TIMEOUT_MS)
    tiles_asked: list[str] = []

    def block(route):
        tiles_asked.append(route.request.url)
        route.abort()

    ctx.route("http://tiles.invalid/**", block)
    page = ctx.new_page()
    page.goto(site["url"] + "/map")
    page.wait_for_function("document.querySelectorAll('path.device-marker').length === 3")
    assert page.locator(".leaflet-control-scale-line").first.is_visible()
    assert tiles_asked, "the configured tile URL was not used"
    page.select_option("#colour-by", "version")
    page.wait_for_selector("#legend :text('yolo v')")
    page.locator("path.device-marker").first.click()
    page.wait_for_selector(".leaflet-popup-content :text('last hour')")
    assert page.locator(".leaflet-popup-content a[href^='/devices/']").count() == 1
    shot(site, page, "map-offline")
    ctx.close()


def test_upload_a_model_through_the_form(site, operator, data):
    page = operator
    page.goto(site["url"] + "/models")
    page.fill("#upload input[name=name]", MODEL)
    page.set_input_files("#file", str(data / "models" / FILES[1]))
    page.fill("#upload input[name=notes]", "uploaded from the browser")
    page.click("#upload button[type=submit]")
    page.wait_for_selector(f"text=Registered {MODEL} version 2")
    assert page.locator(f"tr[data-model='{MODEL}'][data-version='2']").count() == 1
    # Move an alias with its form (PUT /api/models/yolo/aliases/production).
    alias = page.locator("#alias-form")
    alias.locator("input[name=version]").fill("2")
    alias.locator("input[name=reason]").fill("v2 for everyone")
    alias.locator("button[type=submit]").click()
    page.wait_for_selector("h2 .chip:has-text('production→v2')")
    # "deployed on" comes from the devices' reported state.
    page.wait_for_selector(
        f"tr[data-model='{MODEL}'][data-version='1'] .deployed:has-text('sim-a/')"
    )


def test_a_rollout_started_in_the_browser_reaches_the_devices(site, operator):
    page = operator
    page.goto(site["url"] + "/models")
    form = page.locator("#deploy-form")
    form.locator("input[name=ref]").fill("2")
    form.locator("input[name=camera]").fill(CAMERA)
    form.locator("select[name=target]").select_option("devices")
    form.locator("input[name=who]").fill(",".join(DEVICES))
    form.locator("input[name=waves]").fill("1")
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/rollouts#rollout-*")
    page.wait_for_selector("section[data-state=succeeded]", timeout=30_000)
    assert page.locator("section[data-state=succeeded] tr[data-device]").count() == 3
    shot(site, page, "rollouts")
    assert all(s.running == (MODEL, 2) for s in site["sims"])
    page.goto(site["url"] + "/devices/sim-a")
    page.wait_for_selector("#cameras td:has-text('yolo v2')")
    shot(site, page, "device")


def test_a_rollback_from_the_device_page_appears_in_events(site, operator):
    page = operator
    page.goto(site["url"] + "/devices/sim-b")
    page.once("dialog", lambda d: d.accept())
    page.click("button.rollback:has-text('yolo v1')")
    page.wait_for_selector("#notice :text('Rolled sim-b/front back to yolo v1')")
    wait_for(lambda: site["sims"][1].running == (MODEL, 1), 15, "sim-b back on v1")
    page.goto(site["url"] + "/events?device=sim-b")
    page.wait_for_selector("#audit td:has-text('rollback from the web UI')")
    shot(site, page, "events")


def _publish(address: BrokerAddress, messages: list[tuple[str, str]]) -> None:
    pub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="webui-test-publish",
        protocol=mqtt.MQTTv5,
    )
    pub.connect(address.host, address.port)
    pub.loop_start()
    try:
        for topic, payload in messages:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()


def _window(device: str, seq: int, start: float, model: str, detections: int) -> DriftSummary:
    """A 5-minute drift window of 100 frames with ``detections`` people."""
    conf = [0] * 10
    conf[7], conf[8] = detections // 2, detections - detections // 2
    return DriftSummary(
        device=device,
        seq=seq,
        camera=CAMERA,
        model=model,
        start=start,
        end=start + 300,
        frames=100,
        detections=detections,
        confidence_hist=tuple(conf),
        detections_per_frame=detections / 100,
        detections_hist=(0, 0, 0, 100, 0, 0, 0),
        class_mix={"person": detections},
    )


def test_device_page_charts_health_and_the_drift_thresholds(site, operator):
    """Health beats and drift windows of a camera whose new model finds a fifth of the
    people, through the broker into ingest; the registry's drift judge judges them;
    the device page charts the health series and each window's detections per frame
    with the band the judge allowed."""
    device, now = "drift-d", time.time()
    create_device(site["registry"].db, device, {"name": "drift demo"}, actor="test")
    beats = [
        Health(
            device=device,
            seq=i + 1,
            ts=now - 1800 + 300 * i,
            uptime_s=300.0 * i + 1,
            outbox_depth=[0, 4, 12, 3, 0, 1][i],
            system=SystemHealth(soc_temp_c=55.0 + i),
            cameras=(CameraHealth(camera=CAMERA, state="running", fps=9.5, inference_ms=80.0),),
        )
        for i in range(6)
    ]
    start = now - 15 * 300
    windows = [
        _window(device, i + 1, start + 300 * i, "people-v1-aaaaaaaaaaaa.tflite", 300)
        for i in range(10)
    ]
    windows += [
        _window(device, 11 + i, start + 300 * (10 + i), "people-v2-bbbbbbbbbbbb.tflite", 60)
        for i in range(4)
    ]
    _publish(
        site["address"],
        [(TOPICS.health(device), b.to_json()) for b in beats]
        + [(TOPICS.drift(device), w.to_json()) for w in windows],
    )
    auth_hdr = {"Authorization": f"Bearer {site['token']}"}
    wait_for(
        lambda: _get(f"{site['url']}/api/drift?device={device}", auth_hdr)["total"] == 14,
        15,
        "the drift windows to be stored",
    )
    judge = DriftJudge(
        site["registry"].db,
        site["registry"],
        Settings(policies=("distribution",)),
        JudgeOptions(baseline_windows=10, judge_windows=60),
        topics=TOPICS,
    )
    judge.run_once(at=time.time() + 60)  # past the settle time
    verdicts = _get(f"{site['url']}/api/drift/verdicts?device={device}", auth_hdr)["verdicts"]
    # Three breaches confirm model drift (k=3 of n=4): the fourth window is not judged.
    assert [v["verdict"] for v in verdicts] == ["model_drift", "breach", "breach"]
    assert all("dpf_log_ratio" in v["breaches"] for v in verdicts)
    page = operator
    page.goto(f"{site['url']}/devices/{device}")
    page.wait_for_selector("#health-source[data-source]")
    source = page.get_attribute("#health-source", "data-source")
    series = _get(site["url"] + source, auth_hdr)
    assert sum(series["beats"]) == 6
    for box, values in (
        ("health-fps", series["cameras"][CAMERA]["fps"]),
        ("health-temperature", series["temperature_c"]),
        ("health-outbox", series["outbox_depth"]),
    ):
        want = sum(v is not None for v in values)
        page.wait_for_selector(f"#{box}[data-points='{want}'] canvas")
    # One chart per camera: every window a dot, the judged ones with their thresholds.
    page.wait_for_selector(
        f"#drift-dpf [data-camera='{CAMERA}'][data-windows='14'][data-thresholds='3'] canvas"
    )
    page.locator("#health-over-time").scroll_into_view_if_needed()
    shot(site, page, "device-health")
    page.locator("#drift-dpf").scroll_into_view_if_needed()
    shot(site, page, "device-drift")


def test_pause_resume_and_abort_a_rollout_from_its_page(site, operator):
    sim_c = site["sims"][2]
    sim_c.behaviours[(MODEL, 1)] = "ignore"  # never applies v1: the canary stays moving
    body = {
        "model": MODEL,
        "version": 1,
        "camera": CAMERA,
        "targets": {"devices": ["sim-c"]},
        "reason": "stuck canary",
    }
    req = urllib.request.Request(
        site["url"] + "/api/rollouts",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {site['token']}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        rid = json.loads(resp.read())["id"]
    page = operator
    page.goto(site["url"] + "/rollouts")
    card = f"#rollout-{rid}"
    page.click(f"{card} button[data-action=pause]")
    page.wait_for_selector(f"{card}[data-state=paused]")
    page.click(f"{card} button[data-action=resume]")
    page.wait_for_selector(f"{card}[data-state=running]")
    page.once("dialog", lambda d: d.accept("the canary never answers"))
    page.click(f"{card} button[data-action=abort]")
    page.wait_for_selector(f"{card}[data-state=aborted]", timeout=15_000)
    assert "the canary never answers" in page.inner_text(card)
    wait_for(lambda: sim_c.running == (MODEL, 2), 15, "sim-c still on v2")


def test_relays_page_shows_the_report_and_requeues_parked_messages(site, operator, browser):
    from flowfleet.registry.relays import outbox, usage
    from flowfleet.registry.relays.outbox import Route, Stored

    db = regdb.Device._meta.database
    t = time.time()
    with db.atomic():
        usage.record("aws", t, usage.Tally(messages=900, publishes=90, bytes=450_000, units=90))
        tally = usage.Tally(messages=400, publishes=400, bytes=240_000, units=400, failures=3)
        for ms in (12.0, 15.0, 40.0):
            tally.observe_ms(ms)
        usage.record("gcp", t, tally)
        rows = [Stored("sim-a", "counts", s, "{}", t - 30) for s in (1, 2, 3)]
        outbox.queue_stored(db, [Route("gcp", ("counts",))], rows)
        for row in outbox.due("gcp", 2):
            outbox.park(row.id, "refused by gcp: InvalidArgument")
    page = operator
    page.goto(site["url"] + "/relays")
    page.wait_for_selector("#report tr[data-relay=gcp]")
    source = page.get_attribute("#report", "data-source")
    api = _get(site["url"] + source, {"Authorization": f"Bearer {site['token']}"})
    assert [r["relay"] for r in api["relays"]] == ["aws", "gcp"]
    for r in api["relays"]:
        cells = page.locator(f"#report tr[data-relay={r['relay']}] td").all_inner_texts()
        assert cells[1] == f"{r['messages']:,}" and cells[4] == f"{r['units']:,}"
        assert cells[5] == str(r["failures"])
        # The bill scales the period's volume to a month, and the period ends "now":
        # the page's request and this one, moments apart, may differ by a few cents.
        for cell, usd in (
            (cells[11], r["monthly"]["usd"]),
            (cells[12], r["monthly_doubled"]["usd"]),
        ):
            assert cell.startswith("$") and abs(float(cell[1:].replace(",", "")) - usd) <= max(
                0.02, 0.05 * usd
            ), (cell, usd)
        # The advice names an amount too, moments apart like the bill above.
        shown = page.locator(f"#advice li[data-relay={r['relay']}]").inner_text()
        assert _without_amounts(r["advice"]) in _without_amounts(shown), (shown, r["advice"])
    gcp = page.locator("#report tr[data-relay=gcp] td").all_inner_texts()
    assert gcp[8] != "-" and gcp[10] != "-"  # latency percentiles shown
    page.wait_for_selector("#outboxes tr[data-relay=gcp]")
    cells = page.locator("#outboxes tr[data-relay=gcp] td").all_inner_texts()
    assert cells[3] == "1" and cells[4] == "2"
    page.wait_for_selector("#parked td:text-is('sim-a/counts/2')")  # filled after outboxes
    assert page.locator("#parked tr").count() == 2
    shot(site, page, "relays")
    # A viewer sees the report but neither the parked list nor the button.
    ctx, viewer = _login(browser, site, "vera")
    try:
        viewer.goto(site["url"] + "/relays")
        viewer.wait_for_selector("#report tr[data-relay=gcp]")
        assert viewer.locator("button[data-requeue]").count() == 0
        assert viewer.locator("#parked").count() == 0
    finally:
        ctx.close()
    page.once("dialog", lambda d: d.accept("topic fixed"))
    page.click("button[data-requeue=gcp]")
    page.wait_for_selector("#notice :text('gcp: 2 messages requeued')")
    page.wait_for_selector("#parked td.empty")
    with db.connection_context():
        assert outbox.parked("gcp") == [] and len(outbox.due("gcp", 10)) == 3
    audit = _get(site["url"] + "/api/audit?limit=5", {"Authorization": f"Bearer {site['token']}"})[
        "entries"
    ]
    assert any(e["action"] == "relay.requeue" and e["reason"] == "topic fixed" for e in audit)


def test_csrf_and_roles_refuse_bad_forms(browser, site, data):
    ctx, page = _login(browser, site, "vera")
    try:
        page.goto(site["url"] + "/models")
        assert page.locator("#upload").count() == 0, "a viewer gets no upload form"
        csrf = page.get_attribute("meta[name=csrf-token]", "content")
        req = ctx.request
        model = (data / "models" / FILES[0]).read_bytes()
        form = {
            "csrf_token": csrf,
            "name": "other",
            "file": {"name": "m.tflite", "mimeType": "application/octet-stream", "buffer": model},
        }
        r = req.post(site["url"] + "/models/upload", multipart=form)
        assert r.status == 403 and "operator" in r.text()
        r = req.put(
            f"{site['url']}/api/models/{MODEL}/aliases/production",
            data=json.dumps({"version": 1}),
            headers={"Content-Type": "application/json", "X-CSRF-Token": csrf},
        )
        assert r.status == 403
        r = req.post(
            f"{site['url']}/api/relays/gcp/requeue",
            data=json.dumps({"reason": "a viewer may not"}),
            headers={"Content-Type": "application/json", "X-CSRF-Token": csrf},
        )
        assert r.status == 403 and "operator" in r.json()["error"]["message"]
    finally:
        ctx.close()
    ctx, page = _login(browser, site, "olive")
    try:
        req = ctx.request
        form = {
            "name": "other",
            "file": {"name": "m.tflite", "mimeType": "application/octet-stream", "buffer": model},
        }
        r = req.post(site["url"] + "/models/upload", multipart={**form, "csrf_token": "wrong"})
        assert r.status == 403 and "CSRF" in r.text()
        r = req.post(
            f"{site['url']}/api/devices/sim-a/deployments",
            data=json.dumps({"camera": CAMERA, "model": MODEL, "version": 1}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 403 and r.json()["error"]["code"] == "csrf_failed"
        r = req.post(
            f"{site['url']}/api/relays/gcp/requeue",
            data=json.dumps({"reason": "no token"}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 403 and r.json()["error"]["code"] == "csrf_failed"
    finally:
        ctx.close()
    names = [m["name"] for m in site["registry"].list_models()[0]]
    assert names == [MODEL], "nothing was registered by a refused form"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[map]\ntiles = "https://t.example/{z}/{x}.png"\n',
            "map.tiles: must contain {y}",
        ),
        (
            '[map]\ntiles = "ftp://t.example/{z}/{x}/{y}.png"\n',
            "map.tiles: must be an http",
        ),
        ('[map]\ntiles = "https://t.example/{z}/{x}/{y}.png?a=<b>"\n', "must not contain spaces"),
        ("[map]\ncolour = 1\n", "map.colour: unknown key"),
    ],
)
def test_the_map_section_is_validated(tmp_path, toml, expected):
    path = tmp_path / "registry.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_registry_config(path, check=False)
    assert str(path) in str(err.value) and expected in str(err.value)
    path.write_text('[map]\ntiles = "/tiles/{z}/{x}/{y}.png"\nattribution = "ours"\n')
    assert load_registry_config(path, check=False).map.tiles == "/tiles/{z}/{x}/{y}.png"


def test_every_page_file_is_packaged():
    """An installed wheel serves the same pages: every template and static file is in
    pyproject's packages and package-data (folders of data files are listed as
    packages, see pyproject.toml)."""
    import fnmatch

    from flowfleet.configfile import tomllib  # tomli before Python 3.11

    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    http = root / "registry" / "http"
    files = [p for d in ("static", "templates") for p in (http / d).rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        package = "flowfleet.registry.http." + ".".join(path.parent.relative_to(http).parts)
        assert package in setup["packages"], f"{package} is not listed in packages"
        patterns = setup["package-data"].get(package, [])
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} is not packaged"


def _without_amounts(text: str) -> str:
    """``text`` with every dollar amount as ``$N`` (amounts computed moments apart differ)."""
    return re.sub(r"\$[0-9][0-9,]*(\.[0-9]+)?", "$N", text)
