"""`flowfleet models`: the model catalog and model tools.

    flowfleet models list [--json]
    flowfleet models fetch NAME
    flowfleet models inspect FILE [--labels FILE] [--json]
    flowfleet models bench FILE [--threads N] [--seconds S] [--warmup N] [--json]
    flowfleet models quantize FLOAT.onnx --calib VIDEO|DIR -o OUT.onnx [...]

Exit codes: 0 success, 1 an unusable model/video file, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from flowfleet.cliutil import EXIT_USAGE, CliError


def _number(convert, noun: str, ok, bound: str):
    """An argparse type: ``convert`` the text, then require ``ok(value)``."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{bound}, got {v}")
        return v

    return parse


_positive_int = _number(int, "a whole number", lambda v: v >= 1, "must be at least 1")
_nonneg_int = _number(int, "a whole number", lambda v: v >= 0, "must be 0 or more")
_positive_float = _number(float, "a number", lambda v: v > 0, "must be greater than 0")


def register(sub) -> None:
    p = sub.add_parser(
        "models",
        help="the model catalog and tools: list, fetch, inspect, bench, quantize",
        description="The model catalog (list, fetch) and model tools (inspect, bench, quantize).",
    )
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    q = msub.add_parser("list", help="catalog models and where they are found")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = msub.add_parser("fetch", help="download a catalog model and verify its sha256")
    q.add_argument("name", nargs="?", help="catalog name (see: flowfleet models list)")
    q.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_fetch)

    q = msub.add_parser(
        "inspect",
        help="runtime, tensors, quantisation, labels and sha256 of a model file",
        description="Describe a TFLite, ONNX or Edge Impulse .eim model file.",
    )
    q.add_argument("file", help="model file")
    q.add_argument("--labels", help="label file to check against the model")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_inspect)

    q = msub.add_parser(
        "bench",
        help="raw model invoke rate (no pre/post-processing), after a warm-up",
        description="Measure a model's raw invoke rate: warm-up runs, then invoke for "
        "--seconds and report invokes/s and latency percentiles.",
    )
    q.add_argument("file", help="model file")
    q.add_argument("--threads", type=_positive_int, default=2, help="CPU threads (default 2)")
    q.add_argument(
        "--seconds", type=_positive_float, default=5.0, help="timed duration (default 5)"
    )
    q.add_argument("--warmup", type=_nonneg_int, default=3, help="untimed runs first (default 3)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_bench)

    q = msub.add_parser(
        "quantize",
        help="static int8 (QDQ) quantisation of a float ONNX model with calibration frames",
        description="Quantise a float ONNX YOLO model to static int8 QDQ with ONNX Runtime, "
        "calibrating on frames sampled from a video or an image folder, then report how "
        "well its detections agree with the float model's on held-out frames.",
    )
    q.add_argument("file", help="float ONNX model")
    q.add_argument(
        "--calib", required=True, help="video file or image folder to sample frames from"
    )
    q.add_argument("-o", "--output", required=True, help="quantised model to write (.onnx)")
    q.add_argument(
        "--frames", type=_positive_int, default=32, help="calibration frames (default 32)"
    )
    q.add_argument(
        "--holdout", type=_nonneg_int, default=8, help="held-out frames for agreement (default 8)"
    )
    q.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="calibration method (default minmax)",
    )
    q.add_argument("--per-channel", action="store_true", help="per-channel weight quantisation")
    q.add_argument("--conf", type=float, default=0.25, help="score threshold for agreement")
    q.add_argument("--threads", type=_positive_int, default=2, help="CPU threads (default 2)")
    q.add_argument("--force", action="store_true", help="overwrite the output file")
    q.add_argument("--json", action="store_true", help="machine-readable report")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)


def cmd_list(args: argparse.Namespace) -> int:
    from flowfleet.models.catalog import find_local, load_catalog

    rows = []
    for entry in load_catalog().values():
        local = find_local(entry)
        rows.append(
            {
                "name": entry.name,
                "file": entry.file,
                "runtime": entry.runtime,
                "default": entry.default,
                "local": str(local) if local else None,
                "sha256": entry.sha256,
                "description": entry.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            mark = "*" if r["default"] else " "
            where = r["local"] or "not downloaded"
            print(f"{mark} {r['name']:<24} {r['runtime']:<7} {where}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from flowfleet.models.catalog import CatalogError, resolve

    if not args.name:
        raise CliError("give a model name (see: flowfleet models list)", EXIT_USAGE)
    try:
        path = resolve(args.name, download=True)
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Kept for callers of the old single-function entry point."""
    return args.func(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from flowfleet.agent.detectors import ModelError
    from flowfleet.models.tools import format_inspect, inspect_model

    try:
        info = inspect_model(args.file, labels=args.labels)
    except ModelError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _progress_bar(total: float, desc: str, enabled: bool, unit: str = "s"):
    """A tqdm bar on stderr when it is a terminal (and not disabled), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    from flowfleet.agent.detectors import ModelError
    from flowfleet.models.tools import bench_model

    bar = _progress_bar(round(args.seconds, 1), "bench", not args.no_progress)
    state = {"shown": 0.0}

    def progress(elapsed: float) -> None:
        if bar is not None:
            now = min(round(elapsed, 1), bar.total)
            bar.update(now - state["shown"])
            state["shown"] = now

    try:
        result = bench_model(
            args.file,
            threads=args.threads,
            seconds=args.seconds,
            warmup=args.warmup,
            progress=progress,
        )
    except ModelError as exc:
        raise CliError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        prov = f" [{', '.join(result['providers'])}]" if result.get("providers") else ""
        print(
            f"{result['file']}: {result['runtime']}{prov}, {result['threads']} threads: "
            f"{result['invokes_per_s']:.1f} invokes/s over {result['runs']} runs "
            f"({result['seconds']:.1f} s after {result['warmup']} warm-up)\n"
            f"latency ms: mean {result['ms_mean']:.1f}  median {result['ms_median']:.1f}  "
            f"p90 {result['ms_p90']:.1f}  min {result['ms_min']:.1f}"
        )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from flowfleet.agent.detectors import ModelError
    from flowfleet.models.quantize import QuantizeError, format_report, quantize_onnx

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(
            total=args.frames, desc="calibrating", unit="frame", leave=False, file=sys.stderr
        )
    try:
        report = quantize_onnx(
            args.file,
            args.output,
            calib=args.calib,
            frames=args.frames,
            holdout=args.holdout,
            method=args.method,
            per_channel=args.per_channel,
            conf_threshold=args.conf,
            threads=args.threads,
            overwrite=args.force,
            progress=(lambda n=1: bar.update(n)) if bar is not None else None,
        )
    except QuantizeError as exc:
        raise CliError(str(exc), exc.code) from None
    except ModelError as exc:
        raise CliError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
