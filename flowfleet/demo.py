"""`flowfleet demo`: a whole fleet on one machine.

Starts a private Mosquitto (unless ``--broker`` names one), the registry, and one
agent process per sample video in $FLOWFLEET_DATA/videos, each looping its video
in real time like a camera, with lines (and zones) drawn where they make sense for
that scene. Ctrl-C (or SIGTERM) stops the agents, the registry and the broker.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flowfleet.cliutil import CliError, setup_logging
from flowfleet.data import videos_dir

log = logging.getLogger("flowfleet.demo")


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class Scene:
    """Where to count in one sample video (source-image pixels)."""

    device: str
    camera: str
    lines: tuple[tuple[str, tuple[tuple[float, float], tuple[float, float]]], ...]
    zones: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    fps_cap: float = 10.0


# Lines follow each scene's traffic: cars cross the lane of the top-down parking
# view vertically; people walk from the camera up to a table ("approach", in) and
# leave to the right ("leave", out); highway traffic moves right to left ("in").
SCENES: dict[str, Scene] = {
    "car-detection.mp4": Scene(
        device="demo-parking",
        camera="lane",
        lines=(("midline", ((0, 216), (768, 216))),),
    ),
    "one-by-one-person-detection.mp4": Scene(
        device="demo-lobby",
        camera="table",
        lines=(("approach", ((768, 415), (0, 415))), ("leave", ((620, 300), (620, 432)))),
        zones=(("table", ((300, 300), (640, 300), (640, 432), (300, 432))),),
    ),
    "traffic_frames.mp4": Scene(
        device="demo-highway",
        camera="road",
        lines=(("gantry", ((480, 280), (480, 540))),),
        fps_cap=30.0,
    ),
}


def _agent_toml(
    scene: Scene, video: Path, model: Path, state: Path, host: str, port: int, bin_seconds: float
) -> str:
    def pts(points) -> str:
        return "[" + ", ".join(f"[{x}, {y}]" for x, y in points) + "]"

    out = [
        f'device_id = "{scene.device}"',
        f'state_dir = "{state}"',
        f"bin_seconds = {bin_seconds}",
        f"health_seconds = {max(bin_seconds, 5.0)}",
        "",
        "[broker]",
        f'host = "{host}"',
        f"port = {port}",
        "",
        "[[cameras]]",
        f'name = "{scene.camera}"',
        f'source = "{video}"',
        f'model = "{model}"',
        "loop = true",
        "realtime = true",
        f"fps_cap = {scene.fps_cap}",
        "threads = 1",
    ]
    for name, points in scene.lines:
        out += ["", "[[cameras.lines]]", f'name = "{name}"', f"points = {pts(points)}"]
    for name, points in scene.zones:
        out += ["", "[[cameras.zones]]", f'name = "{name}"', f"points = {pts(points)}"]
    return "\n".join(out) + "\n"


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path.exists() else ""
            raise DemoError(f"the registry exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DemoError(f"the registry did not answer on {url} within {timeout:.0f}s")


def run_demo(
    workdir: Path,
    http_port: int = 8080,
    broker: str | None = None,
    bin_seconds: float = 10.0,
    duration: float | None = None,
) -> None:
    from flowfleet.models.catalog import CatalogError, default_entry, resolve
    from flowfleet.provisioning.mosquitto import Broker, BrokerError

    videos = videos_dir()
    found = [(name, scene) for name, scene in SCENES.items() if (videos / name).is_file()]
    if not found:
        raise DemoError(
            f"no sample videos in {videos} (expected {', '.join(SCENES)}); set FLOWFLEET_DATA"
        )
    try:
        model = resolve(default_entry().name)
    except CatalogError as exc:
        raise DemoError(str(exc)) from None

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    own_broker = None
    if broker:
        host, _, port_s = broker.rpartition(":")
        if not host or not port_s.isdigit():
            raise DemoError(f"--broker {broker!r}: expected HOST:PORT")
        port = int(port_s)
    else:
        try:
            own_broker = Broker(workdir / "broker").start()
        except BrokerError as exc:
            raise DemoError(str(exc)) from None
        host, port = own_broker.host, own_broker.port
        log.info("mosquitto listening on %s:%d (log: %s)", host, port, workdir / "broker")

    procs: list[tuple[str, subprocess.Popen]] = []
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        reg_log = workdir / "registry.log"
        reg = _spawn(
            [
                "registry",
                "--db",
                str(workdir / "registry.sqlite"),
                "--broker-host",
                host,
                "--broker-port",
                str(port),
                "--http-port",
                str(http_port),
            ],
            reg_log,
        )
        procs.append(("registry", reg))
        url = f"http://127.0.0.1:{http_port}/"
        _wait_http(url + "healthz", 30, reg, reg_log)
        for name, scene in found:
            conf = workdir / f"{scene.device}.toml"
            conf.write_text(
                _agent_toml(
                    scene, videos / name, model, workdir / scene.device, host, port, bin_seconds
                )
            )
            procs.append(
                (
                    scene.device,
                    _spawn(["agent", "--config", str(conf)], workdir / f"{scene.device}.log"),
                )
            )
            log.info("agent %s counting %s (config %s)", scene.device, name, conf)
        print(
            f"\nflowfleet demo running: open {url}\n"
            f"  {len(found)} agents, bins every {bin_seconds:g} s, logs in {workdir}\n"
            "  press Ctrl-C to stop\n",
            flush=True,
        )
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.wait(1.0):
            for name, proc in procs:
                if proc.poll() is not None:
                    raise DemoError(
                        f"{name} exited with {proc.returncode}; see {workdir}/{name}.log"
                    )
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        # Agents first, so their last bins reach the registry before it stops.
        for name, proc in reversed(procs):
            _terminate(name, proc)
        if own_broker:
            own_broker.stop()
        log.info("demo stopped")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "flowfleet.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: the terminal's Ctrl-C goes to the demo, which then
            # stops children in order instead of all dying at once.
            start_new_session=True,
        )


def _terminate(name: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", name, timeout)
            proc.kill()
            proc.wait()


def register(sub) -> None:
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


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
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
