"""`flowfleet` command line: count, agent, registry, demo, models.

Exit codes: 0 success, 1 runtime failure (unusable model or video, broker down),
2 bad usage or configuration. Errors are one line on stderr, never a traceback
(set FLOWFLEET_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from flowfleet import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` so services shut down cleanly."""

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- count ---------------------------------------------------------------------------


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
    if not data["lines"] and not data["zones"]:
        print("no --line or --zone given: nothing to count")
    for name, line in data["lines"].items():
        total = line["total"]
        print(f"line {name}: in {total['in']}, out {total['out']}")
        for cls, c in line["classes"].items():
            if c["in"] or c["out"]:
                print(f"  {cls:<12} in {c['in']:>5}  out {c['out']:>5}")
    for name, zone in data["zones"].items():
        print(f"zone {name}:")
        for cls, z in zone["classes"].items():
            if z["entries"] or z["peak_occupancy"]:
                dwell = "-" if z["mean_dwell_s"] is None else f"{z['mean_dwell_s']:.1f} s"
                print(
                    f"  {cls:<12} entries {z['entries']:>4}  peak {z['peak_occupancy']:>3}  "
                    f"mean dwell {dwell}"
                )


# -- agent -----------------------------------------------------------------------------


def _load_agent_config(path: str):
    from flowfleet.agent.config import ConfigError, load_agent_config

    try:
        return load_agent_config(path)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def cmd_agent(args: argparse.Namespace) -> int:
    config = _load_agent_config(args.config)
    if args.action == "check-config":
        print(f"{args.config}: ok ({len(config.cameras)} camera(s), device {config.device_id})")
        return 0
    from flowfleet.agent.service import AgentService

    _setup_logging(args.verbose)
    service = AgentService(config)
    stop = threading.Event()
    _stop_on_signals(stop)
    service.start()
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


# -- registry --------------------------------------------------------------------------


def cmd_registry(args: argparse.Namespace) -> int:
    try:
        from flowfleet.registry.service import run_registry
    except ImportError as exc:
        raise CliError(
            f"the registry needs its extras: pip install 'flowfleet[registry]' ({exc})"
        ) from None
    from flowfleet.mqtt import BrokerAddress

    _setup_logging(args.verbose)
    stop = threading.Event()
    _stop_on_signals(stop)
    run_registry(
        args.db,
        BrokerAddress(args.broker_host, args.broker_port),
        args.http_host,
        args.http_port,
        args.topic_root,
        stop,
    )
    return 0


# -- demo --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from flowfleet.demo import DemoError, run_demo

    _setup_logging(args.verbose)
    try:
        run_demo(
            workdir=Path(args.workdir),
            http_port=args.http_port,
            broker=args.broker,
            bin_seconds=args.bin_seconds,
            duration=args.duration,
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None
    return 0


# -- models ------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from flowfleet.models.catalog import CatalogError, find_local, load_catalog, resolve

    if args.action == "list":
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
    try:
        path = resolve(args.name, download=True)
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowfleet",
        description="Count people and vehicles at the edge and run the fleet that does it.",
    )
    parser.add_argument("--version", action="version", version=f"flowfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "count",
        help="count line crossings and zone visits in a video file",
        description=(
            "Count a whole video file as fast as possible and print totals. Coordinates "
            "are source-image pixels. A line A->B counts 'in' for objects crossing from "
            "its left to its right as seen on the image (for a line drawn left to right, "
            "moving down the image is 'in')."
        ),
    )
    p.add_argument("video", help="video file")
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
    p.add_argument("--json", action="store_true", help="print the totals as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("agent", help="run the device agent (or check its config)")
    p.add_argument("action", nargs="?", default="run", choices=["run", "check-config"])
    p.add_argument("--config", default="/etc/flowfleet/agent.toml", help="agent TOML file")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("registry", help="run the registry: MQTT ingest and web UI")
    p.add_argument("--db", default="flowfleet-registry.sqlite", help="SQLite database file")
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, default=1883)
    p.add_argument("--topic-root", default="flowfleet/v1")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser(
        "demo",
        help="broker, registry and one agent per sample video, all local",
    )
    p.add_argument("--workdir", default=".demo", help="where state and logs go (default .demo)")
    p.add_argument("--http-port", type=int, default=8080, help="registry web port (default 8080)")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this broker instead of starting one")
    p.add_argument("--bin-seconds", type=float, default=10.0, help="count bin length (default 10)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="the model catalog: list, fetch")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", help="catalog name (for fetch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "models" and args.action == "fetch" and not args.name:
        parser.error("models fetch: give a model name (see: flowfleet models list)")
    try:
        return args.func(args)
    except CliError as exc:
        print(f"flowfleet {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("FLOWFLEET_DEBUG"):
            raise
        print(f"flowfleet {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
