"""Our tracker against the peer trackers users pick, side by side on MOT15.

For each of the six MOT15 sequences (public ACF detections in ``det.txt``) it runs:

- ``ours``: ``flowfleet.agent.tracker.ByteTracker`` with ``TrackerConfig.for_fps(fps)``
  (the defaults the agent uses), fed ``Detections`` of class "person", plus one
  ``LineCounter`` per line of ``bench_count_accuracy.LINES``: the timed loop is
  tracker + counters, per frame (each new track's starting side seeded from
  ``confirmed_origins()``, as the agent's pipeline does);
- ``ours-mot15``: the same tracker with the ``MOT15_PRESET`` overrides below;
- ``sort``: the SORT reference (PyPI ``sort-track``, Bewley et al.'s code, its
  published settings max_age=1, min_hits=3, IoU 0.3);
- ``trackers-sort`` and ``trackers-bytetrack``: Roboflow ``trackers`` (``SORTTracker``,
  ``ByteTrackTracker``; supervision 0.26+ no longer ships ByteTrack), defaults with
  the sequence's frame rate;
- ``norfair`` (what Frigate uses): IoU distance, match at IoU >= 0.3, a one-second
  hit counter, confirmation on the second hit.

The peers pin conflicting NumPy versions (norfair and sort-track's scipy need
NumPy 1, Roboflow trackers NumPy 2), so they run in two virtual environments this
script creates under ``benchmarks/.venv-peers/`` (``np1``, ``np2``; git-ignored) with
``python -m venv`` and pip, through ``benchmarks/peers/run_peers.py``; tracks come
back as MOT text files. Only the trackers' ``update`` calls (and, for ours, the line
counters; ``ours-no-counters`` times the tracker alone) are timed, over pre-built
per-frame inputs, in process CPU time (the machine is shared: wall time would count
other users' load), with one BLAS thread. All trackers run alternately for
``--rounds`` rounds; each one's frames/s is its best round over all six sequences,
and the ratios to SORT in the same run are what count.

Accuracy: ``motmetrics`` (MOTA, IDF1, id switches) on the four sequences with ground
truth, evaluated in the NumPy 1 environment (motmetrics 1.4.0 calls ``np.asfarray``,
removed in NumPy 2) by ``benchmarks/peers/evaluate.py``; IoU >= 0.5 matching; gt rows
with conf 0 ignored.

    .venv/bin/python benchmarks/bench_tracker.py [--rounds 5] [--tracks DIR]
        [--json benchmarks/results/tracker.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mot15

from flowfleet.agent.counting import LineCounter, count_lines
from flowfleet.agent.detections import Detections
from flowfleet.agent.tracker import LOST_SECONDS, ByteTracker, TrackerConfig

HERE = Path(__file__).resolve().parent
PEERS_ROOT = HERE / ".venv-peers"
NAMES = ("person",)

# Peer environments: pinned versions (looked up with `pip index versions`, 2026-11).
# Every pip call in an environment is held to its constraints, so a later package
# (motmetrics -> pandas) cannot pull NumPy 2 into the NumPy 1 environment.
PEER_ENVS: dict[str, dict[str, list[str]]] = {
    "np1": {
        "constraints": ["numpy<2"],
        "packages": ["sort-track==0.0.8", "norfair==2.3.0", "motmetrics==1.4.0"],
        "trackers": ["sort", "norfair"],
    },
    "np2": {
        "constraints": ["numpy>=2"],
        "packages": ["trackers==2.6.1"],
        "trackers": ["trackers-sort", "trackers-bytetrack"],
    },
}
PEERS = [t for spec in PEER_ENVS.values() for t in spec["trackers"]]

# One BLAS thread for the peers (ours makes no BLAS call): trackers handle one frame
# after another, and CPU time would otherwise also count BLAS threads spinning beside
# the real work (SORT's filterpy matrix products made its rate jump between two
# levels from round to round).
SINGLE_THREAD = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}

# A stricter first stage for MOT15's ACF detections: only detections scored 0.7 or
# more join it (the rest can still rescue a tracked track in the second stage), so
# fewer false positives extend tracks. Best MOTA here, but it counts worse on the
# lines of bench_count_accuracy.py than the defaults, so both are reported.
MOT15_PRESET = {"high_thresh": 0.7}
OURS = {"ours": {}, "ours-mot15": MOT15_PRESET}
# Timed only (same tracks as "ours"): the tracker without the line counters.
TRACKER_ONLY = "ours-no-counters"


def peer_python(env: str) -> Path:
    return PEERS_ROOT / env / "bin" / "python"


def ensure_peer_envs() -> None:
    """Create / refresh the peers' venvs, with a progress bar over the installs."""
    steps = []
    for env, spec in PEER_ENVS.items():
        stamp = PEERS_ROOT / env / "flowfleet-requirements.txt"
        wanted = json.dumps({k: spec[k] for k in ("constraints", "packages")}) + "\n"
        if not (stamp.is_file() and stamp.read_text() == wanted and peer_python(env).exists()):
            steps.append((env, spec["packages"], stamp, wanted))
    if not steps:
        return
    total = sum(len(p) + 1 for _, p, _, _ in steps)
    bar = tqdm(total=total, desc="peers venv", unit="step", file=sys.stderr)
    for env, packages, stamp, wanted in steps:
        env_dir = PEERS_ROOT / env
        log_path = PEERS_ROOT / f"{env}-install.log"
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        bar.set_postfix_str(f"{env}: python -m venv")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env_dir)], check=True)
        constraints = env_dir / "constraints.txt"
        constraints.write_text("\n".join(PEER_ENVS[env]["constraints"]) + "\n")
        bar.update(1)
        with open(log_path, "w") as log:
            for pkg in packages:
                bar.set_postfix_str(f"{env}: pip install {pkg}")
                proc = subprocess.Popen(
                    [
                        *(str(peer_python(env)), "-m", "pip", "install"),
                        *("--progress-bar", "off", "-c", str(constraints), pkg),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if line.startswith(("Collecting", "Downloading", "Installing", "Building")):
                        bar.set_postfix_str(f"{env}: {line.strip()[:70]}")
                if proc.wait() != 0:
                    bar.close()
                    raise SystemExit(f"pip install {pkg} failed in {env_dir}; see {log_path}")
                bar.update(1)
        stamp.write_text(wanted)
    bar.close()


def load_inputs(root: Path) -> dict[str, list[Detections]]:
    return {
        name: [
            Detections(b, s, np.zeros(len(s), np.int32), names=NAMES)
            for b, s in mot15.load_detections(root, name)
        ]
        for name in mot15.SEQUENCES
    }


def make_lines(name: str) -> list[LineCounter]:
    from bench_count_accuracy import LINES

    return [LineCounter(ln, a, b) for ln, a, b in LINES[name]]


def run_ours(frames: list[Detections], name: str, overrides: dict, lines: bool = True):
    """(seconds for tracker + line counters, MOT rows, origin rows) on one sequence.

    The counters are fed as the agent's pipeline feeds them: each new track's
    starting side from ``confirmed_origins()``, then the frame's tracks. The origin
    rows (frame, id, box where the track was first detected) let
    ``bench_count_accuracy.py`` count from the written files as the agent counts.
    """
    seq = mot15.SEQUENCES[name]
    tracker = ByteTracker(TrackerConfig.for_fps(seq.fps, **overrides))
    counters = make_lines(name) if lines else []
    fps = seq.fps
    outs, origins = [], []
    start = time.process_time()
    for i, dets in enumerate(frames):
        tracked = tracker.update(dets)
        born = tracker.confirmed_origins()
        count_lines(counters, tracked, born, i / fps)
        outs.append(tracked)
        if born is not None:
            origins.append((i, born))
    elapsed = time.process_time() - start
    return elapsed, _mot_rows(enumerate(outs)), _mot_rows(origins)


def _mot_rows(frames) -> list[tuple[int, int, np.ndarray]]:
    """(frame number from 1, track id, xyxy) rows of (frame index, Detections) pairs."""
    return [
        (i + 1, int(t), b) for i, o in frames for t, b in zip(o.tracker_id, o.xyxy, strict=True)
    ]


def run_peers(env: str, root: Path, out: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    job = {
        "trackers": PEER_ENVS[env]["trackers"],
        "rounds": rounds,
        "out": str(out),
        "mot15": str(root),
        "sequences": list(mot15.SEQUENCES),
    }
    job_path = out / f"job-{env}.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(
        [str(peer_python(env)), str(HERE / "peers" / "run_peers.py"), str(job_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **SINGLE_THREAD},
    )
    if proc.returncode != 0:
        raise SystemExit(f"peer runner failed in {env}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def evaluate(root: Path, track_dir: Path, trackers: list[str]) -> dict:
    job = {
        "gt": {n: str(root / n / "gt.txt") for n in mot15.GT_SEQUENCES},
        "hyp": {
            t: {n: str(track_dir / t / f"{n}.txt") for n in mot15.GT_SEQUENCES} for t in trackers
        },
    }
    job_path = track_dir / "eval-job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(
        [str(peer_python("np1")), str(HERE / "peers" / "evaluate.py"), str(job_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"motmetrics evaluation failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def produce_tracks(root: Path, track_dir: Path, rounds: int, progress: bool = True) -> dict:
    """Run every tracker ``rounds`` times (alternating); write tracks; return timings.

    Returns {tracker: {sequence: [seconds per round]}}.
    """
    inputs = load_inputs(root)
    labels = [*OURS, TRACKER_ONLY, *PEERS]
    times: dict[str, dict[str, list[float]]] = {t: {n: [] for n in inputs} for t in labels}
    bar = tqdm(
        total=rounds * (len(OURS) + 1 + len(PEER_ENVS)),
        desc="trackers",
        unit="run",
        file=sys.stderr,
        disable=not progress,
    )
    for name, frames in inputs.items():  # warm-up: imports, first-call caches
        for overrides in OURS.values():
            run_ours(frames[:20], name, overrides)
    for r in range(rounds):
        for label, overrides in OURS.items():
            bar.set_postfix_str(f"round {r + 1}: {label}")
            for name, frames in inputs.items():
                elapsed, rows, origins = run_ours(frames, name, overrides)
                times[label][name].append(elapsed)
                if r == 0:
                    mot15.write_tracks(track_dir / label / f"{name}.txt", rows)
                    mot15.write_tracks(track_dir / label / f"{name}.origins.txt", origins)
            bar.update(1)
        bar.set_postfix_str(f"round {r + 1}: {TRACKER_ONLY}")
        for name, frames in inputs.items():
            times[TRACKER_ONLY][name].append(run_ours(frames, name, {}, lines=False)[0])
        bar.update(1)
        for env in PEER_ENVS:
            bar.set_postfix_str(f"round {r + 1}: {env} peers")
            for tracker, per_seq in run_peers(env, root, track_dir, 1).items():
                for name, seconds in per_seq.items():
                    times[tracker][name] += seconds
            bar.update(1)
    bar.close()
    return times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "tracker.json")
    ap.add_argument("--tracks", type=Path, default=None, help="keep the MOT track files here")
    args = ap.parse_args(argv)

    root = mot15.mot15_dir()
    ensure_peer_envs()
    with tempfile.TemporaryDirectory() as tmp:
        track_dir = args.tracks or Path(tmp)
        times = produce_tracks(root, track_dir, args.rounds)
        metrics = evaluate(root, track_dir, [*OURS, *PEERS])

    trackers = list(times)
    frames = {n: s.frames for n, s in mot15.SEQUENCES.items()}
    total_frames = sum(frames.values())
    speed: dict[str, dict] = {}
    for t in trackers:
        per_seq = {n: frames[n] / min(v) for n, v in times[t].items()}
        rounds_total = [sum(times[t][n][r] for n in frames) for r in range(args.rounds)]
        speed[t] = {"per_sequence_fps": per_seq, "overall_fps": total_frames / min(rounds_total)}
    ref = speed["sort"]["overall_fps"]
    for t in trackers:
        speed[t]["vs_sort"] = speed[t]["overall_fps"] / ref

    print_tables(trackers, metrics, speed)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "rounds": args.rounds,
        "ours_config": {
            label: vars(TrackerConfig.for_fps(25, **o))
            | {"lost_buffer": f"{LOST_SECONDS:g} s of frames"}
            for label, o in OURS.items()
        },
        "peer_packages": {
            env: spec["constraints"] + spec["packages"] for env, spec in PEER_ENVS.items()
        },
        "metrics": metrics,
        "speed": speed,
        "seconds": times,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")
    return 0


def print_tables(trackers: list[str], metrics: dict, speed: dict) -> None:
    seqs = [*mot15.GT_SEQUENCES, "OVERALL"]
    print("\nAccuracy (motmetrics, IoU >= 0.5): MOTA / IDF1 / ID switches")
    print(f"{'tracker':20s}" + "".join(f"{s:>24s}" for s in seqs))
    for t in [t for t in trackers if t in metrics]:
        m = metrics[t]
        cells = [f"{m[s]['mota']:.3f} / {m[s]['idf1']:.3f} / {m[s]['idsw']:3d}" for s in seqs]
        print(f"{t:20s}" + "".join(f"{c:>24s}" for c in cells))
    print(
        "\nSpeed (frames/s of CPU time, best of rounds; peers: update() only; ours: tracker"
        " + line counters, ours-no-counters: tracker only)"
    )
    names = list(mot15.SEQUENCES)
    print(
        f"{'tracker':20s}"
        + "".join(f"{n[:14]:>15s}" for n in names)
        + f"{'overall':>10s}{'x SORT':>8s}"
    )
    for t in trackers:
        s = speed[t]
        print(
            f"{t:20s}"
            + "".join(f"{s['per_sequence_fps'][n]:15.0f}" for n in names)
            + f"{s['overall_fps']:10.0f}{s['vs_sort']:8.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
