"""Run peer trackers (installed from PyPI) on MOT15 det.txt, inside a peers' venv.

Started by ``benchmarks/bench_tracker.py`` through subprocess in
``benchmarks/.venv-peers/np1`` (NumPy 1: ``sort-track``, ``norfair``) or
``benchmarks/.venv-peers/np2`` (NumPy 2: Roboflow ``trackers``). None of the peers'
code is copied here: this script only imports the packages and calls their public
``update`` functions.

Input: a JSON job file::

    {"trackers": ["sort", "norfair"], "rounds": 1, "out": "DIR",
     "mot15": "DATA/mot15", "sequences": ["PETS09-S2L1", ...]}

For each tracker and sequence it writes ``DIR/<tracker>/<SEQ>.txt`` (MOT format: the
tracks matched in each frame) and prints JSON ``{tracker: {SEQ: [seconds per round]}}``
on stdout. Only the trackers' ``update`` calls are timed; the per-frame inputs are
built beforehand and the outputs converted afterwards.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mot15

warnings.filterwarnings("ignore")


# -- SORT reference (sort-track: Bewley et al.'s SORT, packaged) ----------------------


def run_sort(frames, seq):
    from sort.tracker import KalmanBoxTracker, SortTracker

    KalmanBoxTracker.count = 0
    # The reference's published settings (abewley/sort: max_age=1, min_hits=3, iou 0.3).
    tracker = SortTracker(max_age=1, min_hits=3, iou_threshold=0.3)
    inputs = [np.column_stack([b, s, np.zeros(len(s))]).astype(np.float64) for b, s in frames]
    start = time.process_time()
    raw = [tracker.update(d, None) for d in inputs]
    elapsed = time.process_time() - start
    rows = [(i + 1, int(r[4]), r[:4]) for i, res in enumerate(raw) for r in res]
    return elapsed, rows


# -- norfair (Tryolabs; what Frigate uses) ---------------------------------------------


def run_norfair(frames, seq):
    from norfair import Detection, Tracker

    # Box tracking with IoU distance (match at IoU >= 0.3, as SORT), a one-second
    # lost buffer and confirmation after the second hit: the settings ours uses.
    tracker = Tracker(
        distance_function="iou",
        distance_threshold=0.7,
        hit_counter_max=max(5, round(seq.fps)),
        initialization_delay=1,
    )
    inputs = [
        [
            Detection(points=b.reshape(2, 2).astype(np.float64), scores=np.array([c, c]))
            for b, c in zip(bs, ss, strict=True)
        ]
        for bs, ss in frames
    ]
    start = time.process_time()
    raw = [[(o.id, o.last_detection) for o in tracker.update(dets)] for dets in inputs]
    elapsed = time.process_time() - start
    rows = []
    for i, (res, dets) in enumerate(zip(raw, inputs, strict=True)):
        current = {id(d) for d in dets}
        rows += [(i + 1, int(tid), det.points.reshape(4)) for tid, det in res if id(det) in current]
    return elapsed, rows


# -- Roboflow trackers (supervision's successor for ByteTrack) --------------------------


def _run_roboflow(make, frames):
    import supervision as sv

    tracker = make()
    inputs = [
        sv.Detections(xyxy=b.astype(np.float32), confidence=s, class_id=np.zeros(len(s), int))
        for b, s in frames
    ]
    start = time.process_time()
    raw = [tracker.update(d) for d in inputs]
    elapsed = time.process_time() - start
    rows = []
    for i, res in enumerate(raw):
        keep = np.asarray(res.tracker_id) >= 0
        rows += [
            (i + 1, int(t), b)
            for t, b in zip(np.asarray(res.tracker_id)[keep], res.xyxy[keep], strict=True)
        ]
    return elapsed, rows


def run_rf_sort(frames, seq):
    from trackers import SORTTracker

    return _run_roboflow(lambda: SORTTracker(frame_rate=seq.fps), frames)


def run_rf_bytetrack(frames, seq):
    from trackers import ByteTrackTracker

    return _run_roboflow(lambda: ByteTrackTracker(frame_rate=seq.fps), frames)


RUNNERS = {
    "sort": run_sort,
    "norfair": run_norfair,
    "trackers-sort": run_rf_sort,
    "trackers-bytetrack": run_rf_bytetrack,
}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    root, out = Path(job["mot15"]), Path(job["out"])
    data = {name: mot15.load_detections(root, name) for name in job["sequences"]}
    times: dict[str, dict[str, list[float]]] = {}
    for name in job["trackers"]:
        runner = RUNNERS[name]
        times[name] = {}
        for seq_name, frames in data.items():
            seq = mot15.SEQUENCES[seq_name]
            runner(frames[:20], seq)  # warm-up: imports, first-call caches
            seconds = []
            for _ in range(job.get("rounds", 1)):
                elapsed, rows = runner(frames, seq)
                seconds.append(elapsed)
            mot15.write_tracks(out / name / f"{seq_name}.txt", rows)
            times[name][seq_name] = seconds
    json.dump(times, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
