"""The contract's strictness and bounds: well-formed but absurd values are refused.

Every case starts from a valid payload (`tests.factories.valid_payload`), changes one
field and checks that `parse_payload` refuses it with a one-line reason naming the
field, or accepts it at the boundary. ``json.dumps`` writes float('nan') and
float('inf') as the non-standard tokens NaN and Infinity, which Python's json
module (and pydantic's parser) read.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from flowfleet import contract as c
from flowfleet.contract import (
    ContractError,
    CountBin,
    Event,
    LineCount,
    ZoneCount,
    parse_payload,
)
from tests.factories import valid_payload

NOW = float(int(time.time()))
NAN, INF = float("nan"), float("inf")


def changed(kind: str, path: str, value, *, drop: bool = False) -> bytes:
    """The valid payload of ``kind`` with the field at dotted ``path`` set to ``value``."""
    body = valid_payload(kind, now=NOW)
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) else last
    if drop:
        del node[key]
    else:
        node[key] = value
    return json.dumps(body).encode()


def refused(kind: str, raw: bytes, now: float | None = NOW) -> str:
    with pytest.raises(ContractError) as info:
        parse_payload(kind, raw, device="cam-1", now=now)
    reason = str(info.value)
    assert "\n" not in reason and len(reason) < 300, reason
    return reason


WINDOW = c.MAX_WINDOW_S
T = float(int(NOW)) - 600.0  # the factories' timestamps

# id, kind, field path, value, words the reason must contain
ABSURD = [
    # the envelope: no coercion of the schema version
    ("schema-true", "counts", "schema", True, ["'schema'", "True"]),
    ("schema-float", "counts", "schema", 1.0, ["'schema'", "1.0"]),
    ("schema-string", "counts", "schema", "1", ["'schema'"]),
    ("schema-2", "counts", "schema", 2, ["'schema'", "version 2"]),
    ("schema-true-health", "health", "schema", True, ["'schema'"]),
    ("schema-true-ack", "ack", "schema", True, ["'schema'"]),
    # counts: coercion
    ("seq-true", "counts", "seq", True, ["'seq'", "integer"]),
    ("seq-string", "counts", "seq", "5", ["'seq'", "integer"]),
    ("seq-float", "counts", "seq", 5.0, ["'seq'", "integer"]),
    ("in-string", "counts", "lines.0.in", "5", ["'lines.0.in'", "integer"]),
    ("in-true", "counts", "lines.0.in", True, ["'lines.0.in'", "integer"]),
    ("in-float", "counts", "lines.0.in", 5.5, ["'lines.0.in'", "integer"]),
    ("start-true", "counts", "start", True, ["'start'", "number"]),
    ("start-string", "counts", "start", str(T), ["'start'", "number"]),
    ("lines-object", "counts", "lines", {"0": {}}, ["'lines'"]),
    # counts: bounds
    ("in-2^62", "counts", "lines.0.in", 2**62, ["'lines.0.in'", "1000000"]),
    ("in-max+1", "counts", "lines.0.in", c.MAX_COUNT + 1, ["'lines.0.in'", "1000000"]),
    ("out-negative", "counts", "lines.0.out", -1, ["'lines.0.out'", "greater"]),
    ("in-2^64", "counts", "lines.0.in", 2**64, ["'lines.0.in'"]),
    ("seq-2^63-1", "counts", "seq", 2**63 - 1, ["'seq'", str(c.MAX_SEQ)]),
    ("seq-2^53", "counts", "seq", 2**53, ["'seq'", str(c.MAX_SEQ)]),
    ("seq-zero", "counts", "seq", 0, ["'seq'", "greater"]),
    ("entries-2^31", "counts", "zones.0.entries", 2**31, ["'zones.0.entries'"]),
    ("peak-2^53", "counts", "zones.0.peak_occupancy", 2**53, ["'zones.0.peak_occupancy'"]),
    ("dwell-1e308", "counts", "zones.0.dwell_s_sum", 1e308, ["'zones.0.dwell_s_sum'"]),
    ("dwell-negative", "counts", "zones.0.dwell_s_sum", -0.5, ["'zones.0.dwell_s_sum'"]),
    ("speed-1e6", "counts", "speeds.0.mean_kmh", 1e6, ["'speeds.0.mean_kmh'", "1000"]),
    ("speed-n", "counts", "speeds.0.insufficient", 2**40, ["'speeds.0.insufficient'"]),
    ("class-long", "counts", "lines.0.class", "x" * 65, ["'lines.0.class'", "64"]),
    ("class-empty", "counts", "lines.0.class", "", ["'lines.0.class'"]),
    ("class-nul", "counts", "lines.0.class", "car\x00", ["'lines.0.class'", "NUL"]),
    ("start-negative", "counts", "start", -1.0, ["'start'", "greater"]),
    ("start-1e300", "counts", "start", 1e300, ["'start'"]),
    ("window-long", "counts", "end", T + WINDOW + 1, ["'end'", "longer than 86400"]),
    ("window-backwards", "counts", "end", T - 1, ["'end'", "before start"]),
    ("wire-name-in_", "counts", "lines.0.in_", 5, ["'lines.0.in_'"]),
    # counts: non-finite, as NaN / Infinity tokens
    ("start-nan", "counts", "start", NAN, ["'start'", "finite"]),
    ("end-inf", "counts", "end", INF, ["'end'", "finite"]),
    ("end-minus-inf", "counts", "end", -INF, ["'end'", "finite"]),
    ("dwell-inf", "counts", "zones.0.dwell_s_sum", INF, ["'zones.0.dwell_s_sum'", "finite"]),
    ("speed-nan", "counts", "speeds.0.p85_kmh", NAN, ["'speeds.0.p85_kmh'", "finite"]),
    ("in-nan", "counts", "lines.0.in", NAN, ["'lines.0.in'"]),
    # health
    ("health-ts-nan", "health", "ts", NAN, ["'ts'", "finite"]),
    ("health-seq-true", "health", "seq", True, ["'seq'"]),
    ("uptime-1e12", "health", "uptime_s", 1e12, ["'uptime_s'"]),
    ("uptime-inf", "health", "uptime_s", INF, ["'uptime_s'", "finite"]),
    ("fps-1e9", "health", "cameras.0.fps", 1e9, ["'cameras.0.fps'"]),
    ("inference-inf", "health", "cameras.0.inference_ms", INF, ["'cameras.0.inference_ms'"]),
    ("p95-1e9", "health", "cameras.0.inference_p95_ms", 1e9, ["'cameras.0.inference_p95_ms'"]),
    ("frames-2^53", "health", "cameras.0.frames", 2**53, ["'cameras.0.frames'"]),
    ("restarts-string", "health", "cameras.0.restarts", "1", ["'cameras.0.restarts'"]),
    ("outbox-2^63", "health", "outbox_dropped", 2**63, ["'outbox_dropped'"]),
    ("cpu-101", "health", "system.cpu_percent", 101.0, ["'system.cpu_percent'", "100"]),
    ("cpu-count-true", "health", "system.cpu_count", True, ["'system.cpu_count'"]),
    ("temp-1e6", "health", "system.soc_temp_c", 1e6, ["'system.soc_temp_c'"]),
    ("gpu-temp-nan", "health", "system.gpu_temp_c", NAN, ["'system.gpu_temp_c'", "finite"]),
    ("throttled-2^32", "health", "system.throttled", 2**32, ["'system.throttled'"]),
    ("memory-2^63", "health", "system.mem_total_bytes", 2**63, ["'system.mem_total_bytes'"]),
    ("load-1e9", "health", "system.load_1m", 1e9, ["'system.load_1m'"]),
    ("flags-long", "health", "system.throttled_flags", ["x" * 65], ["throttled_flags.0"]),
    ("flags-many", "health", "system.throttled_flags", ["x"] * 33, ["'system.throttled_flags'"]),
    ("health-version-long", "health", "agent_version", "v" * 129, ["'agent_version'", "128"]),
    # events
    ("event-ts-inf", "events", "ts", INF, ["'ts'", "finite"]),
    ("event-data-nan", "events", "data.ratio", NAN, ["'data.ratio'", "finite"]),
    ("event-data-inf", "events", "data.ratio", -INF, ["'data.ratio'", "finite"]),
    ("event-data-2^53", "events", "data.n", 2**53, ["'data.n'", "2**53"]),
    ("event-data-list", "events", "data.n", [1, 2], ["'data.n'", "list"]),
    ("event-data-object", "events", "data.n", {"a": 1}, ["'data.n'", "dict"]),
    ("event-data-long", "events", "data.why", "x" * 1025, ["'data.why'", "1024"]),
    ("event-data-many", "events", "data", {f"k{i}": i for i in range(65)}, ["'data'", "64"]),
    ("event-data-key", "events", "data", {"k" * 65: 1}, ["'data."]),
    ("event-message-long", "events", "message", "x" * 1025, ["'message'", "1024"]),
    ("event-message-nul", "events", "message", "a\x00b", ["'message'", "NUL"]),
    # drift
    ("drift-frames", "drift", "frames", 2**40, ["'frames'"]),
    ("drift-detections", "drift", "detections", 2**60, ["'detections'"]),
    ("drift-hist-2^60", "drift", "confidence_hist.3", 2**60, ["'confidence_hist.3'"]),
    ("drift-hist-negative", "drift", "detections_hist.0", -1, ["'detections_hist.0'"]),
    ("drift-hist-true", "drift", "detections_hist.0", True, ["'detections_hist.0'"]),
    ("drift-per-frame", "drift", "detections_per_frame", 1e6, ["'detections_per_frame'"]),
    ("drift-latency-inf", "drift", "latency_ms_p99", INF, ["'latency_ms_p99'", "finite"]),
    ("drift-latency-big", "drift", "latency_ms_p50", 1e12, ["'latency_ms_p50'"]),
    ("drift-blur", "drift", "blur", 1e12, ["'blur'"]),
    ("drift-area-nan", "drift", "mean_box_area", NAN, ["'mean_box_area'", "finite"]),
    ("drift-mix-true", "drift", "class_mix.person", True, ["'class_mix.person'"]),
    ("drift-mix-many", "drift", "class_mix", {f"c{i}": 1 for i in range(65)}, ["'class_mix'"]),
    ("drift-window", "drift", "end", T + WINDOW + 1, ["'end'", "longer"]),
    ("drift-model-long", "drift", "model", "m" * 256, ["'model'", "255"]),
    # reported
    ("reported-ts-inf", "reported", "ts", INF, ["'ts'", "finite"]),
    ("reported-desired", "reported", "desired_version", 2**53, ["'desired_version'"]),
    ("reported-version", "reported", "cameras.0.version", 2**31, ["'cameras.0.version'"]),
    ("reported-update-ts", "reported", "cameras.0.update_ts", 1e20, ["'cameras.0.update_ts'"]),
    ("reported-file-long", "reported", "cameras.0.file", "f" * 256, ["'cameras.0.file'"]),
    # status
    ("status-ts-nan", "status", "ts", NAN, ["'ts'", "finite"]),
    ("status-ts-true", "status", "ts", True, ["'ts'"]),
    ("status-version-long", "status", "agent_version", "v" * 129, ["'agent_version'"]),
    # desired (registry -> device)
    ("desired-version", "desired", "version", 2**53, ["'version'"]),
    ("desired-model-version", "desired", "models.front.version", 2**31, ["'models.front.version'"]),
    ("desired-url-long", "desired", "models.front.url", "u" * 2049, ["'models.front.url'"]),
    # ack (registry -> device)
    ("ack-counts-2^53", "ack", "counts", 2**53, ["'counts'"]),
    ("ack-counts-true", "ack", "counts", True, ["'counts'", "integer"]),
    ("ack-below", "ack", "counts_max", 40, ["'counts_max'", "below counts 41"]),
    ("ack-ts-nan", "ack", "ts", NAN, ["'ts'", "finite"]),
]


@pytest.mark.parametrize(
    ("kind", "path", "value", "words"),
    [case[1:] for case in ABSURD],
    ids=[case[0] for case in ABSURD],
)
def test_absurd_values_are_refused_naming_the_field(kind, path, value, words):
    reason = refused(kind, changed(kind, path, value))
    for word in words:
        assert word in reason, f"{word!r} not in {reason!r}"


# id, kind, field path, value: accepted (the largest or smallest allowed)
BOUNDARY = [
    ("in-max", "counts", "lines.0.in", c.MAX_COUNT),
    ("in-zero", "counts", "lines.0.in", 0),
    ("seq-max", "counts", "seq", c.MAX_SEQ),
    ("window-day", "counts", "end", T + WINDOW),
    ("window-empty", "counts", "end", T),
    ("start-int", "counts", "start", int(T)),
    ("dwell-max", "counts", "zones.0.dwell_s_sum", c.MAX_DWELL_S_SUM),
    ("dwell-int", "counts", "zones.0.dwell_s_sum", 61),
    ("speed-max", "counts", "speeds.0.max_kmh", c.MAX_SPEED_KMH),
    ("class-64", "counts", "lines.0.class", "x" * 64),
    ("class-unicode", "counts", "lines.0.class", "personne âgée"),
    ("uptime-max", "health", "uptime_s", c.MAX_UPTIME_S),
    ("frames-max", "health", "cameras.0.frames", c.MAX_TOTAL),
    ("cpu-100", "health", "system.cpu_percent", 100),
    ("temp-min", "health", "system.soc_temp_c", c.MIN_TEMP_C),
    ("throttled-max", "health", "system.throttled", 2**32 - 1),
    ("version-128", "health", "agent_version", "v" * 128),
    ("error-long", "health", "cameras.0.error", "e" * 20_000),
    ("data-max-int", "events", "data.n", c.MAX_SAFE_INT),
    ("data-min-int", "events", "data.n", -c.MAX_SAFE_INT),
    ("data-1024", "events", "data.why", "x" * 1024),
    ("data-64-keys", "events", "data", {f"k{i}": i for i in range(64)}),
    ("drift-frames-max", "drift", "frames", c.MAX_WINDOW_FRAMES),
    ("drift-hist-max", "drift", "confidence_hist.9", c.MAX_WINDOW_DETECTIONS),
    ("drift-window-day", "drift", "end", T + WINDOW),
    ("reported-version", "reported", "cameras.0.version", c.MAX_MODEL_VERSION),
    ("ack-max", "ack", "counts_max", c.MAX_SEQ),
]


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [case[1:] for case in BOUNDARY],
    ids=[case[0] for case in BOUNDARY],
)
def test_boundary_values_are_accepted(kind, path, value):
    parse_payload(kind, changed(kind, path, value), device="cam-1", now=NOW)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"schema": 1, "device": "cam-1", "seq": 1, "start": NaN, "end": 1}', ["'start'"]),
        (b'{"schema": 1, "device": "cam-1", "seq": 1, "start": 1, "end": Infinity}', ["'end'"]),
        (b'{"schema": 1, "device": "cam-1", "seq": 1, "start": 1, "end": 1e400}', ["'end'"]),
        (b'{"schema": true, "device": "cam-1", "seq": 1, "start": 1, "end": 2}', ["'schema'"]),
        (b'{"device": "cam-1", "seq": 1, "start": 1, "end": 2}', ["'schema'", "missing"]),
        (b'{"schema": 1, "device": "cam-1", "seq": 1, "start": 1, "end": 2} x', ["not JSON"]),
    ],
    ids=["nan-token", "infinity-token", "overflowing-literal", "schema-true", "no-schema", "tail"],
)
def test_raw_json_tokens(raw, words):
    reason = refused("counts", raw, now=None)
    for word in words:
        assert word in reason, f"{word!r} not in {reason!r}"


# -- the receive-time window -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field", "offset", "ok"),
    [
        ("counts", "end", c.MAX_CLOCK_AHEAD_S, True),
        ("counts", "end", c.MAX_CLOCK_AHEAD_S + 1, False),
        ("health", "ts", c.MAX_CLOCK_AHEAD_S + 1, False),
        ("health", "ts", -c.MAX_AGE_S, True),
        ("health", "ts", -c.MAX_AGE_S - 1, False),
        ("events", "ts", -c.MAX_AGE_S - 1, False),
        ("reported", "ts", c.MAX_CLOCK_AHEAD_S + 1, False),
        ("ack", "ts", c.MAX_CLOCK_AHEAD_S + 1, False),
        # a retained status may carry the ts of a connect years ago; never the future
        ("status", "ts", -c.MAX_AGE_S - 1, True),
        ("status", "ts", c.MAX_CLOCK_AHEAD_S + 1, False),
    ],
)
def test_timestamps_must_lie_near_the_receive_time(kind, field, offset, ok):
    body = valid_payload(kind, now=NOW)
    if kind == "counts":
        body["start"], body["end"] = NOW + offset - 60, NOW + offset
    else:
        body[field] = NOW + offset
    raw = json.dumps(body).encode()
    parse_payload(kind, raw, device="cam-1")  # without now: no receive-time check
    if ok:
        parse_payload(kind, raw, device="cam-1", now=NOW)
    else:
        reason = refused(kind, raw)
        assert f"'{field}'" in reason and "receive time" in reason, reason


def test_counts_start_too_old_names_start():
    body = valid_payload("counts", now=NOW)
    body["start"] = NOW - c.MAX_AGE_S - 10
    body["end"] = body["start"] + 60
    reason = refused("counts", json.dumps(body).encode())
    assert "'start'" in reason and "2 years" in reason


# -- payloads built in Python keep working -------------------------------------------------


def test_python_construction_converts_as_before():
    """The agent builds payloads with lists, ints for floats and numpy numbers."""
    b = CountBin(
        device="cam-1",
        seq=3,
        start=int(T),
        end=int(T) + 60,
        lines=[LineCount(camera="c", line="l", class_="person", in_=2, out=0)],
        zones=[ZoneCount(camera="c", zone="z", class_="car", entries=1, exits=1, peak_occupancy=1)],
    )
    assert isinstance(b.lines, tuple) and b.start == T
    assert parse_payload("counts", b.to_json(), device="cam-1", now=NOW) == b
    ev = Event(device="cam-1", seq=1, ts=T, type="x", data={"n": np.int64(3), "r": np.float64(2.5)})
    assert json.loads(ev.to_json())["data"] == {"n": 3, "r": 2.5}
    assert parse_payload("events", ev.to_json(), device="cam-1", now=NOW) == ev


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: CountBin(device="d", seq=1, start=T, end=INF), "end"),
        (lambda: LineCount(camera="c", line="l", class_="car", in_=c.MAX_COUNT + 1, out=0), "in"),
        (lambda: Event(device="d", seq=1, ts=T, type="x", data={"v": NAN}), "data.v"),
    ],
)
def test_python_construction_has_the_same_bounds(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_agent_drops_sensor_readings_the_contract_would_refuse(tmp_path):
    """A broken thermal zone must not cost the health beat its system figures."""
    from flowfleet.agent.system_stats import SystemStats

    sys_ = tmp_path / "sys"
    for i, (kind, milli) in enumerate([("cpu-thermal", "2147483647"), ("gpu-thermal", "-274000")]):
        zone = sys_ / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind)
        (zone / "temp").write_text(milli)
    s = SystemStats(tmp_path, proc=tmp_path / "noproc", sys=sys_, vcgencmd=None).sample()
    assert s.soc_temp_c is None and s.gpu_temp_c is None


def test_agent_speed_limit_config_is_within_the_contract():
    from pydantic import ValidationError

    from flowfleet.agent.speed import SpeedSpec

    homography = {
        "image": [[0, 0], [1, 0], [1, 1], [0, 1]],
        "ground": [[0, 0], [1, 0], [1, 1], [0, 1]],
    }
    with pytest.raises(ValidationError, match="max_kmh"):
        SpeedSpec(homography=homography, max_kmh=c.MAX_SPEED_KMH + 1)
