"""Out-of-sample calibration of the drift thresholds, and the looped-video check.

    python benchmarks/drift_holdout.py [--cache benchmarks/results/drift-frames]
        [--margin 1.0] [--json benchmarks/results/drift-holdout.json]

Fill the cache first (``python benchmarks/drift_windows.py``). Windows of the
unchanged model (`yolov8n_full_integer_quant.tflite`, every sample video with
detections), replayed through the agent's `DriftWindow` exactly as
``bench_drift.py calibrate`` does: 20- and 40-frame windows, baselines of 5 and 10
windows, every frame and every 3rd frame.

**Calibrate** (one set of dispersion factors for every window size, as the shipped
defaults are): for each statistic (psi, ks, js, detections per frame) and each
calibration window, the dispersion that would have put the window exactly on its
threshold; the factor is the largest of them (no false alarm in the calibration
windows) times ``--margin``, rounded up to 0.1, never under 1 (independent draws).

**Measure** on held-out windows, with those factors: the share of judged windows
with a breach (a false alarm per window) and the k-of-n confirmations (what would
roll a model back). Two ways of holding out:

* ``video``: leave one video out: calibrate on the other videos' windows, measure
  on its own (a new site: nothing of its scene was seen in the calibration);
* ``time``: every video split in time: its baseline, then calibration windows from
  the first half of the rest, held-out windows from the second half (the same site,
  later).

And **looped**: each video looped (frame indices wrapping) into 30 windows after a
baseline of 10, judged with the shipped defaults and k of n: the issue's "sample
videos looped for 30 windows with an unchanged model: no alarm".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_drift import CALIBRATED_POLICIES, MODEL, VIDEOS, _frames
from drift_windows import make_windows

from flowfleet.registry.fleet.drift_stats import Settings, WindowStats, compare, confirmed

CONFIGS = ((20, 5), (20, 10), (40, 5), (40, 10))  # (window frames, baseline windows)
STATS = ("psi", "ks", "js", "dpf")


def series(cache: Path, video: str) -> list[tuple[str, WindowStats, list[WindowStats]]]:
    """Per configuration and frame step: (label, baseline, later windows in order)."""
    good = _frames(cache, video, "good", "none", 1)
    out = []
    for W, B in CONFIGS:
        for step in (1, 3):
            ws = [
                WindowStats.from_summary(w)
                for w in make_windows(good[::step], MODEL, window_frames=W)
            ]
            if len(ws) > B:
                out.append((f"{W}f/{B}b/s{step}", WindowStats.pool(ws[:B]), ws[B:]))
    return out


def needed(base: WindowStats, new: WindowStats, s: Settings) -> dict[str, float]:
    """Per statistic: the dispersion that would put this window on its threshold."""
    one = replace(s, dispersion_psi=1.0, dispersion_ks=1.0, dispersion_js=1.0, dispersion_dpf=1.0)
    j = compare(base, new, one)
    st, th = j.statistics, j.thresholds
    out: dict[str, float] = {}
    for k in ("psi", "js"):
        if k in st and th.get(k):
            out[k] = st[k] / th[k]
    if "ks" in st and th.get("ks"):
        out["ks"] = (st["ks"] / th["ks"]) ** 2
    if "dpf_log_ratio" in st:
        floor = math.log1p(s.dpf_floor)
        noise1 = th["dpf_log_ratio"] - floor  # the noise term at dispersion 1
        excess = abs(st["dpf_log_ratio"]) - floor
        out["dpf"] = (excess / noise1) ** 2 if excess > 0 and noise1 > 0 else 0.0
    return out


def fit(pairs, s: Settings, margin: float) -> dict[str, float]:
    """Dispersion factors from calibration (base, window) pairs (see the module)."""
    worst = dict.fromkeys(STATS, 0.0)
    for base, w in pairs:
        for k, v in needed(base, w, s).items():
            worst[k] = max(worst[k], v)
    return {k: max(1.0, math.ceil(10 * v * margin) / 10) for k, v in worst.items()}


def with_factors(s: Settings, d: dict[str, float]) -> Settings:
    return replace(
        s,
        dispersion_psi=d["psi"],
        dispersion_ks=d["ks"],
        dispersion_js=d["js"],
        dispersion_dpf=d["dpf"],
    )


def judge(runs, s: Settings) -> dict:
    """Judge each run's windows in order against its baseline: judged, breaches,
    k-of-n confirmations, and which statistics breached."""
    out = {"judged": 0, "not_judged": 0, "breach": 0, "confirmed": 0, "breaches": {}}
    for base, windows in runs:
        recent: list[bool] = []
        for w in windows:
            j = compare(base, w, s)
            if j.verdict == "not_judged":
                out["not_judged"] += 1
                continue
            out["judged"] += 1
            hit = bool(j.breaches)
            recent.append(hit)
            if hit:
                out["breach"] += 1
                for b in j.breaches:
                    out["breaches"][b] = out["breaches"].get(b, 0) + 1
                if confirmed(recent, s.k, s.n):
                    out["confirmed"] += 1
    out["breach_pct"] = round(100.0 * out["breach"] / out["judged"], 2) if out["judged"] else None
    return out


VARIANTS = ("broken_scaling:8", "broken_scaling:4")


def changed(cache: Path, video: str) -> dict[str, list[tuple[WindowStats, list[WindowStats]]]]:
    """Per broken variant: (the good model's baseline, the variant's windows after the
    baseline's span) for each configuration, as ``bench_drift.py calibrate`` builds
    them (the variants' frames are every 3rd frame)."""
    good = _frames(cache, video, "good", "none", 1)
    out: dict[str, list] = {}
    for variant in VARIANTS:
        try:
            frames = _frames(cache, video, variant, "none", 3)
        except FileNotFoundError:
            continue  # not cached (yet)
        for W, B in CONFIGS:
            base_ws = make_windows(good, MODEL, window_frames=W)[:B]
            if len(base_ws) < B:
                continue
            base = WindowStats.pool(WindowStats.from_summary(w) for w in base_ws)
            ws = make_windows(frames[B * W // 3 :], "changed", window_frames=W)
            if ws:
                out.setdefault(variant, []).append(
                    (base, [WindowStats.from_summary(w) for w in ws])
                )
    return out


def power(broken: dict, s: Settings) -> dict:
    """Per variant: windows judged, breached (share) and confirmed."""
    return {variant: judge(runs, s) for variant, runs in broken.items()}


def _ratio(j) -> float:
    """How close a window came to breaching: the largest statistic over its threshold
    (psi, js; ks squared, so all three are in units of the dispersion factor)."""
    st, th = j.statistics, j.thresholds
    r = [st[k] / th[k] for k in ("psi", "js") if k in st and th.get(k)]
    if "ks" in st and th.get("ks"):
        r.append((st["ks"] / th["ks"]) ** 2)
    return max(r, default=0.0)


SWEEP = ((20, 5), (40, 5), (60, 3), (100, 2), (150, 1))  # (window frames, baseline windows)


def sweep(cache: Path, s: Settings, variant: str = "broken_scaling:4") -> dict:
    """The subtle variant's detection limit: per video and window size, the good
    model's and the variant's windows (both every 3rd frame, so the same frames)
    against the good model's first windows: breaches and how close they came."""
    import statistics

    out = {}
    for video in VIDEOS:
        try:
            bad = _frames(cache, video, variant, "none", 3)
        except FileNotFoundError:
            continue
        good = _frames(cache, video, "good", "none", 1)[::3]
        for W, B in SWEEP:
            gw = [WindowStats.from_summary(w) for w in make_windows(good, MODEL, window_frames=W)]
            bw = [WindowStats.from_summary(w) for w in make_windows(bad, MODEL, window_frames=W)]
            if len(gw) <= B:
                continue
            base = WindowStats.pool(gw[:B])
            row = {}
            for label, ws in (("good", gw[B:]), ("variant", bw[B:])):
                js = [compare(base, w, s) for w in ws]
                js = [j for j in js if j.verdict != "not_judged"]
                ratios = [_ratio(j) for j in js]
                row[label] = {
                    "judged": len(js),
                    "breach": sum(1 for j in js if j.breaches),
                    "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
                    "ratio_max": round(max(ratios), 3) if ratios else None,
                }
            out[f"{video}/{W}f/{B}b"] = row
        # The two models on the same frames, box by box (the shadow comparison's measure).
        from flowfleet.agent.shadow import match_boxes
        from flowfleet.contract_shadow import agreement_of

        n = min(len(good), len(bad))
        a = sum(len(f.dets) for f in good[:n])
        b = sum(len(f.dets) for f in bad[:n])
        m = sum(match_boxes(x.dets, y.dets) for x, y in zip(good[:n], bad[:n], strict=True))
        out[f"{video}/agreement"] = {
            "frames": n,
            "boxes_good": a,
            "boxes_variant": b,
            "agreement": agreement_of(m, a, b),
        }
    return out


def holdout(data: dict, s: Settings, margin: float, broken: dict | None = None) -> dict:
    folds = {}
    for video in data:  # leave one video out
        calib = [(b, w) for v, runs in data.items() if v != video for _, b, ws in runs for w in ws]
        d = fit(calib, s, margin)
        folds[f"video:{video}"] = {
            "factors": d,
            "calibration_windows": len(calib),
            "held_out": judge([(b, ws) for _, b, ws in data[video]], with_factors(s, d)),
            "power": power((broken or {}).get(video, {}), with_factors(s, d)),
        }
    # Split in time: the first half of each run's windows calibrates, the second is held out.
    calib, held = [], []
    for runs in data.values():
        for _, b, ws in runs:
            half = len(ws) // 2
            calib += [(b, w) for w in ws[:half]]
            held.append((b, ws[half:]))
    d = fit(calib, s, margin)
    folds["time"] = {
        "factors": d,
        "calibration_windows": len(calib),
        "held_out": judge(held, with_factors(s, d)),
        "in_sample": judge([(b, [w]) for b, w in calib], with_factors(s, d)),
    }
    return folds


def looped(cache: Path, s: Settings, windows: int = 30, baseline: int = 10) -> dict:
    """Each video looped into ``baseline + windows`` windows (20 and 40 frames)."""
    out = {}
    for video in VIDEOS:
        good = _frames(cache, video, "good", "none", 1)
        for W in (20, 40):
            ws = make_windows(good, MODEL, window_frames=W, count=baseline + windows)
            stats = [WindowStats.from_summary(w) for w in ws]
            base = WindowStats.pool(stats[:baseline])
            out[f"{video}/{W}f"] = judge([(base, stats[baseline:])], s)
    return out


def totals(folds: dict) -> dict:
    t = {"judged": 0, "breach": 0, "confirmed": 0, "not_judged": 0}
    for name, f in folds.items():
        if name.startswith("video:"):
            for k in t:
                t[k] += f["held_out"].get(k, 0)
    t["breach_pct"] = round(100.0 * t["breach"] / t["judged"], 2) if t["judged"] else None
    return t


def _row(label: str, r: dict, factors: str = "") -> str:
    pct = r["breach_pct"] or 0
    return f"{label:<40}{factors:<26}{r['judged']:>7}{r['breach']:>7}{pct:>7}{r['confirmed']:>6}"


def print_result(result: dict) -> None:
    print(f"margin {result['margin']}; shipped factors psi/ks/js/dpf {result['defaults']}")
    print(
        f"{'fold':<40}{'factors psi/ks/js/dpf':<26}{'judged':>7}{'breach':>7}{'%':>7}{'conf.':>6}"
    )
    for name, f in result["folds"].items():
        d = "/".join(str(f["factors"][k]) for k in STATS)
        print(_row(name, f["held_out"], d))
    print(_row("leave one video out, total", result["leave_one_video_out_total"]))
    print(_row("shipped defaults, all (in sample)", result["defaults_all_windows"]))
    print("broken models held out (the fold's factors) and with the shipped defaults:")
    for name, f in result["folds"].items():
        video = name.removeprefix("video:")
        for variant, r in f.get("power", {}).items():
            print(_row(f"  {video[:18]} {variant}", r))
            print(_row("    shipped defaults", result["power_defaults"][video][variant]))
    print("broken_scaling:4 by window size (step-3 frames), shipped defaults:")
    print("  (ratio: the largest statistic over its threshold; 1 is a breach)")
    for name, row in result["x4_sweep_defaults"].items():
        if name.endswith("/agreement"):
            print(f"  {name:<40} {row}")
            continue
        g, v = row["good"], row["variant"]
        print(
            f"  {name:<40} good {g['breach']}/{g['judged']} ratio {g['ratio_median']}"
            f" (max {g['ratio_max']})  x4 {v['breach']}/{v['judged']} ratio "
            f"{v['ratio_median']} (max {v['ratio_max']})"
        )
    print("looped 30 windows after a baseline of 10, shipped defaults:")
    for name, r in result["looped_30_windows_defaults"].items():
        print(_row(f"  {name}", r))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/drift-frames"))
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/drift-holdout.json"))
    args = ap.parse_args()
    s = Settings(policies=CALIBRATED_POLICIES)
    data = {v: series(args.cache, v) for v in VIDEOS}
    broken = {v: changed(args.cache, v) for v in VIDEOS}
    folds = holdout(data, s, args.margin, broken)
    result = {
        "margin": args.margin,
        "defaults": {k: getattr(s, f"dispersion_{k}") for k in STATS},
        "folds": folds,
        "leave_one_video_out_total": totals(folds),
        "defaults_all_windows": judge([(b, ws) for runs in data.values() for _, b, ws in runs], s),
        "looped_30_windows_defaults": looped(args.cache, s),
        "power_defaults": {v: power(b, s) for v, b in broken.items()},
        "x4_sweep_defaults": sweep(args.cache, s),
    }
    print_result(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
