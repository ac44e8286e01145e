"""Agent runtime figures: outbox drain rate, per-frame bookkeeping cost, idle CPU,
start to first published health beat.

    .venv/bin/python benchmarks/bench_agent_runtime.py [--messages 100000]

Writes benchmarks/results/agent_runtime.json. Needs mosquitto and the reference data
(the start-up and idle figures run a real agent on traffic_frames.mp4).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flowfleet.agent.outbox import Outbox, Position
from flowfleet.agent.publisher import Publisher
from flowfleet.agent.tally import Tally
from flowfleet.contract import CountBin, LineCount, Topics
from flowfleet.data import data_dir
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.mosquitto import Broker

T = Topics()


def sample_bin(seq: int) -> CountBin:
    return CountBin(
        device="bench",
        seq=seq,
        start=1795430400.0 + seq,
        end=1795430401.0 + seq,
        lines=tuple(
            LineCount(camera="door", line="entrance", class_=c, in_=seq % 7, out=seq % 3)
            for c in ("person", "bicycle", "car")
        ),
    )


def bench_drain(broker: Broker, workdir: Path, n: int, inflight: int, rate: float) -> dict:
    box = Outbox(workdir / f"drain-{inflight}.sqlite")
    payload = sample_bin(1).to_json()
    t0 = time.perf_counter()
    with box._lock:  # bulk fill: one transaction
        box._db.execute("BEGIN")
        box._db.executemany(
            "INSERT INTO outbox(stream, seq, topic, payload, created) VALUES(?,?,?,?,?)",
            [("counts", i, T.counts("bench"), payload, time.time()) for i in range(1, n + 1)],
        )
        box._db.execute("COMMIT")
        box._depth = {"counts": n}
    fill_s = time.perf_counter() - t0
    pub = Publisher(box, window=inflight, rate=rate)
    conn = MqttConnection(
        f"bench-{inflight}",
        BrokerAddress(broker.host, broker.port),
        max_inflight=inflight,
        on_connect=pub.on_connect,
    )
    pub.attach(conn)
    conn.start()
    assert conn.wait_connected(10)
    t0 = time.perf_counter()
    pub.start()
    while box.depth() > 0 and time.perf_counter() - t0 < 600:
        time.sleep(0.05)
    pub._flush_deletes()
    elapsed = time.perf_counter() - t0
    pub.stop()
    conn.stop()
    box.close()
    return {
        "messages": n,
        "inflight": inflight,
        "send_rate_limit": rate,
        "fill_s": round(fill_s, 2),
        "drain_s": round(elapsed, 2),
        "messages_per_s": round(n / elapsed),
        "bytes_each": len(payload),
    }


def bench_enqueue(workdir: Path, n: int = 200) -> dict:
    box = Outbox(workdir / "enqueue.sqlite")
    t0 = time.perf_counter()
    for _ in range(n):
        box.enqueue_bin(
            T.counts("bench"), sample_bin, positions={"door": Position("/v.mp4", 1, 100)}
        )
    per_bin = (time.perf_counter() - t0) / n
    box.close()
    # Per frame the camera thread takes the tally lock and records its position.
    lock, tally = threading.Lock(), Tally()
    t0 = time.perf_counter()
    for i in range(100_000):
        with lock:
            tally.note_occupancy("door", "queue", {})
            Position("/v.mp4", 1, i)
    per_frame = (time.perf_counter() - t0) / 100_000
    return {"enqueue_bin_ms": round(per_bin * 1000, 3), "per_frame_bookkeeping_us": per_frame * 1e6}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_agent(broker: Broker, workdir: Path, idle_s: float) -> dict:
    data = data_dir()
    state = workdir / "agent-state"
    conf = workdir / "agent.toml"
    conf.write_text(
        f"""
device_id = "bench-agent"
state_dir = "{state}"
bin_seconds = 60
health_seconds = 30
[broker]
host = "{broker.host}"
port = {broker.port}
[[cameras]]
name = "gantry"
source = "{data / "videos" / "traffic_frames.mp4"}"
model = "{data / "models" / "yolov8n_full_integer_quant.tflite"}"
realtime = false
[[cameras.lines]]
name = "gantry"
points = [[480, 280], [480, 540]]
"""
    )
    beats: list[tuple[float, bytes]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: beats.append((time.perf_counter(), m.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(T.health("bench-agent"), 1)
    sub.loop_start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not beats and time.perf_counter() - t0 < 60:
            time.sleep(0.01)
        first_beat_s = beats[0][0] - t0 if beats else None
        time.sleep(5)  # the 20-frame camera finishes; the agent idles
        c0, w0 = proc_cpu_s(proc.pid), time.perf_counter()
        time.sleep(idle_s)
        idle = (proc_cpu_s(proc.pid) - c0) / (time.perf_counter() - w0)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        sub.loop_stop()
        sub.disconnect()
    return {
        "start_to_first_beat_s": None if first_beat_s is None else round(first_beat_s, 2),
        "idle_cpu_share_of_one_core": round(idle, 4),
        "idle_measured_s": idle_s,
        "sigterm_exit_code": rc,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--out", default="benchmarks/results/agent_runtime.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Broker(work / "broker") as broker:
            result = {
                "drain_default": bench_drain(broker, work, args.messages, 20, 5000.0),
                "drain_unlimited": bench_drain(broker, work, args.messages, 100, 1e9),
                "enqueue": bench_enqueue(work),
                "agent": bench_agent(broker, work, args.idle_seconds),
            }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
