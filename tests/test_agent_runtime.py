"""Agent runtime pieces without processes: outbox cap and positions, backoff,
sd_notify, system figures, resumable file source."""

from __future__ import annotations

import os
import random
import socket
import stat

import numpy as np
import pytest

from flowfleet.agent.outbox import Outbox, Position
from flowfleet.agent.sdnotify import Notifier
from flowfleet.agent.system_stats import SystemStats, throttle_flags
from flowfleet.contract import CountBin, LineCount, parse_payload
from flowfleet.mqtt import backoff_delay


def make_bin(seq: int) -> CountBin:
    return CountBin(
        device="dev-1",
        seq=seq,
        start=float(seq),
        end=seq + 1.0,
        lines=(LineCount(camera="c", line="l", class_="car", in_=1, out=0),),
    )


def fill(box: Outbox, pattern: str) -> None:
    """'c' enqueues a count bin, 'h' a health beat, 'e' an event."""
    streams = {"h": "health", "e": "events"}
    for ch in pattern:
        if ch == "c":
            box.enqueue_bin("counts", make_bin)
        else:
            box.enqueue(streams[ch], streams[ch], lambda seq: b"{}")


def streams_left(box: Outbox) -> str:
    rows = box.pending(1000)
    letter = {"counts": "c", "health": "h", "events": "e"}
    return "".join(letter[topic] for _, topic, _ in rows)


def test_keep_counts_drops_oldest_health_first_and_never_counts(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, "hchehchc")
    dropped = box.enforce_limits(max_messages=5, max_age_s=1e9, policy="keep_counts")
    assert [(d.stream, d.n, d.first_seq, d.last_seq) for d in dropped] == [("health", 3, 1, 3)]
    assert streams_left(box) == "cechc"
    assert box.depth() == 5 and box.depth("counts") == 3 and box.depth("health") == 1
    # Still over the cap: the last beat goes; events (dropped by age only) and counts stay.
    dropped = box.enforce_limits(max_messages=2, max_age_s=1e9, policy="keep_counts")
    assert [(d.stream, d.n) for d in dropped] == [("health", 1)]
    assert streams_left(box) == "cecc"
    assert box.enforce_limits(max_messages=2, max_age_s=1e9, policy="keep_counts") == []
    assert box.counters() == {"dropped.health": 4}


def test_drop_oldest_drops_counts_too_and_spares_inflight_rows(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, "cchcc")
    first = box.pending(1)[0][0]
    dropped = box.enforce_limits(3, 1e9, "drop_oldest", exclude={first})
    assert [(d.stream, d.n) for d in dropped] == [("counts", 1), ("health", 1)]
    assert [parse_payload("counts", r[2]).seq for r in box.pending(10)] == [1, 3, 4]


def test_age_cap_drops_only_droppable_streams(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, "chech")
    import time

    dropped = box.enforce_limits(100, max_age_s=60, now=time.time() + 3600)
    assert {d.stream for d in dropped} == {"health", "events"}
    assert box.depth() == 2 and box.depth("counts") == 2


def test_positions_commit_with_the_bin_and_survive_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    box.enqueue_bin("t", make_bin, positions={"door": Position("/v.mp4", 123, 40)})

    def broken(seq):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        box.enqueue_bin("t", broken, positions={"door": Position("/v.mp4", 123, 99)})
    box.close()
    box = Outbox(path)
    assert box.positions() == {"door": Position("/v.mp4", 123, 40)}
    assert box.last_seq("counts") == 1 and box.depth() == 1


def test_delete_many_and_depth_stay_consistent(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    fill(box, "chchc")
    ids = [r[0] for r in box.pending(10)]
    assert box.delete_many([*ids[:3], 999]) == 3
    assert box.depth() == 2 and box.depth("counts") == 1 and box.depth("health") == 1
    box.close()
    assert Outbox(tmp_path / "o.sqlite").depth() == 2


def test_outbox_is_synchronous_full_and_wal(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_backoff_grows_with_jitter_and_stays_bounded():
    rng = random.Random(1)
    delays = [[backoff_delay(a, 1.0, 30.0, rng) for a in range(1, 10)] for _ in range(50)]
    for run in delays:
        assert all(1.0 <= d <= 30.0 for d in run)
        assert run[0] == 1.0 and run[-1] >= 15.0
    # jitter: the same attempt does not give the same delay across clients
    assert len({round(run[4], 3) for run in delays}) > 10


def test_sd_notify_sends_ready_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_s == 3.0
        assert n.ready("counting") and n.watchdog() and n.stopping()
        got = [server.recv(4096).decode() for _ in range(3)]
        assert got == ["READY=1\nSTATUS=counting", "WATCHDOG=1", "STOPPING=1"]
        n.close()
    finally:
        server.close()
    off = Notifier({})
    assert not off.enabled and off.watchdog_s is None and off.ready() is False
    other_pid = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_s is None


def test_system_stats_read_pi_and_jetson_figures(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 400 kB\n")
    (proc / "self" / "statm").write_text("100 50 0 0 0 0 0\n")
    for i, (kind, milli) in enumerate([("cpu-thermal", 61234), ("GPU-therm", 48500)]):
        zone = sys_ / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    (sys_ / "devices" / "gpu.0").mkdir(parents=True)
    (sys_ / "devices" / "gpu.0" / "load").write_text("735\n")
    vc = tmp_path / "vcgencmd"
    vc.write_text("#!/bin/sh\necho throttled=0x50005\n")
    vc.chmod(vc.stat().st_mode | stat.S_IEXEC)

    stats = SystemStats(tmp_path, proc=proc, sys=sys_, vcgencmd=str(vc))
    (proc / "stat").write_text("cpu  150 0 150 900 0 0 0 0 0 0\n")  # 100 busy of 200
    s = stats.sample()
    assert s.cpu_percent == 50.0
    assert s.mem_total_bytes == 1000 * 1024 and s.mem_available_bytes == 400 * 1024
    assert s.process_rss_bytes == 50 * os.sysconf("SC_PAGE_SIZE")
    assert s.soc_temp_c == 61.2 and s.gpu_temp_c == 48.5 and s.gpu_percent == 73.5
    assert s.throttled == 0x50005
    assert s.throttled_flags == (
        "under_voltage",
        "throttled",
        "under_voltage_occurred",
        "throttling_occurred",
    )
    assert s.disk_free_bytes and s.disk_total_bytes
    assert throttle_flags(0) == ()
    # A plain machine: nothing Pi- or Jetson-specific is invented.
    bare = SystemStats(tmp_path, proc=proc, sys=tmp_path / "nosys", vcgencmd=None).sample()
    assert bare.soc_temp_c is None and bare.throttled is None and bare.gpu_percent is None


def test_camera_source_starts_exactly_at_the_persisted_frame(videos):
    from flowfleet.agent import resume

    def open_at(start: int, loop: bool = False):
        return resume.open_camera_source(str(video), start_frame=start, loop=loop)

    video = videos / "traffic_frames.mp4"
    full = list(open_at(0))
    n = len(full)
    assert [f.index for f in full] == list(range(n)) and resume.is_resumable(open_at(0))
    for start in (1, 7, n - 1):
        rest = list(open_at(start))
        assert len(rest) == n - start
        assert rest[0].index == start and np.array_equal(rest[0].image, full[start].image)
    assert list(open_at(n)) == []  # a finished file stays finished
    looped = open_at(n - 2, loop=True)
    frames = []
    for frame in looped:
        frames.append(frame)
        if len(frames) == 4:
            break
    looped.stop()
    assert [f.index for f in frames] == [n - 2, n - 1, n, n + 1]
    assert np.array_equal(frames[2].image, full[0].image)
    # A position from a looping run maps into the file.
    again = open_at(n + 3, loop=True)
    first = next(iter(again))
    again.stop()
    assert first.index == n + 3 and np.array_equal(first.image, full[3].image)


class FakeConnection:
    """Hands out the given message ids; acknowledges nothing by itself."""

    def __init__(self, mids: list[int]) -> None:
        import threading

        self.connected = threading.Event()
        self.connected.set()
        self.mids = list(mids)
        self.sent: list[bytes] = []
        self.on_ack = None

    def publish(self, topic, payload, qos=1, retain=False):
        self.sent.append(payload)
        return self.mids.pop(0)


def test_publisher_deletes_only_what_was_acknowledged(tmp_path):
    import time

    from flowfleet.agent.publisher import Publisher

    box = Outbox(tmp_path / "o.sqlite")
    fill(box, "h")
    conn = FakeConnection([6, 5])
    pub = Publisher(box, window=5)
    pub.attach(conn)
    pub.on_ack(5)  # the ack of a status publish: not one of ours
    pub.start()
    try:
        deadline = time.monotonic() + 5
        while len(conn.sent) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        pub.on_ack(6)
        while box.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert box.depth() == 0
        fill(box, "h")  # paho's mid counter wrapped: this row gets mid 5 again
        pub.notify()
        while len(conn.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert box.depth() == 1, "a row was deleted without its PUBACK"
    finally:
        pub.stop()


def test_drift_window_summarises_with_fixed_bins():
    from flowfleet.agent.detections import Detections
    from flowfleet.agent.drift import DriftWindow
    from flowfleet.contract import CONFIDENCE_EDGES, DETECTIONS_EDGES

    names = ("person", "car")
    grey = np.full((100, 200, 3), 128, np.uint8)
    window = DriftWindow("door", "m.tflite", start=10.0)
    two = Detections(
        [[0, 0, 20, 10], [0, 0, 100, 50]], [0.35, 1.0], [0, 1], names=names
    )  # areas: 1% and 25% of the image
    window.add(two, grey, 0.010)
    window.add(Detections.empty(names), grey, 0.020)
    window.add(None, grey, 0.030)
    s = window.take("dev-1", end=20.0)
    assert (s.camera, s.model, s.start, s.end, s.frames, s.detections) == (
        "door",
        "m.tflite",
        10.0,
        20.0,
        3,
        2,
    )
    assert len(s.confidence_hist) == len(CONFIDENCE_EDGES) - 1
    assert s.confidence_hist[3] == 1 and s.confidence_hist[9] == 1  # 1.0 in the last bin
    assert len(s.detections_hist) == len(DETECTIONS_EDGES)
    assert s.detections_hist[:3] == (2, 0, 1)
    assert s.detections_per_frame == round(2 / 3, 4)
    assert s.class_mix == {"person": 1, "car": 1}
    assert s.mean_box_area == pytest.approx(0.13)
    assert s.latency_ms_p50 == pytest.approx(20.0)
    assert s.brightness == pytest.approx(128.0) and s.blur == pytest.approx(0.0)
    parse_payload("drift", s.model_copy(update={"seq": 4}).to_json())
    # The next window starts where this one ended; an empty window sends nothing.
    assert window.start == 20.0 and window.take("dev-1", end=30.0) is None


def test_a_failing_camera_is_reported_while_the_other_counts(tmp_path, broker, videos, int8_model):
    """In-process service: one camera's source is missing, the other keeps counting."""
    import time

    from flowfleet.agent.config import AgentConfig
    from flowfleet.agent.service import AgentService

    config = AgentConfig.model_validate(
        {
            "device_id": "two-cams",
            "state_dir": str(tmp_path / "state"),
            "bin_seconds": 1,
            "health_seconds": 1,
            "drift_seconds": 0,
            "broker": {"host": broker.host, "port": broker.port},
            "cameras": [
                {
                    "name": "good",
                    "source": str(videos / "traffic_frames.mp4"),
                    "model": str(int8_model),
                    "realtime": True,
                    "loop": True,
                    "lines": [{"name": "gantry", "points": [[480, 280], [480, 540]]}],
                },
                {
                    "name": "gone",
                    "source": str(tmp_path / "missing.mp4"),
                    "model": str(int8_model),
                },
            ],
        }
    )
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from flowfleet.contract import Topics

    got: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect(broker.host, broker.port)
    sub.subscribe(Topics().events("two-cams"), 1)
    sub.loop_start()
    service = AgentService(config)
    service.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (service.cameras["good"].frames < 10 or not got):
            time.sleep(0.1)
        beat = service.health()
        cams = {c.camera: c for c in beat.cameras}
        assert cams["good"].state == "running" and cams["good"].frames >= 10
        # The tracker thresholds set themselves (issue 20) and the beat says so.
        assert cams["good"].thresholds.mode in ("auto", "warming_up")
        assert cams["gone"].state == "failed" and "video file not found" in cams["gone"].error
        assert cams["gone"].restarts >= 1
        assert beat.system is not None and beat.system.cpu_count
    finally:
        service.stop()
        sub.loop_stop()
        sub.disconnect()
    event = parse_payload("events", got[0])
    assert (event.type, event.camera, event.severity) == ("camera_failed", "gone", "error")
    assert "video file not found" in event.message


def test_agent_cli_errors_are_one_line_with_exit_codes(tmp_path, videos, int8_model):
    import subprocess
    import sys

    def run(text: str) -> subprocess.CompletedProcess:
        path = tmp_path / "agent.toml"
        path.write_text(text)
        return subprocess.run(
            [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    base = f"""
device_id = "cli-cam"
state_dir = "{tmp_path / "state"}"
[broker]
port = 1
[[cameras]]
name = "c"
source = "{videos / "traffic_frames.mp4"}"
model = "{int8_model}"
"""
    bad = run(base.replace("port = 1", "port = 1\nusername = 'u'\npassword_file = 'nope'"))
    assert bad.returncode == 2
    assert "broker.password_file: file not found" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run(base + f"\n[metrics]\nport = {port}\n")
    assert busy.returncode == 1, busy.stderr
    assert "cannot start the agent" in busy.stderr and "Traceback" not in busy.stderr


def count_file_camera(tmp_path, broker, device: str, camera: dict):
    """Run an agent in-process with one file camera (``camera``: its config table,
    ``realtime`` false) until it has read the whole file, then close and return the
    count bin."""
    import time

    from flowfleet.agent.config import AgentConfig
    from flowfleet.agent.service import AgentService

    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": str(tmp_path / "state"),
            "bin_seconds": 3600,
            "drift_seconds": 0,
            "broker": {"host": broker.host, "port": broker.port},
            "cameras": [camera],
        }
    )
    name = camera["name"]
    # The agent closes bins on wall-clock multiples of bin_seconds: start well clear of
    # the next one, so every event of a short clip lands in the bin closed here.
    left = 3600 - time.time() % 3600
    if left < 90:
        time.sleep(left + 0.1)
    service = AgentService(config)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and service.cameras[name].state != "stopped":
            time.sleep(0.1)
        assert service.cameras[name].state == "stopped"
        return service.close_bin()
    finally:
        service.stop()


def test_speed_and_zone_visits_reach_the_count_bins(tmp_path, broker, videos, int8_model):
    """A camera with a ground homography and a zone: the bins carry speeds, and the
    zone's open visits are closed when the file ends (entries == exits)."""
    camera = {
        "name": "road",
        "source": str(videos / "traffic_frames.mp4"),
        "model": str(int8_model),
        "realtime": False,
        "lines": [{"name": "gantry", "points": [[480, 280], [480, 540]]}],
        "zones": [{"name": "lane", "points": [[0, 300], [960, 300], [960, 540], [0, 540]]}],
        "speed": {
            "homography": {
                "image": [[100, 375], [900, 375], [900, 425], [100, 425]],
                "ground": [[0, 3.7], [15.1, 3.7], [15.1, 0], [0, 0]],
            },
            "window_s": 0.3,
        },
    }
    count_bin = count_file_camera(tmp_path, broker, "speedy", camera)
    assert count_bin.speeds, "no speed rows in the bin"
    measured = [s for s in count_bin.speeds if s.n]
    assert measured and all(0 < s.mean_kmh < 300 for s in measured)
    lane = [z for z in count_bin.zones if z.zone == "lane" and z.entries]
    assert lane and all(z.entries == z.exits for z in lane)


@pytest.mark.parametrize(
    ("tracker", "cars_in"),
    [
        ({}, 2),
        # No track is seen often enough to get an id: nothing may be counted.
        ({"min_hits": 100}, 0),
    ],
)
def test_a_cameras_tracker_settings_reach_its_tracker(
    tmp_path, broker, videos, int8_model, tracker, cars_in, caplog
):
    caplog.set_level("INFO")
    camera = {
        "name": "road",
        "source": str(videos / "traffic_frames.mp4"),
        "model": str(int8_model),
        "realtime": False,
        "classes": ["car"],
        "lines": [{"name": "gantry", "points": [[480, 280], [480, 540]]}],
        "tracker": tracker,
    }
    count_bin = count_file_camera(tmp_path, broker, "tuned", camera)
    counted = {(r.line, r.class_): (r.in_, r.out) for r in count_bin.lines}
    assert counted == {("gantry", "car"): (cars_in, 0)}
    logged = [r.getMessage() for r in caplog.records if "tracker settings" in r.getMessage()]
    assert logged == (["camera road tracker settings: min_hits=100"] if tracker else [])


@pytest.mark.parametrize("jump_s", [-3 * 86400.0, 600.0])
def test_a_clock_jump_clamps_the_bin_window_and_keeps_its_counts(tmp_path, jump_s, caplog):
    """A bin opened 3 days ago (the clock jumped forward) or in the future (backward)
    is still enqueued, with a window the contract accepts and its counts intact."""
    import time

    from flowfleet.agent.config import AgentConfig
    from flowfleet.agent.counting import Crossing
    from flowfleet.agent.service import AgentService
    from flowfleet.contract import MAX_WINDOW_S

    config = AgentConfig.model_validate(
        {
            "device_id": "jumpy",
            "state_dir": str(tmp_path / "state"),
            "broker": {"host": "127.0.0.1", "port": 1},
            "cameras": [{"name": "c", "source": "x.mp4", "model": "m.tflite"}],
        }
    )
    service = AgentService(config)
    try:
        service._bin_start = time.time() + jump_s
        service._tally.add_crossing("c", Crossing("door", "person", "in", 7, 0.0))
        count_bin = service.close_bin()
    finally:
        service.outbox.close()
    assert 0 <= count_bin.end - count_bin.start <= MAX_WINDOW_S
    assert [(r.line, r.in_) for r in count_bin.lines] == [("door", 1)]
    assert "the clock jumped" in caplog.text
    assert parse_payload("counts", count_bin.to_json(), now=time.time()) == count_bin
