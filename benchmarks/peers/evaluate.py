"""CLEAR-MOT and identity metrics with motmetrics, run inside the peers' venv.

motmetrics 1.4.0 calls ``np.asfarray`` (removed in NumPy 2), so it runs in the NumPy 1
benchmark environment, not in the project's. Input: a JSON job file
``{"gt": {SEQ: path}, "hyp": {TRACKER: {SEQ: path}}}``; output: JSON on stdout
``{TRACKER: {SEQ|"OVERALL": {"mota", "idf1", "idsw", ...}}}``.

    python evaluate.py JOB.json > metrics.json
"""

from __future__ import annotations

import json
import math
import sys

import motmetrics as mm

METRICS = {
    "mota": "mota",
    "idf1": "idf1",
    "idsw": "num_switches",
    "motp_iou": "motp",
    "precision": "precision",
    "recall": "recall",
    "fp": "num_false_positives",
    "fn": "num_misses",
    "gt_ids": "num_unique_objects",
    "mostly_tracked": "mostly_tracked",
}


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        job = json.load(f)
    gts = {
        seq: mm.io.loadtxt(path, fmt="mot15-2D", min_confidence=1)
        for seq, path in job["gt"].items()
    }
    mh = mm.metrics.create()
    out: dict[str, dict] = {}
    for tracker, files in job["hyp"].items():
        accs, names = [], []
        for seq, gt in gts.items():
            hyp = mm.io.loadtxt(files[seq], fmt="mot15-2D")
            accs.append(mm.utils.compare_to_groundtruth(gt, hyp, "iou", distth=0.5))
            names.append(seq)
        summary = mh.compute_many(
            accs, names=names, metrics=list(METRICS.values()), generate_overall=True
        )
        rows = {}
        for name, row in summary.iterrows():
            key = "OVERALL" if name == "OVERALL" else name
            values = {}
            for k, m in METRICS.items():
                v = float(row[m])
                if k == "motp_iou":
                    v = 1.0 - v  # motmetrics reports the mean IoU *distance*
                values[k] = (
                    None
                    if math.isnan(v)
                    else (int(v) if m.startswith("num_") or m == "mostly_tracked" else v)
                )
            rows[key] = values
        out[tracker] = rows
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
