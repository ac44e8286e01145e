"""The peer counting pipeline on cached detections, inside the ``np2`` peers' venv.

Started by ``benchmarks/bench_video_accuracy.py``: Roboflow ``trackers``'
``ByteTrackTracker`` (its defaults, the video's frame rate) and supervision's
``LineZone`` with a bottom-centre anchor, as a user would put them together. None of
their code is copied here; this script only calls their public API.

Input: a JSON job ``{"input": NPZ, "fps": F, "line_sets": [[[name, A, B], ...], ...],
"tracks": PATH}``; the npz holds the person detections of every frame (``xyxy``,
``score``, ``bounds``). Writes the tracks (MOT format) to PATH and prints JSON
``{"counts": [{line: {"in", "out"}} per set], "seconds": CPU s, "versions": {...}}``.

supervision names a line's two directions its own way; each line's ``in`` / ``out``
here is mapped to flowfleet's convention (crossing from the left of A->B to its
right is "in") by sending a test box across a copy of the line first.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mot15


def make_zone(a, b) -> sv.LineZone:
    return sv.LineZone(
        start=sv.Point(*a), end=sv.Point(*b), triggering_anchors=(sv.Position.BOTTOM_CENTER,)
    )


def flowfleet_in_is_supervision_in(a, b) -> bool:
    """Walk a box's bottom centre from the left of A->B (as seen on the image, y down)
    to its right, flowfleet's "in", across a copy of the line, and see which of
    supervision's two counters it moves."""
    zone = make_zone(a, b)
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = (b - a) / np.hypot(*(b - a))
    left = np.array([d[1], -d[0]])  # with y down, this side is on the left of A->B
    mid = (a + b) / 2
    for step in np.linspace(40, -40, 9):
        foot = mid + step * left
        box = np.array([[foot[0] - 5, foot[1] - 20, foot[0] + 5, foot[1]]], np.float32)
        one = np.ones(1, int)
        zone.trigger(sv.Detections(xyxy=box, class_id=0 * one, tracker_id=one))
    if zone.in_count + zone.out_count != 1:
        raise SystemExit(
            f"line {a}->{b}: the test box was counted {zone.in_count}/{zone.out_count}"
        )
    return zone.in_count == 1


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    data = np.load(job["input"])
    xyxy, score, bounds = data["xyxy"], data["score"], data["bounds"]
    inputs = [
        sv.Detections(
            xyxy=xyxy[bounds[i] : bounds[i + 1]].astype(np.float32),
            confidence=score[bounds[i] : bounds[i + 1]].astype(np.float32),
            class_id=np.zeros(bounds[i + 1] - bounds[i], int),
        )
        for i in range(len(bounds) - 1)
    ]
    sets = [[(n, tuple(a), tuple(b)) for n, a, b in s] for s in job["line_sets"]]
    same = [[flowfleet_in_is_supervision_in(a, b) for _, a, b in s] for s in sets]
    tracker = ByteTrackTracker(frame_rate=job["fps"])
    zones = [[make_zone(a, b) for _, a, b in s] for s in sets]
    rows = []
    start = time.process_time()
    for i, dets in enumerate(inputs):
        res = tracker.update(dets)
        for s in zones:
            for z in s:
                z.trigger(res)
        keep = np.asarray(res.tracker_id) >= 0
        rows.append((i, np.asarray(res.tracker_id)[keep], res.xyxy[keep]))
    seconds = time.process_time() - start
    counts = []
    for s, zs, flags in zip(sets, zones, same, strict=True):
        c = {}
        for (name, _, _), z, ok in zip(s, zs, flags, strict=True):
            n_in, n_out = (z.in_count, z.out_count) if ok else (z.out_count, z.in_count)
            c[name] = {"in": int(n_in), "out": int(n_out)}
        counts.append(c)
    mot15.write_tracks(
        Path(job["tracks"]),
        [(i + 1, int(t), b) for i, ids, boxes in rows for t, b in zip(ids, boxes, strict=True)],
    )
    versions = {p: version(p) for p in ("trackers", "supervision", "numpy")}
    json.dump({"counts": counts, "seconds": seconds, "versions": versions}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
