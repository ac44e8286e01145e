"""Peak resident memory of `flowfleet count` and of a running `flowfleet agent`.

For each runtime's default model (the catalog's TFLite default and its ONNX model)
and each sample video, with the defaults (appearance on, thresholds that set
themselves):

- `flowfleet count VIDEO --line ... --json` as a child process, to the end of the
  video or for at most ``--count-seconds`` (then interrupted; the row says so);
- `flowfleet agent --config agent.toml` with that video as its one camera (looping,
  in real time, drift summaries on) against a private Mosquitto, for
  ``--agent-seconds``, then SIGTERM.

Peak RSS is the kernel's high-water mark: ``ru_maxrss`` from ``wait4`` on the child
(every page it ever had resident, threads included); ``VmRSS`` is sampled every
0.2 s meanwhile and its last value reported, to show whether memory was still
growing. Memory does not depend on the machine's load, so one run is enough.

    .venv/bin/python benchmarks/bench_memory.py [--agent-seconds 30] [--count-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowfleet.data import models_dir, videos_dir
from flowfleet.provisioning.mosquitto import Broker

MODELS = {"tflite": "yolov8n_full_integer_quant.tflite", "onnx": "yolov8n_int8.onnx"}
# video -> (line specs for `flowfleet count`, classes)
VIDEOS = {
    "one-by-one-person-detection.mp4": (
        ["approach:768,415,0,415", "leave:620,300,620,432"],
        None,
    ),
    "car-detection.mp4": (["midline:0,216,768,216"], "all"),
    "traffic_frames.mp4": (["gantry:480,280,480,540"], None),
    "pets09-s2l1.avi": (["centre:420,120,420,560"], "person"),
}


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def watch(proc: subprocess.Popen, limit_s: float, stop_signal: int) -> dict:
    """Sample the child's VmRSS until it exits or ``limit_s`` passes (then send
    ``stop_signal``); reap it with wait4 for its peak RSS."""
    t0 = time.monotonic()
    last_rss, interrupted = None, False
    # Popen.poll() would reap the child and leave wait4 nothing to report: look at
    # its state without reaping.
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        rss = _status_kb(proc.pid, "VmRSS")
        last_rss = rss if rss is not None else last_rss
        if time.monotonic() - t0 >= limit_s:
            interrupted = True
            proc.send_signal(stop_signal)
            break
        time.sleep(0.2)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "last_rss_mb": None if last_rss is None else round(last_rss / 1024, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "stopped_early": interrupted,
        "exit_code": proc.returncode,
    }


def run_count(model: Path, video: Path, lines: list[str], classes, limit_s: float) -> dict:
    cmd = [sys.executable, "-m", "flowfleet.cli", "count", str(video), "--model", str(model)]
    for spec in lines:
        cmd += ["--line", spec]
    if classes:
        cmd += ["--classes", classes]
    cmd += ["--json"]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        row = watch(proc, limit_s, signal.SIGINT)
        out.seek(0)
        if not row["stopped_early"] and row["exit_code"] == 0:
            report = json.loads(out.read())
            row["frames"] = report["frames"]
            row["totals"] = {k: v["total"] for k, v in report["lines"].items()}
    return row


def run_agent(
    broker: Broker, work: Path, model: Path, video: Path, lines, classes, seconds: float
) -> dict:
    state = work / f"state-{model.stem}-{video.stem}"
    conf = work / f"agent-{model.stem}-{video.stem}.toml"
    line_toml = ""
    for spec in lines:
        name, pts = spec.split(":")
        x1, y1, x2, y2 = pts.split(",")
        line_toml += f'[[cameras.lines]]\nname = "{name}"\npoints = [[{x1}, {y1}], [{x2}, {y2}]]\n'
    classes_toml = ""
    if classes == "all":
        classes_toml = 'classes = "all"\n'
    elif classes:
        classes_toml = f'classes = ["{classes}"]\n'
    conf.write_text(
        f"""device_id = "mem-bench"
state_dir = "{state}"
bin_seconds = 10
health_seconds = 5
drift_seconds = 10
[broker]
host = "{broker.host}"
port = {broker.port}
[[cameras]]
name = "cam"
source = "{video}"
model = "{model}"
loop = true
realtime = true
{classes_toml}{line_toml}"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowfleet.cli", "agent", "--config", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    row = watch(proc, seconds, signal.SIGTERM)
    row["stopped_early"] = not row["stopped_early"]  # an agent that exits by itself failed
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agent-seconds", type=float, default=30.0)
    ap.add_argument("--count-seconds", type=float, default=120.0)
    ap.add_argument("--runtimes", nargs="*", default=list(MODELS))
    ap.add_argument("--videos", nargs="*", default=list(VIDEOS))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/memory.json"))
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Broker(work / "broker") as broker:
            for runtime in args.runtimes:
                model = models_dir() / MODELS[runtime]
                for name in args.videos:
                    video = videos_dir() / name
                    lines, classes = VIDEOS[name]
                    for kind in ("count", "agent"):
                        print(f"{runtime} {name} {kind} ...", file=sys.stderr, flush=True)
                        if kind == "count":
                            row = run_count(model, video, lines, classes, args.count_seconds)
                        else:
                            row = run_agent(
                                broker, work, model, video, lines, classes, args.agent_seconds
                            )
                        rows.append(
                            {
                                "runtime": runtime,
                                "model": model.name,
                                "video": name,
                                "process": kind,
                                **row,
                            }
                        )

    print(
        f"\n{'runtime':<7} {'video':<34} {'process':<7} {'peak RSS MB':>11} "
        f"{'last RSS MB':>11} {'seconds':>7}  note"
    )
    for r in rows:
        note = []
        if r["process"] == "count":
            note.append(
                f"{r['frames']} frames, {r['totals']}"
                if "frames" in r
                else "interrupted before the end"
            )
        elif r["stopped_early"]:
            note.append(f"agent exited by itself ({r['exit_code']})")
        print(
            f"{r['runtime']:<7} {r['video']:<34} {r['process']:<7} {r['peak_rss_mb']:>11.1f} "
            f"{r['last_rss_mb'] or 0:>11.1f} {r['seconds']:>7.1f}  {'; '.join(note)}"
        )
    out = {
        "benchmark": "peak_rss",
        "agent_seconds": args.agent_seconds,
        "count_seconds": args.count_seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
