"""Count accuracy end to end on real frames: PETS09-S2L1, ours against the peer pipeline.

`$FLOWFLEET_DATA/videos/pets09-s2l1.avi` holds the 795 frames of MOT15's PETS09-S2L1,
so `$FLOWFLEET_DATA/mot15/PETS09-S2L1/gt.txt` is its ground truth. Both pipelines get
the same detections of the same model (the catalog's default, YOLOv8n int8 TFLite,
every detection of class person scored 0.1 or more, as `flowfleet count --classes
person` sees them):

* ``ours``: the agent's own `CameraPipeline` (class filter, `ByteTracker` with the
  settings `flowfleet count` uses, score thresholds set from the camera's own
  scores, torso-colour appearance, line counters seeded with where each track was
  first detected), with the camera settings given by ``--ours KEY=VALUE``;
* ``ours-motion``: the same with ``appearance=false`` (what the appearance cue buys
  and costs, measured side by side);
* ``peer``: what a user assembles from popular parts: Roboflow ``trackers``'
  ``ByteTrackTracker`` (defaults, the file's frame rate) and supervision's
  ``LineZone`` with a bottom-centre anchor, run in the peers' own virtual environment
  (``benchmarks/.venv-peers/np2``, made by ``bench_tracker.py``; none of their code is
  in the project) by ``benchmarks/peers/run_video_peer.py``.

The reference count is what our ``LineCounter`` counts on the ground-truth
trajectories. Error per line: |count - gt| summed over both directions; relative to
the gt crossings. The lines (`LINES`) cross the plaza's walkways; the held-out lines
are each of them moved by `HELD_OUT_SHIFTS` of the image width, lines nothing was
tuned on. MOTA, IDF1 and id switches come from ``motmetrics`` (IoU >= 0.5, in the
``np1`` peers' environment, as in ``bench_tracker.py``).

Speed: the model runs once per frame and its detections are cached on disk
(``benchmarks/.cache/``, keyed by the model's sha256 and the detector settings), so
a tuning run does not re-run it; the per-frame inference time is measured while
caching. ``fps`` = frames / (inference + tracking and counting time), the tracking
and counting timed in each pipeline's own process (CPU time).

    .venv/bin/python benchmarks/bench_video_accuracy.py [--ours KEY=VALUE ...]
        [--json benchmarks/results/video_accuracy.json] [--no-peer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mot15  # noqa: E402
from video_versus import line_by_line, print_line_by_line  # noqa: E402

from flowfleet.agent.counting import LineCounter, count_lines  # noqa: E402
from flowfleet.agent.detections import Detections  # noqa: E402
from flowfleet.agent.detectors.base import Detector  # noqa: E402
from flowfleet.data import data_dir, models_dir, videos_dir  # noqa: E402

VIDEO = "pets09-s2l1.avi"
SEQ = "PETS09-S2L1"
WIDTH, HEIGHT = 768, 576
CACHE = HERE / ".cache"
DEFAULT_MODEL = "yolov8n_full_integer_quant.tflite"
CONF = 0.1  # `flowfleet count`'s default --conf

# (name, A, B) in image pixels; feet (bottom-centre) points cross them. The plaza is
# seen from above at an angle: people walk between the left edge (feet y 200-300),
# the lower right corner and the top; paths cross in the middle. Three vertical
# lines cut the east-west flow (west of the centre, through it, east of it), two
# horizontal ones the north-south flow on the left and right halves. Each line stays
# clear of the image border, where tracks start and end.
LINES: list[tuple[str, tuple[float, float], tuple[float, float]]] = [
    ("west", (240, 120), (240, 400)),
    ("centre", (420, 120), (420, 560)),
    ("east", (600, 120), (600, 540)),
    ("north", (250, 260), (720, 260)),
    ("south", (120, 400), (560, 400)),
]
# Held-out copies: every line moved along its normal by these fractions of the width.
HELD_OUT_SHIFTS = (-0.06, -0.03, 0.03, 0.06)


def held_out_lines(shifts=HELD_OUT_SHIFTS):
    """`LINES` moved by each of ``shifts`` (fractions of the image width) along their
    normal, named like ``"west+3%"`` (plus: towards the line's "in" side)."""
    out = []
    for name, a, b in LINES:
        dx, dy = b[0] - a[0], b[1] - a[1]
        length = float(np.hypot(dx, dy))
        nx, ny = -dy / length, dx / length
        for f in shifts:
            d = f * WIDTH
            out.append(
                (
                    f"{name}{100 * f:+.3g}%",
                    (a[0] + nx * d, a[1] + ny * d),
                    (b[0] + nx * d, b[1] + ny * d),
                )
            )
    return out


# More held-out lines, chosen after the two sets above and never tuned on: each line
# turned about its middle by these angles, and lines across the walkways between
# and beside ours (vertical at these x, horizontal at these y).
ROTATIONS = (-15, 15)
GRID_X = (180, 300, 360, 480, 540, 660)
GRID_Y = (220, 300, 340, 440, 480)


def more_held_out_lines():
    """`LINES` turned by `ROTATIONS` degrees about their middles (``"west@+15"``),
    then vertical lines at `GRID_X` (``"x300"``) and horizontal ones at `GRID_Y`."""
    out = []
    for deg in ROTATIONS:
        t = np.radians(deg)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        for name, a, b in LINES:
            pa, pb = np.asarray(a, float), np.asarray(b, float)
            mid = (pa + pb) / 2
            out.append(
                (f"{name}@{deg:+d}", tuple(mid + rot @ (pa - mid)), tuple(mid + rot @ (pb - mid)))
            )
    out += [(f"x{x}", (x, 120), (x, 550)) for x in GRID_X]
    out += [(f"y{y}", (100, y), (720, y)) for y in GRID_Y]
    return out


# -- detections, cached ---------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tiled_detect(det, image: np.ndarray, tiles: int) -> Detections:
    """Detect on ``tiles`` vertical strips of the frame (each overlapping the next by a
    third of a strip) and on the whole frame, then merge with per-class NMS: small,
    distant objects are seen at up to ``tiles`` times the model's usual scale."""
    from flowfleet.agent.detectors.yolo import nms_per_class

    w = image.shape[1]
    parts = [det.detect(image)]
    step = w / (tiles + (tiles - 1) / 3)
    width = round(step * 4 / 3)
    for k in range(tiles):
        x0 = min(round(k * step), w - width)
        d = det.detect(np.ascontiguousarray(image[:, x0 : x0 + width]))
        boxes = d.xyxy.copy()
        boxes[:, [0, 2]] += x0
        parts.append(Detections(boxes, d.confidence, d.class_id, names=d.names))
    merged = Detections.concat(parts, parts[0].names)
    if not len(merged):
        return merged
    keep = nms_per_class(merged.xyxy, merged.confidence, merged.class_id, 0.45)
    return merged[np.sort(keep)]


def cached_detections(
    model: Path,
    video: Path,
    *,
    threads: int = 2,
    progress: bool = True,
    tiles: int = 1,
    **detector_options,
) -> tuple[list[Detections], np.ndarray]:
    """Every frame's detections (all classes, scores >= CONF) and inference seconds.

    The first call runs the model on every frame and writes them to
    ``benchmarks/.cache/``; later calls with the same model bytes, video and
    ``detector_options`` read them back.
    """
    options = {"conf_threshold": CONF, **detector_options}
    key = hashlib.sha256(
        json.dumps(
            [_sha256(model), video.name, video.stat().st_size, options]
            + ([] if tiles == 1 else [{"tiles": tiles}]),
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    path = CACHE / f"{video.stem}-{model.stem}-{key}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        names = tuple(str(n) for n in data["names"])
        bounds = data["bounds"]
        frames = [
            Detections(
                data["xyxy"][bounds[i] : bounds[i + 1]],
                data["score"][bounds[i] : bounds[i + 1]],
                data["cls"][bounds[i] : bounds[i + 1]],
                names=names,
            )
            for i in range(len(bounds) - 1)
        ]
        return frames, data["seconds"]

    import cv2

    from flowfleet.agent.detectors import load_detector

    det = load_detector(model, threads=threads, **options)
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"detect {video.name}", unit="frame", file=sys.stderr)
    frames, seconds = [], []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        t0 = time.perf_counter()
        frames.append(det.detect(image) if tiles == 1 else tiled_detect(det, image, tiles))
        seconds.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    names = det.labels
    det.close()
    bounds = np.cumsum([0] + [len(d) for d in frames])
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        xyxy=np.concatenate([d.xyxy for d in frames]) if frames else np.zeros((0, 4)),
        score=np.concatenate([d.confidence for d in frames]) if frames else np.zeros(0),
        cls=np.concatenate([d.class_id for d in frames]) if frames else np.zeros(0),
        bounds=bounds,
        seconds=np.asarray(seconds),
        names=np.asarray(names),
    )
    tmp.replace(path)
    return [Detections(d.xyxy, d.confidence, d.class_id, names=names) for d in frames], np.asarray(
        seconds
    )


class ReplayDetector(Detector):
    """A `Detector` that hands back cached detections, one frame per ``detect`` call,
    so the agent's own `CameraPipeline` runs unchanged on them."""

    def __init__(self, frames: list[Detections], names: tuple[str, ...]) -> None:
        from flowfleet.agent.detectors.base import ModelInfo

        self.frames = frames
        self.i = 0
        self.info = ModelInfo("replay", "replay", (), "", (), names)

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        d = self.frames[self.i]
        self.i += 1
        return d


# -- the pipelines --------------------------------------------------------------------


def video_frames(video: Path):
    """The decoded frames of ``video`` (BGR), for settings that look at the image."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    while True:
        ok, image = cap.read()
        if not ok:
            return
        yield image


def run_ours(frames: list[Detections], fps: float, lines, tracker=None, video: Path | None = None):
    """The agent's pipeline on cached detections, people only.

    Returns (per-frame tracks [(ids, xyxy)], [{line: {"in", "out"}} per line set],
    CPU seconds of tracking and counting, the pipeline's thresholds report).
    ``lines`` is a list of line sets (names unique over all sets), all counted by
    the one pipeline, as a camera with that many lines counts them.
    """
    from flowfleet.agent.labels import ClassFilter
    from flowfleet.agent.pipeline import CameraPipeline, calibrator_for
    from flowfleet.agent.tracker import TrackerSpec

    names = frames[0].names
    spec = tracker or TrackerSpec()
    config = spec.config(fps)
    pipeline = CameraPipeline(
        "bench",
        ReplayDetector(frames, names),
        ClassFilter(("person",), names),
        [LineCounter(n, a, b) for line_set in lines for n, a, b in line_set],
        [],
        config,
        calibrator=calibrator_for(spec, config),
    )
    which = {n: k for k, line_set in enumerate(lines) for n, _, _ in line_set}
    counts = [{n: {"in": 0, "out": 0} for n, _, _ in line_set} for line_set in lines]
    images = video_frames(video) if video is not None else None
    blank = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    tracks: list = []
    cpu = 0.0

    def take(result):
        for c in result.crossings:
            counts[which[c.line]][c.line][c.direction] += 1
        for r in result.replayed or [result]:  # the frames a warm-up held back
            tracks.append((r.tracked.tracker_id.copy(), r.tracked.xyxy.copy()))

    for i in range(len(frames)):
        image = next(images) if images is not None else blank
        t0 = time.process_time()
        result = pipeline.process(image, i / fps)
        cpu += time.process_time() - t0
        if result.replayed or pipeline.thresholds()["mode"] != "warming_up":
            take(result)
    rest = pipeline.finish((len(frames) - 1) / fps)
    if rest is not None:
        take(rest)
    assert len(tracks) == len(frames), (len(tracks), len(frames))
    return tracks, counts, cpu, pipeline.thresholds()


def count_tracks(tracks, lines, fps: float) -> dict:
    """{line: {"in", "out"}} of per-frame (ids, xyxy) tracks (the ground truth)."""
    counters = [LineCounter(n, a, b) for n, a, b in lines]
    totals = {c.name: {"in": 0, "out": 0} for c in counters}
    for i, (ids, xyxy) in enumerate(tracks):
        n = len(ids)
        dets = Detections(xyxy, np.ones(n), np.zeros(n), ids, ("person",))
        for crossing in count_lines(counters, dets, None, i / fps):
            totals[crossing.line][crossing.direction] += 1
    return totals


def run_peer(frames: list[Detections], fps: float, line_sets, work: Path) -> dict:
    """Roboflow trackers' ByteTrack + supervision LineZone in the np2 peers' venv."""
    import bench_tracker

    person = frames[0].names.index("person")
    sel = [d[d.class_id == person] for d in frames]
    bounds = np.cumsum([0] + [len(d) for d in sel])
    np.savez(
        work / "peer-input.npz",
        xyxy=np.concatenate([d.xyxy for d in sel]),
        score=np.concatenate([d.confidence for d in sel]),
        bounds=bounds,
    )
    job = {
        "input": str(work / "peer-input.npz"),
        "fps": fps,
        "line_sets": line_sets,
        "tracks": str(work / "peer" / f"{SEQ}.txt"),
    }
    (work / "peer-job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [
            str(bench_tracker.peer_python("np2")),
            str(HERE / "peers" / "run_video_peer.py"),
            str(work / "peer-job.json"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **bench_tracker.SINGLE_THREAD},
    )
    if proc.returncode != 0:
        raise SystemExit(f"peer pipeline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def oracle_tracks(frames: list[Detections], gt) -> list:
    """Per-frame (ids, xyxy): every person detection that overlaps a ground-truth box
    at IoU >= 0.5 (one-to-one, best overlap) with that person's id, the rest dropped.
    Counted like a tracker's output, it is what the detections allow: a perfect
    association of these boxes."""
    from scipy.optimize import linear_sum_assignment

    from flowfleet.agent.tracker import iou_matrix

    person = frames[0].names.index("person")
    out = []
    for d, (gids, gxy) in zip(frames, gt, strict=True):
        xyxy = d.xyxy[d.class_id == person]
        iou = iou_matrix(xyxy, gxy)
        r, c = linear_sum_assignment(iou, maximize=True) if iou.size else ([], [])
        keep = [(i, j) for i, j in zip(r, c, strict=True) if iou[i, j] >= 0.5]
        rows = np.array([i for i, _ in keep], np.intp)
        out.append((np.array([gids[j] for _, j in keep], np.int64), xyxy[rows]))
    return out


def errors(result: dict, reference: dict) -> dict:
    per_line = {
        ln: sum(abs(result[ln][d] - reference[ln][d]) for d in ("in", "out")) for ln in reference
    }
    gt = sum(reference[ln][d] for ln in reference for d in ("in", "out"))
    err = sum(per_line.values())
    return {"abs_error": err, "gt_crossings": gt, "rel_error": err / gt, "per_line": per_line}


def parse_overrides(items: list[str]):
    from flowfleet.agent.tracker import TrackerSpec

    values = {}
    for item in items:
        key, _, value = item.partition("=")
        values[key] = json.loads(value) if value not in ("", None) else value
    return TrackerSpec(**values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=models_dir() / DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tracker setting for ours (JSON value), e.g. high_thresh=0.5",
    )
    ap.add_argument("--no-peer", action="store_true", help="ours only (no peers' venvs)")
    ap.add_argument(
        "--tiles",
        type=int,
        default=1,
        help="also detect on N overlapping vertical strips of each frame and merge "
        "(default 1: the whole frame only), to measure what tiling buys",
    )
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds of ours (default 2)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "video_accuracy.json")
    args = ap.parse_args(argv)

    video = videos_dir() / VIDEO
    gt_path = data_dir() / "mot15" / SEQ / "gt.txt"
    for p in (video, gt_path, args.model):
        if not p.is_file():
            raise SystemExit(f"{p}: missing (set FLOWFLEET_DATA to the shared data folder)")
    import cv2

    fps = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS)

    frames, infer_s = cached_detections(args.model, video, threads=args.threads, tiles=args.tiles)
    n = len(frames)
    gt = mot15.load_ground_truth(data_dir() / "mot15", SEQ)[:n]
    line_sets = [LINES, held_out_lines(), more_held_out_lines()]
    gt_counts = [count_tracks(gt, s, fps) for s in line_sets]
    oracle = oracle_tracks(frames, gt)
    oracle_counts = [count_tracks(oracle, s, fps) for s in line_sets]
    spec = parse_overrides(args.ours)

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Ours as configured, and the same without the appearance cue (what it buys
        # and what it costs, side by side); each run twice, alternating, best CPU time.
        variants = {"ours": spec, "ours-motion": spec.model_copy(update={"appearance": False})}
        for _ in range(args.rounds):
            for name, variant in variants.items():
                tracks, counts, cpu, thresholds = run_ours(
                    frames, fps, line_sets, variant, video=video
                )
                best = rows.get(name, {}).get("track_s", float("inf"))
                rows[name] = {"counts": counts, "track_s": min(cpu, best), "thresholds": thresholds}
                mot15.write_tracks(
                    work / name / f"{SEQ}.txt",
                    [
                        (i + 1, int(t), b)
                        for i, (ids, xy) in enumerate(tracks)
                        for t, b in zip(ids, xy, strict=True)
                    ],
                )
        trackers = list(variants)
        if not args.no_peer:
            import bench_tracker

            bench_tracker.ensure_peer_envs()
            peer = run_peer(frames, fps, line_sets, work)
            rows["peer"] = {"counts": peer["counts"], "track_s": peer["seconds"]}
            rows["peer"]["versions"] = peer["versions"]
            trackers.append("peer")
            metrics = bench_tracker_evaluate(gt_path, work, trackers)
        else:
            metrics = {}
    for t in trackers:
        row = rows[t]
        row["tuned"] = errors(row["counts"][0], gt_counts[0])
        row["held_out"] = errors(row["counts"][1], gt_counts[1])
        row["more_held_out"] = errors(row["counts"][2], gt_counts[2])
        row["track_ms"] = 1000 * row["track_s"] / n
        row["fps"] = n / (float(infer_s.sum()) + row["track_s"])
        row["metrics"] = metrics.get(t, {}).get("OVERALL", {})

    oracle_row = {
        "tuned": errors(oracle_counts[0], gt_counts[0]),
        "held_out": errors(oracle_counts[1], gt_counts[1]),
        "more_held_out": errors(oracle_counts[2], gt_counts[2]),
    }
    print_table(rows, trackers, gt_counts, float(np.median(infer_s)) * 1000, spec, oracle_row)
    versus = None
    if "peer" in rows:
        versus = line_by_line(rows["ours"], rows["peer"])
        print_line_by_line(versus, rows["ours"], rows["peer"], [n for n, _, _ in LINES])
    out = {
        "benchmark": "video_accuracy",
        "video": VIDEO,
        "frames": n,
        "fps_of_file": fps,
        "model": args.model.name,
        "tiles": args.tiles,
        "ours_settings": spec.given(),
        "inference_ms_median": round(float(np.median(infer_s)) * 1000, 2),
        "lines": LINES,
        "held_out_shifts": HELD_OUT_SHIFTS,
        "more_held_out_lines": line_sets[2],
        "oracle": oracle_row,
        "gt_counts": gt_counts,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {t: {k: v for k, v in rows[t].items()} for t in trackers},
        "ours_vs_peer_per_line": versus,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")
    return 0


def bench_tracker_evaluate(gt_path: Path, work: Path, trackers: list[str]) -> dict:
    import bench_tracker

    job = {
        "gt": {SEQ: str(gt_path)},
        "hyp": {t: {SEQ: str(work / t / f"{SEQ}.txt")} for t in trackers},
    }
    (work / "eval-job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [
            str(bench_tracker.peer_python("np1")),
            str(HERE / "peers" / "evaluate.py"),
            str(work / "eval-job.json"),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"motmetrics evaluation failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def print_table(rows, trackers, gt_counts, infer_ms, spec, oracle) -> None:
    names = [n for n, _, _ in LINES]
    print(f"\n{VIDEO}: people, lines {', '.join(names)}; inference {infer_ms:.1f} ms/frame")
    print(f"ours: {spec.given() or 'defaults'}; score thresholds {rows['ours']['thresholds']}")
    gt_line = "  ".join(f"{ln} {gt_counts[0][ln]['in']}/{gt_counts[0][ln]['out']}" for ln in names)
    print(f"gt crossings (in/out): {gt_line}")
    sets = ("tuned", "held_out", "more_held_out")
    head = (
        f"{'pipeline':<12}"
        + "".join(f"{n:>8}" for n in names)
        + f"{'lines':>15}{'held-out':>15}{'more held-out':>15}"
        + f"{'MOTA':>7}{'IDF1':>7}{'IDsw':>6}{'trk ms':>8}{'fps':>7}"
    )
    print(head)

    def errs(r):
        return "".join(
            f"{r[k]['abs_error']:>4}/{r[k]['gt_crossings']:<4}{r[k]['rel_error']:>6.1%} "
            for k in sets
        )

    for t in trackers:
        r = rows[t]
        m = r["metrics"]
        cells = "".join(f"{r['tuned']['per_line'][n]:>8}" for n in names)
        mota = f"{m['mota']:.3f}" if m else "-"
        idf1 = f"{m['idf1']:.3f}" if m else "-"
        idsw = str(m["idsw"]) if m else "-"
        print(
            f"{t:<12}{cells}{errs(r)}"
            f"{mota:>7}{idf1:>7}{idsw:>6}{r['track_ms']:>8.2f}{r['fps']:>7.1f}"
        )
    cells = "".join(f"{oracle['tuned']['per_line'][n]:>8}" for n in names)
    print(f"{'oracle':<12}{cells}{errs(oracle)}")
    print(
        "(per line: |count - gt| over in and out; lines / held-out: errors / gt crossings;"
        " oracle: the detections with the gt's ids)"
    )


if __name__ == "__main__":
    sys.exit(main())
