"""`flowfleet count` and `flowfleet agent`: the device side of the command line."""

from __future__ import annotations

import argparse
import json
import threading

from flowfleet.cliutil import (
    EXIT_USAGE,
    CliError,
    first_problem,
    setup_logging,
    stop_on_signals,
)


def register(sub) -> None:
    p = sub.add_parser(
        "count",
        help="count line crossings, zone visits and speeds in a video file",
        description=(
            "Count a whole video file (or image folder) as fast as possible and print "
            "totals per class and over all classes. Coordinates are source-image pixels. "
            "A line A->B counts 'in' for objects crossing from its left to its right as "
            "seen on the image (for a line drawn left to right, moving down the image is "
            "'in'). See docs/counting.md."
        ),
    )
    p.add_argument("video", help="video file, or a folder of images (see --fps)")
    p.add_argument("--model", help="model file (default: the catalog's default model)")
    p.add_argument("--labels", help="labels file (one per line, or a .pbtxt label map)")
    p.add_argument(
        "--line",
        action="append",
        default=[],
        metavar="NAME:x1,y1,x2,y2",
        help="a counting line (repeatable)",
    )
    p.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="NAME:x1,y1;x2,y2;...",
        help="a polygon zone, at least 3 points (repeatable)",
    )
    p.add_argument(
        "--classes",
        metavar="LIST",
        help="comma-separated classes to count, or 'all' (default: person, bicycle, car, "
        "motorcycle, bus, truck)",
    )
    p.add_argument(
        "--anchor",
        default="bottom_center",
        choices=["bottom_center", "center", "top_center"],
        help="box point that crosses lines / sits in zones (default: bottom_center)",
    )
    p.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    p.add_argument("--conf", type=float, default=0.1, help="lowest detection score (default 0.1)")
    p.add_argument(
        "--homography",
        metavar="x,y:X,Y;x,y:X,Y;x,y:X,Y;x,y:X,Y",
        help="measure speeds: 4 ground points, each image pixels : ground metres "
        "(no three on a line)",
    )
    p.add_argument(
        "--speed-window",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds each speed sample spans (default 1.0)",
    )
    p.add_argument(
        "--speed-min-samples",
        type=int,
        default=3,
        metavar="N",
        help="samples a track needs for a speed; fewer is 'insufficient samples' (default 3)",
    )
    p.add_argument(
        "--stationary",
        metavar="PX,S",
        help="leave out tracks that moved less than PX pixels over S seconds (parked "
        "cars), e.g. 10,30 (default: off)",
    )
    p.add_argument(
        "--tracker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tracker setting, e.g. lost_s=5 or new_track_thresh=0.5 (repeatable; the "
        "keys of an agent camera's [cameras.tracker] table, see docs/counting.md)",
    )
    p.add_argument(
        "--fps", type=float, default=10.0, help="frame rate of an image folder (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the totals as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print debug messages (the model runtime's own start-up lines among them)",
    )
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("agent", help="run the device agent, check its config, enroll or install it")
    _agent_options(p, suppress=False)
    p.set_defaults(func=cmd_agent)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (("run", "run the agent (the default)"), ("check-config", "validate")):
        a = actions.add_parser(name, help=text)
        _agent_options(a, suppress=True)
        a.set_defaults(func=cmd_agent)
    from flowfleet.agent.setup_cli import add_setup_actions

    add_setup_actions(actions)


def _agent_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--config and -v, on ``agent`` and again (SUPPRESS defaults) after its action."""
    p.add_argument(
        "--config",
        default=argparse.SUPPRESS if suppress else "/etc/flowfleet/agent.toml",
        help="agent TOML file",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False
    )


def _default_model() -> str:
    from flowfleet.models.catalog import CatalogError, default_entry, resolve

    try:
        return str(resolve(default_entry().name, download=False))
    except CatalogError as exc:
        raise CliError(f"--model not given and no default model available: {exc}", 2) from None


def cmd_count(args: argparse.Namespace) -> int:
    from flowfleet.agent.config import ConfigError, parse_line, parse_zone
    from flowfleet.agent.detectors.base import ModelError
    from flowfleet.agent.offline import count_video
    from flowfleet.agent.sources import SourceError

    try:
        lines = [parse_line(s) for s in args.line]
        zones = [parse_zone(s) for s in args.zone]
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    names = [s.name for s in lines] + [s.name for s in zones]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CliError(f"--line/--zone names must be unique: {', '.join(dupes)}", EXIT_USAGE)
    classes = _parse_classes(args.classes)
    speed = _parse_speed(args)
    stationary = _parse_stationary(args.stationary)
    tracker = _parse_tracker(args.tracker)
    if args.verbose:
        setup_logging(True)
    model = args.model or _default_model()
    try:
        report = count_video(
            args.video,
            model,
            lines=lines,
            zones=zones,
            classes=classes,
            labels=args.labels,
            anchor=args.anchor,
            threads=args.threads,
            conf_threshold=args.conf,
            progress=False if args.json or args.no_progress else None,
            speed=speed,
            stationary=stationary,
            fps=args.fps,
            tracker=tracker,
        )
    except (SourceError, ModelError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:  # unknown class names and the like
        raise CliError(f"--classes: {exc}", EXIT_USAGE) from None
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_report(data)
    return 0


def _parse_speed(args: argparse.Namespace):
    if args.homography is None:
        return None
    from pydantic import ValidationError

    from flowfleet.agent.speed import HomographyError, SpeedSpec, parse_homography

    try:
        homography = parse_homography(args.homography)
    except HomographyError as exc:
        raise CliError(f"--homography: {exc}", EXIT_USAGE) from None
    try:
        return SpeedSpec(
            homography=homography,
            window_s=args.speed_window,
            min_samples=args.speed_min_samples,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = {"window_s": "--speed-window", "min_samples": "--speed-min-samples"}
        raise CliError(
            f"{flag.get(err['loc'][0], '--homography')}: {err['msg']}", EXIT_USAGE
        ) from None


def _parse_stationary(value: str | None):
    if value is None:
        return None
    from pydantic import ValidationError

    from flowfleet.agent.counting import StationarySpec

    try:
        px, s = (float(v) for v in value.split(","))
        return StationarySpec(min_move_px=px, window_s=s)
    except (ValueError, ValidationError):
        raise CliError(
            f"--stationary {value!r}: expected PX,S (pixels > 0, seconds in (0, 3600])",
            EXIT_USAGE,
        ) from None


def _parse_tracker(items: list[str]):
    """``KEY=VALUE`` pairs -> a validated `TrackerSpec` (None when none are given)."""
    if not items:
        return None
    from pydantic import ValidationError

    from flowfleet.agent.tracker import TrackerSpec

    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise CliError(f"--tracker {item!r}: expected KEY=VALUE, e.g. lost_s=5", EXIT_USAGE)
        if key in values:
            raise CliError(f"--tracker {key}: given twice", EXIT_USAGE)
        values[key] = value.strip()
    try:
        return TrackerSpec(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "extra_forbidden":
            known = ", ".join(TrackerSpec.model_fields)
            msg = f"--tracker {err['loc'][0]}: unknown setting (known: {known})"
        else:
            msg = first_problem(exc, "--tracker")
        raise CliError(msg, EXIT_USAGE) from None


def _parse_classes(value: str | None):
    if value is None:
        return None
    if value.strip() == "all":
        return "all"
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise CliError("--classes: give class names separated by commas, or 'all'", EXIT_USAGE)
    return tuple(names)


def _print_report(data: dict) -> None:
    print(
        f"{data['video']}: {data['frames']} frames ({data['video_seconds']:.1f} s of video) "
        f"in {data['elapsed_s']:.1f} s, {data['fps']:.1f} frames/s"
    )
    _print_scores(data["scores"])
    _print_thresholds(data["thresholds"])
    if not data["lines"] and not data["zones"] and "speed" not in data:
        print("no --line, --zone or --homography given: nothing to count")
    for name, line in data["lines"].items():
        total = line["total"]
        print(f"line {name}: in {total['in']}, out {total['out']}")
        rows = [(cls, c) for cls, c in line["classes"].items() if c["in"] or c["out"]]
        for cls, c in [*rows, ("total", total)] if len(rows) > 1 else rows:
            print(f"  {cls:<12} in {c['in']:>5}  out {c['out']:>5}")
    for name, zone in data["zones"].items():
        total = zone.get("total")
        if total:
            print(
                f"zone {name}: entries {total['entries']}, exits {total['exits']}, "
                f"peak {total['peak_occupancy']}"
            )
        else:
            print(f"zone {name}:")
        rows = [(c, z) for c, z in zone["classes"].items() if z["entries"] or z["peak_occupancy"]]
        for cls, z in [*rows, ("total", total)] if len(rows) > 1 and total else rows:
            print(
                f"  {cls:<12} entries {z['entries']:>4}  peak {z['peak_occupancy']:>3}  "
                f"dwell {_dwell(z)}"
            )
    if "speed" in data:
        _print_speeds(data["speed"])


def _print_scores(scores: dict) -> None:
    parts = []
    for kind, label in (("detections", "all"), ("tracked", "on tracked objects")):
        s = scores[kind]
        parts.append(
            f"{label} p10 {s['p10']:.2f}, p50 {s['p50']:.2f}, p90 {s['p90']:.2f} (n {s['n']})"
            if s["n"]
            else f"{label}: none"
        )
    print("detection scores: " + "; ".join(parts))


def _print_thresholds(t: dict) -> None:
    values = ", ".join(
        f"{k} {t[k]:.2f}"
        for k in ("high_thresh", "new_track_thresh", "strong_birth_thresh")
        if k in t
    )
    if t.get("mode") == "auto":
        median = t.get("median_score")
        source = (
            f"from the median score {median:.2f} of {t['samples']} persistent detections"
            if median is not None
            else f"defaults: only {t['samples']} persistent detections"
        )
        print(f"tracker thresholds (auto, {source}): {values}")
    elif t.get("mode") == "config":
        print(f"tracker thresholds (set): {values}")


def _secs(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _dwell(z: dict) -> str:
    text = f"mean {_secs(z['mean_dwell_s'])}"
    if z.get("p50_dwell_s") is not None:
        text += f", p50 {_secs(z['p50_dwell_s'])}, p90 {_secs(z['p90_dwell_s'])}"
    return text


def _print_speeds(speed: dict) -> None:
    print(f"speed (km/h, {speed['window_s']:g} s window):")
    scopes = [("all tracks", speed["tracks"])]
    scopes += [(f"line {name}", entry) for name, entry in speed["lines"].items()]
    for scope, entry in scopes:
        classes = entry.get("classes", {})
        rows = list(classes.items())
        if len(rows) > 1:
            rows.append(("total", entry["total"]))
        if not rows:
            print(f"  {scope:<16} no tracks")
        for cls, s in rows:
            if s["n"]:
                text = f"n {s['n']:>4}  mean {s['mean_kmh']:6.1f}  p85 {s['p85_kmh']:6.1f}"
            else:
                text = "n    0"
            if s["insufficient"]:
                text += f"  ({s['insufficient']} with insufficient samples)"
            print(f"  {scope:<16} {cls:<12} {text}")


def _load_agent_config(path: str):
    from flowfleet.agent.config import ConfigError, load_agent_config

    try:
        return load_agent_config(path)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def cmd_agent(args: argparse.Namespace) -> int:
    config = _load_agent_config(args.config)
    if (args.action or "run") == "check-config":
        print(f"{args.config}: ok ({len(config.cameras)} camera(s), device {config.device_id})")
        return 0
    from flowfleet.agent.config import ConfigError
    from flowfleet.agent.metrics import MetricsUnavailable
    from flowfleet.agent.service import AgentService

    setup_logging(args.verbose)
    try:
        service = AgentService(config)
    except ConfigError as exc:
        raise CliError(f"{args.config}: {exc}", EXIT_USAGE) from None
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        service.start()
    except MetricsUnavailable as exc:
        service.stop(drain_timeout=0)
        raise CliError(str(exc), EXIT_USAGE) from None
    except OSError as exc:  # the metrics port is taken, most likely
        service.stop(drain_timeout=0)
        raise CliError(f"cannot start the agent: {exc}") from None
    try:
        stop.wait()
    finally:
        service.stop()
    return 0
