"""Drift judge benchmarks: calibration on real windows, and the fleet-scale cost.

    python benchmarks/bench_drift.py calibrate [--window-frames 20] [--baseline 5]
        [--cache benchmarks/results/drift-frames] [--json FILE]
    python benchmarks/bench_drift.py load [--devices 1000] [--cameras 4] [--windows 3]
        [--db sqlite|postgresql://...] [--json FILE]

``calibrate`` (fill the cache first: ``python benchmarks/drift_windows.py``, about
25 minutes on 2 cores) replays the real detector's frames on every sample video
through the agent's `DriftWindow` and measures:

* the false-alarm rate: windows of the unchanged model, the first ``--baseline``
  windows of each video pooled as the baseline and every later window judged
  against it; a breach in a judged window is a false alarm (also k-of-n
  confirmations); and the dispersion each statistic needed to stay under its
  threshold in 99% of those windows;
* detection power: windows of the same model with broken input scaling judged
  against the good model's baseline (share breached, confirmed);
* environment: darkened frames for both models, judged against the good model on
  normal frames (share classed ``environment``, share left as ``breach``).

``load``: a registry database with ``--devices`` x ``--cameras`` cameras, each just
activated on a new model (the worst case: every camera judged), a 60 s window per
camera, judged by `DriftJudge.run_once`; CPU time per window of all cameras as a
share of one core's 60 s. Prints a table and writes JSON
(default benchmarks/results/drift.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drift_windows import detect_frames, make_windows

from flowfleet.data import data_dir
from flowfleet.registry.fleet.drift_stats import (
    Settings,
    WindowStats,
    compare,
    confirmed,
)

MODEL = "yolov8n_full_integer_quant.tflite"
# Latency is left out: measured on a shared development machine it follows the
# other processes' load, not the model (on a device it is the model's own).
CALIBRATED_POLICIES = ("distribution", "confidence_variance")
VIDEOS = ("car-detection", "one-by-one-person-detection", "pets09-s2l1")


def _frames(cache: Path, video: str, variant: str, transform: str, step: int):
    data = data_dir()
    paths = list((data / "videos").glob(f"{video}.*"))
    key = f"{Path(MODEL).stem}-{variant.replace(':', '_')}-{video}-{transform}-s{step}-lNone.pkl"
    if not (cache / key).exists():
        raise FileNotFoundError(f"{cache / key} missing: run benchmarks/drift_windows.py first")
    return detect_frames(
        data / "models" / MODEL,
        paths[0],
        variant=variant,
        transform=transform,
        step=step,
        cache=cache,
    )


def _judge_all(base, windows, settings):
    out = {
        "windows": 0,
        "not_judged": 0,
        "ok": 0,
        "breach": 0,
        "environment": 0,
        "confirmed": 0,
        "env_confirmed": 0,
        "breaches": {},
    }
    recent: list[str] = []
    ratios = []
    for w in windows:
        j = compare(base, WindowStats.from_summary(w), settings)
        out["windows"] += 1
        out[j.verdict] += 1
        for b in j.breaches:
            out["breaches"][b] = out["breaches"].get(b, 0) + 1
        if j.verdict != "not_judged":
            recent.append({"breach": "b", "environment": "e"}.get(j.verdict, "o"))
            if j.verdict == "breach" and confirmed(
                (c == "b" for c in recent), settings.k, settings.n
            ):
                out["confirmed"] += 1
            if j.verdict == "environment" and confirmed(
                (c == "e" for c in recent), settings.k, settings.n
            ):
                out["env_confirmed"] += 1
        ratios.append((j.statistics, j.thresholds))
    return out, ratios


def _needed_dispersion(pairs, settings):
    """Per statistic: the dispersion that keeps 99% (and 100%) of windows under it."""
    need: dict[str, list[float]] = {}
    for stats, thr in pairs:
        for k in ("psi", "js"):
            if k in stats and thr.get(k):
                d = getattr(settings, f"dispersion_{k}")
                need.setdefault(f"dispersion_{k}", []).append(stats[k] / thr[k] * d)
        if "ks" in stats and thr.get("ks"):
            d = settings.dispersion_ks
            need.setdefault("dispersion_ks", []).append((stats["ks"] / thr["ks"]) ** 2 * d)
        if "dpf_log_ratio" in stats:
            need.setdefault("abs_dpf_log_ratio", []).append(abs(stats["dpf_log_ratio"]))
        for k in ("brightness_shift", "blur_ratio"):
            if k in stats:
                v = stats[k]
                need.setdefault(k, []).append(abs(v) if k == "brightness_shift" else max(v, 1 / v))
    import numpy as np

    return {
        k: {"p99": round(float(np.quantile(v, 0.99)), 4), "max": round(max(v), 4), "n": len(v)}
        for k, v in need.items()
    }


def calibrate(args) -> dict:
    s = Settings(policies=CALIBRATED_POLICIES)
    if args.dispersion:
        d = args.dispersion
        s = replace(s, dispersion_psi=d, dispersion_ks=d, dispersion_js=d, dispersion_dpf=d)
    for item in args.set or ():
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"--set {item}: no drift setting {key!r}")
        s = replace(s, **{key: float(value)})
    W, B = args.window_frames, args.baseline
    results = {
        "settings": s.__dict__ | {"policies": list(s.policies)},
        "window_frames": W,
        "baseline_windows": B,
        "videos": {},
    }
    totals: dict[str, dict] = {}
    all_pairs = []
    for video in args.videos:
        good = _frames(args.cache, video, "good", "none", 1)
        entry = {}
        for label, frames in (("unchanged", good), ("unchanged_step3", good[::3])):
            ws = make_windows(frames, MODEL, window_frames=W)
            if len(ws) <= B:
                continue
            base = WindowStats.pool(WindowStats.from_summary(w) for w in ws[:B])
            res, pairs = _judge_all(base, ws[B:], s)
            all_pairs += pairs
            entry[label] = res
        # Changed model / scene: from every 3rd frame, after the baseline's time span.
        base_ws = make_windows(good, MODEL, window_frames=W)[:B]
        base = WindowStats.pool(WindowStats.from_summary(w) for w in base_ws)
        after = B * W  # frames the baseline used (step 1)
        for label, variant, transform in (
            ("broken_scaling_4", "broken_scaling:4", "none"),
            ("broken_scaling_8", "broken_scaling:8", "none"),
            ("dark_good", "good", "dark"),
            ("dark_broken_4", "broken_scaling:4", "dark"),
        ):
            try:
                frames = _frames(args.cache, video, variant, transform, 3)
            except Exception as exc:  # not cached yet
                entry[label] = {"error": str(exc)}
                continue
            ws = make_windows(frames[after // 3 :], "changed", window_frames=W)
            if ws:
                entry[label], _ = _judge_all(base, ws, s)
        results["videos"][video] = entry
        for label, res in entry.items():
            if "windows" not in res:
                continue
            t = totals.setdefault(label, {k: 0 for k in res if k != "breaches"})
            for k, v in res.items():
                if k != "breaches":
                    t[k] += v
    results["totals"] = totals
    results["needed"] = _needed_dispersion(all_pairs, s)
    return results


def print_calibration(r: dict) -> None:
    dispersions = "/".join(
        str(r["settings"][f"dispersion_{k}"]) for k in ("psi", "ks", "js", "dpf")
    )
    print(
        f"window {r['window_frames']} frames, baseline {r['baseline_windows']} windows, "
        f"dispersion psi/ks/js/dpf {dispersions}, alpha {r['settings']['alpha']}, "
        f"k={r['settings']['k']} of n={r['settings']['n']}"
    )
    print(
        f"{'windows':<18}{'judged':>7}{'not j.':>7}{'ok':>6}{'breach':>7}{'env':>6}"
        f"{'confirmed':>10}{'env conf.':>10}{'breach %':>9}"
    )
    for label, t in r["totals"].items():
        judged = t["windows"] - t["not_judged"]
        pct = 100.0 * t["breach"] / judged if judged else 0.0
        print(
            f"{label:<18}{judged:>7}{t['not_judged']:>7}{t['ok']:>6}{t['breach']:>7}"
            f"{t['environment']:>6}{t['confirmed']:>10}{t['env_confirmed']:>10}{pct:>8.1f}%"
        )
    print("unchanged-model statistics (what each needed):")
    for k, v in r["needed"].items():
        print(f"  {k:<18} p99 {v['p99']:<10} max {v['max']:<10} n {v['n']}")


def _load_windows():
    """Real window payloads to replicate: the good model's 60 s-like windows of PETS09
    (from the calibration cache when present, else a synthetic but valid summary)."""
    from flowfleet.contract import DriftSummary

    good = DriftSummary(
        device="d",
        seq=1,
        camera="c",
        model="m",
        start=0.0,
        end=60.0,
        frames=600,
        detections=6000,
        confidence_hist=(0, 1500, 700, 300, 90, 300, 1000, 1700, 400, 10),
        detections_per_frame=10.0,
        detections_hist=(0, 0, 10, 50, 200, 300, 40),
        class_mix={"person": 4800, "car": 600, "truck": 400, "bicycle": 200},
        latency_ms_p50=15.0,
        latency_ms_p90=18.0,
        latency_ms_p99=25.0,
        brightness=120.0,
        blur=4000.0,
    )
    return json.loads(good.to_json())


def load(args) -> dict:
    """Judge passes over ``devices x cameras`` cameras, one 60 s window each per round."""
    import tempfile
    from contextlib import ExitStack

    from flowfleet.registry.testing import temporary_postgres

    stack = ExitStack()
    if args.db == "sqlite":
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url = str(Path(tmp) / "drift.sqlite")
    else:  # a temporary database on that server (created and dropped here)
        url = stack.enter_context(temporary_postgres(args.db))
    with stack:
        # Side by side in one run: activations one camera at a time (the code the bulk
        # path replaced), then in bulk (the judge's default).
        # And the environment watch (cameras whose model did not change) off and on.
        modes = {
            "one_at_a_time": (False, True),
            "bulk": (True, True),
            "bulk_without_watch": (True, False),
        }
        if args.mode == "watch":
            modes = {k: modes[k] for k in ("bulk_without_watch", "bulk")}
        elif args.mode == "both":
            modes = {k: modes[k] for k in ("one_at_a_time", "bulk")}
        else:
            modes = {args.mode: modes[args.mode]}
        runs = {name: _load(args, url, *flags) for name, flags in modes.items()}
    first = next(iter(runs.values()))
    return {k: first[k] for k in ("database", "devices", "cameras")} | {
        "modes": {name: r["rounds"] for name, r in runs.items()}
    }


def _load(args, url: str, bulk: bool = True, watch: bool = True) -> dict:
    from flowfleet.registry.fleet.drift import DriftJudge, JudgeOptions
    from flowfleet.registry.store import db as regdb
    from flowfleet.registry.testing import reset_database

    db = regdb.open_database(url)
    reset_database(db)
    from flowfleet.registry.store.drift_tables import DriftCursor

    payload = _load_windows()
    devices = [f"dev-{i:04d}" for i in range(args.devices)]
    cameras = [f"cam{j}" for j in range(args.cameras)]
    t0 = 1_780_000_000.0
    seq = {d: 0 for d in devices}
    judge = DriftJudge(
        db,
        None,
        Settings(),
        JudgeOptions(batch=5000, bulk_activations=bulk, watch=watch),
        name="bench",
    )
    rounds = []

    def add_round(r: int, model: str) -> None:
        rows = []
        for d in devices:
            for c in cameras:
                seq[d] += 1
                p = dict(
                    payload,
                    device=d,
                    seq=seq[d],
                    camera=c,
                    model=model,
                    start=t0 + 60 * r,
                    end=t0 + 60 * (r + 1),
                )
                rows.append(
                    dict(
                        device=d,
                        seq=seq[d],
                        camera=c,
                        model=model,
                        start=p["start"],
                        end=p["end"],
                        received_at=t0,
                        payload=json.dumps(p),
                    )
                )
        with db.atomic():
            for i in range(0, len(rows), 500):
                regdb.DriftSummary.insert_many(rows[i : i + 500]).execute()

    with db.connection_context():
        DriftCursor.delete().execute()
        now = time.time()
        regdb.Device.insert_many([dict(id=d, first_seen=now) for d in devices]).execute()
        plan = (
            [("baseline", "model-a.tflite")] * args.baseline
            + [("steady", "model-a.tflite"), ("activation", "model-b.tflite")]
            + [("judged", "model-b.tflite")] * args.windows
        )
        for r, (kind, model) in enumerate(plan):
            add_round(r, model)
            cpu, wall = time.process_time(), time.perf_counter()
            done = judge.run_once(at=time.time() + 3600)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rounds.append(
                {
                    "round": r,
                    "kind": kind,
                    "windows": len(devices) * len(cameras),
                    "cpu_s": round(cpu, 3),
                    "wall_s": round(wall, 3),
                    "core_pct_of_60s": round(100 * cpu / 60.0, 2),
                    "done": done,
                }
            )
    regdb.database_proxy.obj.close()
    return {
        "database": "sqlite" if args.db == "sqlite" else "postgresql",
        "devices": args.devices,
        "cameras": args.cameras,
        "rounds": rounds,
    }


def print_load(r: dict) -> None:
    print(f"{r['database']}: {r['devices']} devices x {r['cameras']} cameras, one 60 s window each")
    for mode, rounds in r["modes"].items():
        print(f"activations {mode.replace('_', ' ')}:")
        print(f"{'round':<7}{'kind':<12}{'windows':>8}{'cpu s':>8}{'wall s':>8}{'% of a core':>13}")
        for x in rounds:
            print(
                f"{x['round']:<7}{x['kind']:<12}{x['windows']:>8}{x['cpu_s']:>8.2f}"
                f"{x['wall_s']:>8.2f}{x['core_pct_of_60s']:>12.1f}%"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--window-frames", type=int, default=20)
    c.add_argument("--baseline", type=int, default=5)
    c.add_argument("--dispersion", type=float, default=None)
    c.add_argument("--videos", nargs="+", default=list(VIDEOS))
    c.add_argument("--set", action="append", help="a drift setting, e.g. dispersion_js=9")
    c.add_argument("--cache", type=Path, default=Path("benchmarks/results/drift-frames"))
    c.add_argument("--json", type=Path, default=Path("benchmarks/results/drift-calibration.json"))
    ld = sub.add_parser("load")
    ld.add_argument("--devices", type=int, default=1000)
    ld.add_argument("--cameras", type=int, default=4)
    ld.add_argument("--baseline", type=int, default=2, help="rounds of baseline windows")
    ld.add_argument("--windows", type=int, default=3, help="judged rounds after the activation")
    ld.add_argument(
        "--db",
        default="sqlite",
        help="sqlite (a temporary file) or a PostgreSQL server URL (a temporary database "
        "is created on it and dropped)",
    )
    ld.add_argument(
        "--mode",
        choices=("both", "bulk", "one_at_a_time", "bulk_without_watch", "watch"),
        default="both",
        help="how activations read baselines and create rows (both: side by side); "
        "watch: the environment watch off, then on, side by side",
    )
    ld.add_argument("--json", type=Path, default=Path("benchmarks/results/drift.json"))
    args = ap.parse_args()
    if args.cmd == "calibrate":
        r = calibrate(args)
        print_calibration(r)
    else:
        r = load(args)
        print_load(r)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
