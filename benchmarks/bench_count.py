"""End-to-end `flowfleet count` rate vs the raw model invoke rate, side by side.

For each sample video: the raw rate is `Detector.invoke_raw()` in a tight loop
(interpreter only, after warm-up), the pipeline rate is `count_video` (decode,
letterbox, inference, decode, NMS, track, count) over the whole file. Both use the
same model and thread count and are measured alternately, several rounds, so load
from other processes on this shared machine hits both alike; the medians are
reported, with their ratio.

Each `count_video` pass has a one-off start: the reader thread opens the file and
decodes its first frame while the consumer waits, and the interpreter's first
`invoke()` is slower (the raw loop's 5 warm-up invokes are untimed). `count fps` is
the steady rate over frames 2..N (every one of them fully decoded, preprocessed,
inferred, decoded, NMS-ed, tracked and counted); the first frame's time is reported
as `first frame ms`, and `fps incl. start` / `ratio incl.` count it in, as a user
timing the whole command on a short clip would see it.

    .venv/bin/python benchmarks/bench_count.py [--threads 2] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from flowfleet.agent.config import parse_line
from flowfleet.agent.detectors import load_detector
from flowfleet.agent.offline import count_video
from flowfleet.data import models_dir, videos_dir

VIDEOS = {
    "one-by-one-person-detection.mp4": ["approach:768,415,0,415", "leave:620,300,620,432"],
    "car-detection.mp4": ["midline:0,216,768,216"],
    "traffic_frames.mp4": ["gantry:480,280,480,540"],
}
MIN_SECONDS = 3.0  # repeat short clips so each measurement lasts at least this long


def raw_rate(model: Path, threads: int, seconds: float) -> float:
    det = load_detector(model, threads=threads)
    for _ in range(5):
        det.invoke_raw()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        det.invoke_raw()
        n += 1
    rate = n / (time.perf_counter() - start)
    det.close()
    return rate


def pipeline_rate(
    video: Path, model: Path, threads: int, lines
) -> tuple[float, float, float, dict]:
    """(steady fps over frames 2..N, fps including the first frame, median first-frame
    seconds, report of the last pass)."""
    frames, elapsed, first, report = 0, 0.0, [], None
    while elapsed < MIN_SECONDS:
        report = count_video(video, model, lines=lines, threads=threads, progress=False)
        frames += report.frames
        elapsed += report.elapsed_s
        first.append(report.first_frame_s)
    steady = (frames - len(first)) / (elapsed - sum(first))
    return steady, frames / elapsed, statistics.median(first), report.to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=models_dir() / "yolov8n_full_integer_quant.tflite"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/count.json"))
    args = ap.parse_args(argv)

    results = []
    bar = tqdm(total=len(VIDEOS) * args.rounds, desc="bench", unit="round", file=sys.stderr)
    for name, line_specs in VIDEOS.items():
        video = videos_dir() / name
        lines = [parse_line(s) for s in line_specs]
        raws, pipes, incls, firsts, report = [], [], [], [], {}
        for _ in range(args.rounds):
            raws.append(raw_rate(args.model, args.threads, MIN_SECONDS))
            rate, incl, first, report = pipeline_rate(video, args.model, args.threads, lines)
            pipes.append(rate)
            incls.append(incl)
            firsts.append(first)
            bar.update(1)
        raw, pipe = statistics.median(raws), statistics.median(pipes)
        incl = statistics.median(incls)
        results.append(
            {
                "video": name,
                "frames": report["frames"],
                "raw_invoke_fps": round(raw, 1),
                "count_fps": round(pipe, 1),
                "ratio": round(pipe / raw, 3),
                "first_frame_ms": round(1000 * statistics.median(firsts), 1),
                "count_fps_incl_start": round(incl, 1),
                "ratio_incl_start": round(incl / raw, 3),
                "raw_rounds": [round(r, 1) for r in raws],
                "count_rounds": [round(r, 1) for r in pipes],
                "count_incl_start_rounds": [round(r, 1) for r in incls],
                "totals": {k: v["total"] for k, v in report["lines"].items()},
            }
        )
    bar.close()

    print(f"\nmodel {args.model.name}, {args.threads} threads, median of {args.rounds} rounds\n")
    print(
        f"{'video':<34} {'frames':>6} {'raw invoke/s':>13} {'count fps':>10} {'ratio':>6} "
        f"{'first frame ms':>15} {'fps incl. start':>16} {'ratio incl.':>12}"
    )
    for r in results:
        print(
            f"{r['video']:<34} {r['frames']:>6} {r['raw_invoke_fps']:>13.1f} "
            f"{r['count_fps']:>10.1f} {r['ratio']:>6.2f} {r['first_frame_ms']:>15.1f} "
            f"{r['count_fps_incl_start']:>16.1f} {r['ratio_incl_start']:>12.2f}"
        )
    for r in results:
        print(f"totals {r['video']}: {r['totals']}")
    out = {
        "benchmark": "count_vs_raw_invoke",
        "model": args.model.name,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
