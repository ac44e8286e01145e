"""Score tracker settings on MOT15: line-count error, MOTA, IDF1, ID switches.

A tuning aid for the tracker and counter (a few seconds per configuration, no timing,
no peers): each configuration given as JSON runs our `ByteTracker` on the four MOT15
sequences with ground truth, its tracks are counted on the lines of
``bench_count_accuracy.py`` and on its held-out lines (``held_out_lines``: the same
lines moved across the walkways, which the defaults were not first tuned on) exactly
as that benchmark counts them (seeded with each new track's first box, as the agent
does), and ``motmetrics`` scores them as ``bench_tracker.py`` does. ``{}`` is the
agent's defaults. The keys are `TrackerConfig`'s, and ``lost_s`` / ``weak_birth_s``
as in an agent's ``[cameras.tracker]`` table. Use the two benchmarks for the
published tables.

    .venv/bin/python benchmarks/tune_tracker.py '{}' '{"high_thresh": 0.7}' \\
        '{"recover_iou": 0}' [--videos] [--json out.json]

MOT15's public detections are ACF's, whose scores are not a YOLO model's: a setting
that helps there can lose objects a YOLO model scores lower. ``--videos`` also counts
the sample videos on `SAMPLE_LINES` (the demo's lines when its results were taken),
each frame detected once with the YOLOv8n int8 TFLite model (about 30 s, with a
progress bar) and the tracker replayed per configuration, and marks every count that
differs from the defaults'.

The first run builds the benchmark virtual environment that holds motmetrics
(``bench_tracker.py``'s ``np1``, about a minute, with a progress bar).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_count_accuracy
import bench_tracker
import mot15
from tqdm import tqdm

from flowfleet.agent.counting import LineCounter, count_lines
from flowfleet.agent.detections import Detections
from flowfleet.agent.pipeline import build_pipeline
from flowfleet.agent.sources import VideoFileSource
from flowfleet.agent.tracker import ByteTracker, TrackerConfig
from flowfleet.data import models_dir, videos_dir

# The sample videos and lines (source pixels) --videos counts on: the demo's scenes
# when the results in docs/benchmarks.md were measured, kept here so they stay
# reproducible now that the demo shows the PETS09 plaza instead of the 20-frame clip.
SAMPLE_LINES: dict[str, tuple[tuple[str, tuple[tuple[float, float], tuple[float, float]]], ...]] = {
    "car-detection.mp4": (("midline", ((0, 216), (768, 216))),),
    "one-by-one-person-detection.mp4": (
        ("approach", ((768, 415), (0, 415))),
        ("leave", ((620, 300), (620, 432))),
    ),
    "traffic_frames.mp4": (("gantry", ((480, 280), (480, 540))),),
}

SAMPLE_MODEL = "yolov8n_full_integer_quant.tflite"


def parse_overrides(text: str) -> dict:
    """One configuration: a JSON object of `TrackerConfig` fields, or of the seconds
    an agent's ``[cameras.tracker]`` table takes instead of frames (``lost_s``,
    ``weak_birth_s``), checked here."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of overrides")
    try:
        TrackerConfig.for_fps(25, **value)
    except TypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return value


def parse_shifts(text: str) -> tuple[float, ...]:
    """``--shifts``: comma-separated non-zero fractions of the image width."""
    try:
        shifts = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers such as -0.06,0.06"
        ) from None
    if any(f == 0 or abs(f) >= 1 for f in shifts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: each shift must be a non-zero fraction of the image width (-1..1); "
            "0 is the benchmark's own line"
        )
    return shifts


def benchmark_lines(name: str) -> list:
    """The lines of ``bench_count_accuracy.py`` for one sequence."""
    return bench_count_accuracy.LINES[name]


def references(root: Path, lines_for=benchmark_lines) -> dict[str, dict]:
    """{sequence: {line: {"in": n, "out": n}}}: the ground truth's crossings of
    ``lines_for(sequence)``."""
    return {
        name: bench_count_accuracy.count(
            mot15.load_ground_truth(root, name), name, lines=lines_for(name)
        )
        for name in mot15.GT_SEQUENCES
    }


def count_errors(
    refs: dict[str, dict], track_dir: Path, lines_for=benchmark_lines
) -> dict[str, int]:
    """{sequence: count error} for the track and origin files in ``track_dir``,
    against ``refs`` (from `references` with the same ``lines_for``)."""
    errors = {}
    for name, reference in refs.items():
        frames = mot15.SEQUENCES[name].frames
        result = bench_count_accuracy.count(
            mot15.read_tracks(track_dir / f"{name}.txt", frames),
            name,
            mot15.read_tracks(track_dir / f"{name}.origins.txt", frames),
            lines_for(name),
        )
        errors[name] = bench_count_accuracy.errors(result, reference)[0]
    return errors


def crossings(refs: dict[str, dict]) -> int:
    """Every ground-truth crossing in ``refs``, all lines and both directions."""
    return sum(n for ref in refs.values() for line in ref.values() for n in line.values())


def detect_sample_videos(progress: bool = True) -> dict[str, tuple[float, list[Detections]]]:
    """{video: (fps, per-frame detections)} of the sample videos: YOLOv8n int8
    TFLite with the agent's default classes, every frame, as ``flowfleet count`` sees
    them before tracking."""
    model = models_dir() / SAMPLE_MODEL
    missing = [p for p in (model, *(videos_dir() / v for v in SAMPLE_LINES)) if not p.is_file()]
    if missing:
        raise SystemExit(
            f"--videos: missing {', '.join(map(str, missing))} (set FLOWFLEET_DATA to the "
            "folder holding models/ and videos/)"
        )
    detections = {}
    for video in SAMPLE_LINES:
        source = VideoFileSource(videos_dir() / video)
        pipeline = build_pipeline(video, model=str(model), fps=source.fps)
        frames = []
        with tqdm(
            total=source.frame_count,
            desc=video,
            unit="frame",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            for frame in source:
                frames.append(pipeline.class_filter.apply(pipeline.detector.detect(frame.image)))
                bar.update(1)
        pipeline.detector.close()
        detections[video] = (source.fps, frames)
    return detections


def count_sample_videos(
    detections: dict[str, tuple[float, list[Detections]]], overrides: dict
) -> dict[str, dict[str, dict[str, int]]]:
    """{video: {line: {"in": n, "out": n}}}: the tracker with ``overrides`` and the
    agent's line counters (seeded as the agent seeds them) on `detect_sample_videos`'s
    output, on `SAMPLE_LINES`."""
    counts = {}
    for video, (fps, frames) in detections.items():
        tracker = ByteTracker(TrackerConfig.for_fps(fps, **overrides))
        lines = [LineCounter(name, a, b) for name, (a, b) in SAMPLE_LINES[video]]
        totals = {line.name: {"in": 0, "out": 0} for line in lines}
        for i, dets in enumerate(frames):
            tracked = tracker.update(dets)
            for crossing in count_lines(lines, tracked, tracker.confirmed_origins(), i / fps):
                totals[crossing.line][crossing.direction] += 1
        counts[video] = totals
    return counts


def print_sample_counts(counts: list[dict], defaults: dict, configs: list[dict]) -> None:
    """One row per configuration: in/out per video and line, * where not the defaults'."""
    cols = [(v, ln) for v in defaults for ln in defaults[v]]
    print("\nSample videos (YOLOv8n int8, every frame, SAMPLE_LINES): in/out")
    print("".join(f"{(v.split('.')[0][:14] + ':' + ln):>24s}" for v, ln in cols))
    for result, overrides in zip(counts, configs, strict=True):
        cells = []
        for v, ln in cols:
            got = result[v][ln]
            mark = "" if got == defaults[v][ln] else "*"
            cells.append(f"{got['in']}/{got['out']}{mark}")
        print("".join(f"{c:>24s}" for c in cells) + f"  {json.dumps(overrides)}")
    print("(* differs from the defaults' count)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "configs", nargs="+", type=parse_overrides, help="JSON overrides, {} = defaults"
    )
    ap.add_argument(
        "--videos",
        action="store_true",
        help="also count the sample videos with a YOLO model (about 30 s more)",
    )
    ap.add_argument(
        "--shifts",
        type=parse_shifts,
        default=bench_count_accuracy.HELD_OUT_SHIFTS,
        help="held-out lines: comma-separated moves, fractions of the image width "
        "(default: the benchmark's %(default)s)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    def held_out_lines(name: str) -> list:
        return bench_count_accuracy.held_out_lines(name, args.shifts)

    root = mot15.mot15_dir()
    bench_tracker.ensure_peer_envs()
    inputs = bench_tracker.load_inputs(root)
    refs = references(root)
    held_refs = references(root, held_out_lines)
    labels = [f"config-{k}" for k in range(len(args.configs))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        errors, held_out = {}, {}
        for label, overrides in zip(labels, args.configs, strict=True):
            for name in mot15.GT_SEQUENCES:
                _, rows, origins = bench_tracker.run_ours(inputs[name], name, overrides, False)
                mot15.write_tracks(out / label / f"{name}.txt", rows)
                mot15.write_tracks(out / label / f"{name}.origins.txt", origins)
            errors[label] = count_errors(refs, out / label)
            held_out[label] = count_errors(held_refs, out / label, held_out_lines)
        metrics = bench_tracker.evaluate(root, out, labels)

    n_gt, n_held = crossings(refs), crossings(held_refs)
    results = []
    print(
        f"{'count error':>12} {'MOTA':>7} {'IDF1':>7} {'ID sw.':>6}  per sequence  "
        f"{'held-out':>13}  per sequence     overrides"
    )
    for label, overrides in zip(labels, args.configs, strict=True):
        overall = metrics[label]["OVERALL"]
        per_seq, held = errors[label], held_out[label]
        total, held_total = sum(per_seq.values()), sum(held.values())
        results.append(
            {
                "overrides": overrides,
                "count_error": total,
                "gt_crossings": n_gt,
                "count_error_per_sequence": per_seq,
                "held_out_count_error": held_total,
                "held_out_gt_crossings": n_held,
                "held_out_count_error_per_sequence": held,
                "mota": overall["mota"],
                "idf1": overall["idf1"],
                "idsw": overall["idsw"],
            }
        )
        print(
            f"{total:>5} ({100 * total / n_gt:4.1f}%) {overall['mota']:7.4f} "
            f"{overall['idf1']:7.4f} {overall['idsw']:>6}  "
            f"{'/'.join(str(v) for v in per_seq.values()):<13} "
            f"{held_total:>5} ({100 * held_total / n_held:4.1f}%)  "
            f"{'/'.join(str(v) for v in held.values()):<16} {json.dumps(overrides)}"
        )
    print(
        f"(count error of {n_gt} crossings, held-out of {n_held}; per sequence: "
        f"{', '.join(mot15.GT_SEQUENCES)})"
    )
    if args.videos:
        detections = detect_sample_videos()
        defaults = count_sample_videos(detections, {})
        videos = [count_sample_videos(detections, o) for o in args.configs]
        print_sample_counts(videos, defaults, args.configs)
        for result, counts in zip(results, videos, strict=True):
            result["sample_videos"] = counts
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
