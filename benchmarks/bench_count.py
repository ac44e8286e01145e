"""End-to-end `flowfleet count` rate vs the raw model invoke rate, interleaved.

The two are measured in turn on one interpreter, in short alternating blocks, so
whatever else this shared machine is doing hits both alike:

- `count_video` (the code behind `flowfleet count`: decode on its reader thread,
  letterbox, inference, decode, NMS, appearance histograms, tracking, counting)
  counts the whole video with its defaults;
- after every ``--chunk`` frames it is paused (its `between_frames` hook, whose time
  `count_video` leaves out of its own timing) and the same interpreter runs
  ``--chunk`` raw invokes (`Detector.invoke_raw()`: the model alone, on the input
  of the frame just counted).

So both see the same model, interpreter, thread pool and threads, the same process
and, within a fraction of a second, the same machine load. Each pair (a block of
counted frames, the block of raw invokes after it) gives one ratio; the table
reports their median with the quartiles, and the pooled ratio (all raw time over all
counting time). The first frame of a pass (the reader opening the file, the
interpreter's slower first run) is left out of the blocks and reported apart, and
`ratio incl. start` counts it in, as a user timing a whole command would see it.
Short clips are counted again until ``--seconds`` of counting have been timed.
`cpu ms/frame` is the process's CPU time (every thread) per frame in each kind of
block: a measure of the work that does not depend on the wall clock.

    .venv/bin/python benchmarks/bench_count.py [--threads 2] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flowfleet.agent.config import parse_line
from flowfleet.agent.offline import count_video
from flowfleet.data import models_dir, videos_dir

VIDEOS = {
    "one-by-one-person-detection.mp4": ["approach:768,415,0,415", "leave:620,300,620,432"],
    "car-detection.mp4": ["midline:0,216,768,216"],
    "traffic_frames.mp4": ["gantry:480,280,480,540"],
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Interleave:
    """The `between_frames` hook: times blocks of ``chunk`` counted frames (wall and
    process CPU) and after each runs ``chunk`` raw invokes on the same interpreter;
    stops the pass once ``seconds`` of counting blocks were timed."""

    def __init__(self, chunk: int, seconds: float) -> None:
        self.chunk, self.seconds = chunk, seconds
        self.stopped = False
        self.pipe: list[float] = []  # wall seconds per block of counted frames
        self.raw: list[float] = []  # wall seconds per block of raw invokes
        self.pipe_cpu: list[float] = []
        self.raw_cpu: list[float] = []
        self._mark = self._cpu_mark = 0.0

    def __call__(self, pipeline, frames: int) -> bool:
        if frames == 1:  # the pass's start-up is not a steady block
            self._mark, self._cpu_mark = time.perf_counter(), _cpu()
            return False
        if (frames - 1) % self.chunk:
            return False
        self.pipe.append(time.perf_counter() - self._mark)
        self.pipe_cpu.append(_cpu() - self._cpu_mark)
        c0, t0 = _cpu(), time.perf_counter()
        for _ in range(self.chunk):
            pipeline.detector.invoke_raw()
        self.raw.append(time.perf_counter() - t0)
        self.raw_cpu.append(_cpu() - c0)
        self._mark, self._cpu_mark = time.perf_counter(), _cpu()
        self.stopped = sum(self.pipe) >= self.seconds
        return self.stopped


def measure(video: Path, model: Path, threads: int, lines, chunk: int, seconds: float, bar):
    """Count ``video`` with raw blocks interleaved, again while less than ``seconds``
    of counting blocks were timed (a long video's pass stops there); one result row.
    Line totals are those of the last whole pass (None if every pass was cut)."""
    hook = Interleave(chunk, seconds)
    firsts, incl_frames, incl_s, report, passes = [], 0, 0.0, None, 0
    totals, whole = None, None
    while not hook.stopped:
        n_before = len(hook.pipe)
        report = count_video(
            video, model, lines=lines, threads=threads, progress=False, between_frames=hook
        )
        passes += 1
        firsts.append(report.first_frame_s)
        # Whole-pass timing: the first frame plus the pass's complete blocks (a tail
        # shorter than a block is counted but not timed against raw invokes).
        blocks = hook.pipe[n_before:]
        incl_frames += 1 + chunk * len(blocks)
        incl_s += report.first_frame_s + sum(blocks)
        bar.update(1)
        if not hook.stopped:
            totals = {k: v["total"] for k, v in report.to_dict()["lines"].items()}
            whole = report.frames
        if len(hook.pipe) == n_before:
            raise SystemExit(f"{video.name}: fewer than {chunk + 1} frames; use a smaller --chunk")
    pairs = np.array(hook.raw) / np.array(hook.pipe)  # count fps / raw invokes per s, per pair
    raw_rate = chunk * len(hook.raw) / sum(hook.raw)
    count_rate = chunk * len(hook.pipe) / sum(hook.pipe)
    incl_rate = incl_frames / incl_s
    q1, med, q3 = np.percentile(pairs, [25, 50, 75])
    return {
        "video": video.name,
        "frames": whole,
        "frames_timed": chunk * len(pairs),
        "passes": passes,
        "pairs": len(pairs),
        "raw_invoke_fps": round(raw_rate, 1),
        "count_fps": round(count_rate, 1),
        "ratio_median": round(float(med), 3),
        "ratio_q1": round(float(q1), 3),
        "ratio_q3": round(float(q3), 3),
        "ratio_min": round(float(pairs.min()), 3),
        "ratio_max": round(float(pairs.max()), 3),
        "ratio_pooled": round(count_rate / raw_rate, 3),
        "first_frame_ms": round(1000 * statistics.median(firsts), 1),
        "ratio_incl_start": round(incl_rate / raw_rate, 3),
        "raw_cpu_ms_per_frame": round(1000 * sum(hook.raw_cpu) / (chunk * len(hook.raw)), 2),
        "count_cpu_ms_per_frame": round(1000 * sum(hook.pipe_cpu) / (chunk * len(hook.pipe)), 2),
        "totals": totals,
        "thresholds": report.thresholds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=models_dir() / "yolov8n_full_integer_quant.tflite"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=10, help="frames (and raw invokes) per block")
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="least counting time timed per video"
    )
    ap.add_argument("--videos", nargs="*", default=list(VIDEOS), help="a subset of the videos")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/count.json"))
    args = ap.parse_args(argv)

    load0 = os.getloadavg()
    results = []
    bar = tqdm(desc="bench", unit="pass", file=sys.stderr)
    for name in args.videos:
        lines = [parse_line(s) for s in VIDEOS[name]]
        results.append(
            measure(
                videos_dir() / name, args.model, args.threads, lines, args.chunk, args.seconds, bar
            )
        )
    bar.close()
    load1 = os.getloadavg()

    print(
        f"\nmodel {args.model.name}, {args.threads} threads, blocks of {args.chunk} frames; "
        f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end\n"
    )
    print(
        f"{'video':<34} {'timed':>6} {'pairs':>5} {'raw invoke/s':>12} {'count fps':>9} "
        f"{'ratio (q1-q3)':>19} {'pooled':>6} {'first ms':>8} {'incl. start':>11} "
        f"{'cpu ms/frame raw, count':>23}"
    )
    for r in results:
        spread = f"{r['ratio_median']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
        cpu = f"{r['raw_cpu_ms_per_frame']:.1f}, {r['count_cpu_ms_per_frame']:.1f}"
        print(
            f"{r['video']:<34} {r['frames_timed']:>6} {r['pairs']:>5} {r['raw_invoke_fps']:>12.1f} "
            f"{r['count_fps']:>9.1f} {spread:>19} {r['ratio_pooled']:>6.2f} "
            f"{r['first_frame_ms']:>8.1f} {r['ratio_incl_start']:>11.2f} {cpu:>23}"
        )
    for r in results:
        print(f"totals {r['video']}: {r['totals']}")
    out = {
        "benchmark": "count_vs_raw_invoke_interleaved",
        "model": args.model.name,
        "threads": args.threads,
        "chunk": args.chunk,
        "seconds": args.seconds,
        "load_average": [round(load0[0], 2), round(load1[0], 2)],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
