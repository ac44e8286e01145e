"""Shadow mode's CPU cost per share of frames, side by side with the pipeline without it.

For each sample video and share (0 = no candidate, the baseline), the camera's
active pipeline (the full-integer int8 YOLOv8n) runs on every frame and the candidate
(default: the dynamic-range YOLOv8n, a realistic candidate of the same architecture)
beside it on every round(1/share)-th frame, through its own tracker and counters
(`flowfleet.agent.shadow_offline.compare_video`, the agent's own `ShadowRunner`).
What is measured is the process's CPU time over the frames (decoding, both models,
tracking, counting, matching), per frame. Shares are run in a rotated order each
round so load from other processes hits all of them alike; each share's figure is
the median over rounds of its ratio to the baseline of the same round.

The fitted slope k (median of (ratio - 1) / share over the shares > 0) gives the
share at which CPU rises by 30%: 0.3 / k.

    .venv/bin/python benchmarks/bench_shadow.py [--frames 100] [--rounds 3] \\
        [--shares 0,0.1,0.25,0.5,1] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from flowfleet.agent.config import CameraConfig
from flowfleet.agent.shadow_offline import compare_video
from flowfleet.data import models_dir, videos_dir

VIDEOS = {
    "car-detection.mp4": [{"name": "midline", "points": [[0, 216], [768, 216]]}],
    "one-by-one-person-detection.mp4": [
        {"name": "approach", "points": [[768, 415], [0, 415]]},
        {"name": "leave", "points": [[620, 300], [620, 432]]},
    ],
}
TARGET_RISE = 0.30  # the budget: CPU use up by at most about 30%


def run(video: str, shares: list[float], args) -> dict:
    cam = CameraConfig(
        name="cam",
        source=str(videos_dir() / video),
        model=str(args.model),
        lines=VIDEOS[video],
        threads=args.threads,
    )
    per_round: list[dict[float, float]] = []
    agreement: dict[float, float | None] = {}
    for r in range(args.rounds):
        order = shares[r % len(shares) :] + shares[: r % len(shares)]
        cpu: dict[float, float] = {}
        for share in order:
            out = compare_video(cam, args.candidate, share=share, max_frames=args.frames)
            cpu[share] = out.cpu_s / out.frames
            if out.window is not None:
                agreement[share] = out.window.agreement
            print(
                f"  {video} round {r + 1} share {share:g}: {1000 * cpu[share]:.1f} ms CPU/frame",
                file=sys.stderr,
            )
        per_round.append(cpu)
    rows = []
    for share in shares:
        ratios = [c[share] / c[0.0] for c in per_round]
        rows.append(
            {
                "share": share,
                "cpu_ms_per_frame": round(1000 * statistics.median(c[share] for c in per_round), 2),
                "ratio": round(statistics.median(ratios), 3),
                "ratios": [round(x, 3) for x in ratios],
                "agreement": agreement.get(share),
            }
        )
    slopes = [(row["ratio"] - 1) / row["share"] for row in rows if row["share"] > 0]
    k = statistics.median(slopes) if slopes else None
    return {
        "video": video,
        "frames": args.frames,
        "rows": rows,
        "slope": None if k is None else round(k, 3),
        "share_for_30pct": None if not k or k <= 0 else round(min(1.0, TARGET_RISE / k), 3),
    }


def _shown(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=models_dir() / "yolov8n_full_integer_quant.tflite"
    )
    ap.add_argument("--candidate", type=Path, default=models_dir() / "yolov8n_int8_dynamic.tflite")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shares", default="0,0.1,0.25,0.5,1")
    ap.add_argument("--videos", default=",".join(VIDEOS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    shares = sorted({0.0, *(float(s) for s in args.shares.split(","))})
    results = [run(v, shares, args) for v in args.videos.split(",")]
    print(f"candidate {args.candidate.name} beside {args.model.name}, {args.threads} thread(s)")
    print("| video | share | CPU ms/frame | ratio to no shadow (rounds) | agreement |")
    print("|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            rounds = ", ".join(f"{x:.2f}" for x in row["ratios"])
            print(
                f"| {res['video']} | {row['share']:g} | {row['cpu_ms_per_frame']:.1f} | "
                f"{row['ratio']:.2f} ({rounds}) | {_shown(row['agreement'])} |"
            )
        print(
            f"| {res['video']} | slope k {res['slope']}, "
            f"share for +30%: {res['share_for_30pct']} | | | |"
        )
    if args.json:
        doc = {
            "machine": platform.platform(),
            "python": platform.python_version(),
            "model": args.model.name,
            "candidate": args.candidate.name,
            "threads": args.threads,
            "rounds": args.rounds,
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
