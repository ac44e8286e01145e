"""Test data factories: Detections for scripted object paths, and count bins."""

from __future__ import annotations

import time

import numpy as np

from flowfleet.agent.detections import Detections
from flowfleet.contract import CountBin, LineCount

NAMES = ("person", "bicycle", "car", "motorcycle", "bus", "truck")

# The first PERSON_CLIP_FRAMES frames of one-by-one-person-detection.mp4: two people
# walk up to the table (line "approach", in) and leave to the right ("leave", out),
# each entering and leaving the table zone. Delivery tests count this clip instead of
# the whole video (1,394 frames): a third of the detector time, the same kinds of
# crossings. Frames are PNG (lossless), so the detector sees exactly the video's
# decoded frames and the counts are those of the video's first 48 s.
PERSON_CLIP_FRAMES = 480
PERSON_CLIP_COUNTS = {
    ("table", "approach", "person"): (2, 0),
    ("table", "leave", "person"): (0, 2),
}


def box_at(x: float, y: float, w: float = 40, h: float = 80) -> list[float]:
    """A box whose bottom centre is at (x, y)."""
    return [x - w / 2, y - h, x + w / 2, y]


def dets(
    boxes: list[list[float]],
    *,
    ids: list[int] | None = None,
    classes: list[str] | None = None,
    scores: list[float] | None = None,
) -> Detections:
    n = len(boxes)
    classes = classes or ["person"] * n
    return Detections(
        np.array(boxes, np.float32).reshape(n, 4),
        np.array(scores or [0.9] * n, np.float32),
        np.array([NAMES.index(c) for c in classes], np.int32),
        None if ids is None else np.array(ids, np.int64),
        NAMES,
    )


def walk(points: list[tuple[float, float]], track_id: int = 1, cls: str = "person"):
    """One tracked Detections per point: the object's bottom centre follows the path."""
    return [dets([box_at(x, y)], ids=[track_id], classes=[cls]) for x, y in points]


# Bins sit a day in the past: recent enough for the registry's receive-time bounds,
# fixed for the whole test session so a re-sent bin has the same content.
BIN_BASE = float((int(time.time()) // 86400 - 1) * 86400)


def count_bin(device: str = "cam-1", seq: int = 1, *, in_: int | None = None) -> CountBin:
    """A one-minute count bin with one line row whose counts follow from ``seq``."""
    start = BIN_BASE + 60 * seq
    row = LineCount(
        camera="front",
        line="door",
        class_="person",
        in_=seq % 3 + 1 if in_ is None else in_,
        out=seq % 2,
    )
    return CountBin(device=device, seq=seq, start=start, end=start + 60, lines=(row,))


# -- wire payloads ---------------------------------------------------------------------


def hardware(**changes) -> dict:
    """The ``hardware`` of an online status (a Raspberry Pi 5 with LiteRT), changed by
    keyword (None removes a field: "not known")."""
    body = {
        "board": "Raspberry Pi 5 Model B Rev 1.0",
        "board_id": "rpi5",
        "arch": "aarch64",
        "accelerators": [],
        "os": "Debian GNU/Linux 12 (bookworm)",
        "kernel": "6.6.31+rpt-rpi-2712",
        "python": "3.11.2",
        "runtimes": {"tflite": "ai-edge-litert 1.2.0"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def valid_payload(kind: str, device: str = "cam-1", seq: int = 1, now: float | None = None):
    """A valid JSON object (a dict) of each payload kind, every optional part present,
    its timestamps just before ``now`` (default: the current time)."""
    import time

    t = float(int(time.time() if now is None else now)) - 600.0
    common = {"schema": 1, "kind": kind, "device": device}
    if kind == "counts":
        return {
            **common,
            "seq": seq,
            "start": t,
            "end": t + 60,
            "lines": [
                {"camera": "front", "line": "door", "class": "person", "in": 7, "out": 5},
                {"camera": "front", "line": "door", "class": "car", "in": 1, "out": 0},
            ],
            "zones": [
                {
                    "camera": "front",
                    "zone": "queue",
                    "class": "person",
                    "entries": 4,
                    "exits": 3,
                    "peak_occupancy": 2,
                    "dwell_s_sum": 61.5,
                    "dwell_n": 3,
                }
            ],
            "speeds": [
                {
                    "camera": "front",
                    "line": "door",
                    "class": "car",
                    "n": 2,
                    "mean_kmh": 31.5,
                    "p85_kmh": 40.0,
                    "max_kmh": 41.2,
                    "insufficient": 1,
                }
            ],
        }
    if kind == "health":
        return {
            **common,
            "seq": seq,
            "ts": t,
            "uptime_s": 512.4,
            "outbox_depth": 0,
            "outbox_dropped": 0,
            "cameras": [
                {
                    "camera": "front",
                    "state": "running",
                    "fps": 9.8,
                    "inference_ms": 14.2,
                    "frames": 5021,
                    "dropped_frames": 0,
                    "model": "yolov8n_full_integer_quant.tflite",
                    "error": None,
                    "restarts": 0,
                    "inference_p95_ms": 17.9,
                }
            ],
            "system": {
                "load_1m": 0.61,
                "cpu_percent": 23.5,
                "cpu_count": 4,
                "mem_total_bytes": 4124413952,
                "mem_available_bytes": 3012345856,
                "process_rss_bytes": 187260928,
                "disk_free_bytes": 21474836480,
                "disk_total_bytes": 31268536320,
                "soc_temp_c": 52.1,
                "throttled": 0,
                "throttled_flags": [],
                "gpu_percent": 10.0,
                "gpu_temp_c": 48.0,
            },
            "agent_version": "0.1.0",
        }
    if kind == "events":
        return {
            **common,
            "seq": seq,
            "ts": t,
            "type": "outbox_dropped",
            "severity": "warning",
            "camera": "front",
            "message": "outbox cap dropped 40 health message(s)",
            "data": {"stream": "health", "n": 40, "ratio": 0.5, "final": True, "why": None},
        }
    if kind == "drift":
        return {
            **common,
            "seq": seq,
            "camera": "front",
            "model": "yolov8n_full_integer_quant.tflite",
            "start": t,
            "end": t + 300,
            "frames": 2990,
            "detections": 4123,
            "confidence_hist": [0, 310, 402, 388, 371, 420, 612, 801, 690, 129],
            "detections_per_frame": 1.3789,
            "detections_hist": [812, 1020, 640, 401, 117, 0, 0],
            "class_mix": {"person": 3900, "bicycle": 223},
            "mean_box_area": 0.0312,
            "latency_ms_p50": 13.8,
            "latency_ms_p90": 15.2,
            "latency_ms_p99": 21.7,
            "brightness": 112.4,
            "blur": 811.9,
        }
    if kind == "reported":
        return {
            **common,
            "ts": t,
            "desired_version": 3,
            "cameras": [
                {
                    "camera": "front",
                    "model": "yolov8n-int8",
                    "version": 2,
                    "sha256": "ab" * 32,
                    "file": "yolov8n-int8-v2.tflite",
                    "update": "activated",
                    "update_model": "yolov8n-int8",
                    "update_version": 2,
                    "reason": "pending: no frame yet",
                    "update_ts": t - 1,
                }
            ],
        }
    if kind == "status":
        return {
            **common,
            "state": "online",
            "ts": t,
            "agent_version": "0.1.0",
            "hardware": hardware(),
            "cameras": [
                {
                    "camera": "front",
                    "lines": [{"name": "door", "points": [[100, 400], [540, 400]]}],
                    "zones": [{"name": "hall", "points": [[0, 0], [320, 0], [320, 240]]}],
                    "speed": False,
                }
            ],
        }
    if kind == "desired":
        return {
            **common,
            "version": 3,
            "models": {
                "front": {
                    "name": "yolov8n-int8",
                    "version": 2,
                    "sha256": "ab" * 32,
                    "url": "/api/models/yolov8n-int8/versions/2/artifact",
                    "manifest": "eyJjcmVhdGVkX2F0Ijo=",
                    "signature": "kP3==",
                    "key_id": "9ceac40cbbe7a3ee",
                }
            },
        }
    if kind == "ack":
        return {**common, "ts": t, "counts": 41, "counts_max": 42}
    if kind == "shadow":
        return shadow_window(device, seq, t)
    raise ValueError(f"no factory for payload kind {kind!r}")


def shadow_window(
    device: str = "cam-1",
    seq: int = 1,
    start: float = 0.0,
    *,
    camera: str = "front",
    candidate: str = "yolov8n-dyn",
    boxes=(120, 110),
    matched: int = 100,
    **changes,
) -> dict:
    """A valid shadow-comparison window (a dict), every optional part present."""
    a, c = boxes
    return {
        "schema": 1,
        "kind": "shadow",
        "device": device,
        "seq": seq,
        "camera": camera,
        "start": start,
        "end": start + 60,
        "active": {
            "file": "yolov8n-int8-v2-0123456789ab.tflite",
            "model": "yolov8n-int8",
            "version": 2,
            "sha256": "ab" * 32,
        },
        "candidate": {
            "file": f"{candidate}-v3-0123456789ab.tflite",
            "model": candidate,
            "version": 3,
            "sha256": "cd" * 32,
        },
        "share": 0.25,
        "frames": 600,
        "frames_compared": 150,
        "lines": [
            {
                "line": "door",
                "class": "person",
                "active_in": 7,
                "active_out": 5,
                "candidate_in": 6,
                "candidate_out": 5,
            }
        ],
        "detections_per_frame_active": round(a / 150, 4),
        "detections_per_frame_candidate": round(c / 150, 4),
        "boxes_active": a,
        "boxes_candidate": c,
        "matched": matched,
        "agreement": None if a + c == 0 else round(2 * matched / (a + c), 4),
        "latency_ms_active": 14.1,
        "latency_ms_candidate": 21.9,
        "candidate_drift": {
            "frames": 150,
            "detections": c,
            "confidence_hist": [0, 0, 0, 0, 0, 0, 0, c, 0, 0],
            "class_mix": {"person": c} if c else {},
        },
        **changes,
    }


def secured_broker_config(
    tmp_path, passwords: dict[str, str], *, mtls: bool = True, plain: bool = True
):
    """The generated secured broker config: a fleet CA under ``tmp_path/pki`` with the
    broker's server certificate, a password file and the generated ACL, and a TLS
    listener on a free port (mutual TLS with the CN as username when ``mtls``).
    Returns (BrokerSecurity, the CA); issue client certificates with `pki.issue`."""
    from flowfleet.provisioning.mosquitto import (
        BrokerSecurity,
        free_port,
        render_acl,
        write_password_file,
    )
    from flowfleet.provisioning.pki import issue, make_ca

    pki = tmp_path / "pki"
    ca = make_ca(pki)
    server = issue(ca, "broker", pki, server=True, hosts=("127.0.0.1", "localhost"))
    acl = tmp_path / "acl"
    acl.write_text(render_acl())
    security = BrokerSecurity(
        password_file=write_password_file(tmp_path / "passwd", passwords),
        acl_file=acl,
        tls_port=free_port(),
        cafile=ca.cert,
        certfile=server.cert,
        keyfile=server.key,
        require_certificate=mtls,
        use_identity_as_username=mtls,
        plain=plain,
    )
    return security, ca


def drift_stats_window(
    *,
    detections: int,
    frames: int,
    hist: tuple[int, ...] = (0, 0, 0, 0, 0, 10, 20, 40, 20, 10),
    mix: dict[str, int] | None = None,
    latency: float = 10.0,
    brightness: float = 120.0,
    blur: float = 1000.0,
):
    """A `drift_stats.WindowStats`: ``hist``'s shape scaled to ``detections``; class
    mix 80% person, 20% car unless ``mix`` is given."""
    from flowfleet.registry.fleet.drift_stats import WindowStats

    total = sum(hist)
    counts = [round(h * detections / total) for h in hist] if total else list(hist)
    counts[max(range(len(counts)), key=lambda i: counts[i])] += detections - sum(counts)
    if mix is None:
        mix = {"person": detections - detections // 5, "car": detections // 5}
    return WindowStats(
        frames=frames,
        detections=detections,
        confidence_hist=tuple(counts),
        class_mix=mix,
        latency_p50=latency,
        latency_p90=latency * 1.5,
        brightness=brightness,
        blur=blur,
    )
