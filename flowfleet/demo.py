"""`flowfleet demo`: a whole fleet on one machine.

Starts a private Mosquitto (unless ``--broker`` names one), the registry, and one
agent process per sample video in $FLOWFLEET_DATA/videos, each looping its video
in real time like a camera, with lines (and zones) drawn where they make sense for
that scene. Unless ``--no-rollout``, a staged rollout then sends a really worse
model version (`flowfleet.demo_rollout`): the registry's drift judge takes the canary
back by itself and the rollout aborts before any other device moves. Ctrl-C (or
SIGTERM) stops the agents, the registry and the broker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flowfleet.cliutil import EXIT_USAGE, CliError, setup_logging
from flowfleet.data import videos_dir

log = logging.getLogger("flowfleet.demo")


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class Scene:
    """Where to count in one sample video (source-image pixels), and where the
    device stands (the registry's record: map location, group, tags)."""

    device: str
    name: str
    description: str
    group: str
    tags: tuple[str, ...]
    latitude: float
    longitude: float
    lines: tuple[tuple[str, tuple[tuple[float, float], tuple[float, float]]], ...]
    zones: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    fps_cap: float = 10.0


# Every demo device has one camera of this name, so one rollout covers the fleet
# (a rollout moves one camera name).
CAMERA = "main"
# The rollout's canary: the plaza has several people in every frame, so each short
# drift window holds enough detections for the judge (the lobby's one person may not).
CANARY = "demo-plaza"
# The "next version" the scripted rollout uploads: the first model with its input
# scaling broken (flowfleet/model_variants.py), written into the work folder. It loads
# and passes the agent's own gates; only the registry's drift judge can tell.
BAD_MODEL = "yolov8n_broken_input.tflite"
# Drift windows: the agents send one every DRIFT_SECONDS; the judge needs
# BASELINE_WINDOWS of the old model (MIN_DETECTIONS detections at least) before the
# rollout, then k of n (3 of 4) windows of the new one. Sized for a loaded machine
# (an agent may manage 1 frame a second): MIN_FRAMES per window is judged.
DRIFT_SECONDS = 6.0
BASELINE_WINDOWS = 5
MIN_DETECTIONS = 20
MIN_FRAMES = 4

# Lines follow each scene's traffic: cars cross the lane of the top-down parking
# view vertically; people walk from the camera up to a table ("approach", in) and
# leave to the right ("leave", out); on the plaza people walk along the road
# across the picture (left is "in" for both lines, drawn top to bottom), the
# "west" line near its left end, the "east" line right of the lamp post, where
# the walkway from the buildings (top right) joins. Checked on one pass of the 795
# frames: the agent's line counter fed MOT15's ground-truth tracks counts west
# in 7 / out 5, east in 15 / out 12 (tests/test_demo_scenes.py); `flowfleet count`
# with YOLOv8n int8 and the tracker counts west 6 / 4, east 14 / 10.
# Locations: around Reading (UK), where PETS 2009 was filmed.
SCENES: dict[str, Scene] = {
    "car-detection.mp4": Scene(
        device="demo-parking",
        name="Station car park",
        description="top-down view of a parking lane",
        group="outdoor",
        tags=("vehicles", "demo"),
        latitude=51.4589,
        longitude=-0.9717,
        lines=(("midline", ((0, 216), (768, 216))),),
    ),
    "one-by-one-person-detection.mp4": Scene(
        device="demo-lobby",
        name="Office lobby",
        description="people walk up to a table and leave",
        group="indoor",
        tags=("people", "demo"),
        latitude=51.4543,
        longitude=-0.9781,
        lines=(("approach", ((768, 415), (0, 415))), ("leave", ((620, 300), (620, 432)))),
        zones=(("table", ((300, 300), (640, 300), (640, 432), (300, 432))),),
    ),
    "pets09-s2l1.avi": Scene(
        device="demo-plaza",
        name="Campus plaza",
        description="a plaza seen from a roof, pedestrians in every direction (PETS 2009)",
        group="outdoor",
        tags=("people", "demo"),
        latitude=51.4414,
        longitude=-0.9418,
        lines=(("west", ((200, 190), (200, 340))), ("east", ((560, 160), (560, 470)))),
        zones=(("road", ((0, 190), (560, 150), (768, 280), (768, 480), (0, 260))),),
    ),
}


def _agent_toml(
    scene: Scene,
    video: Path,
    model: Path,
    state: Path,
    host: str,
    port: int,
    bin_seconds: float,
    registry_url: str,
    token_file: Path,
    keys_file: Path,
) -> str:
    def pts(points) -> str:
        return "[" + ", ".join(f"[{x}, {y}]" for x, y in points) + "]"

    out = [
        f'device_id = "{scene.device}"',
        f'state_dir = "{state}"',
        f"bin_seconds = {bin_seconds}",
        f"health_seconds = {max(bin_seconds, 5.0)}",
        f"drift_seconds = {DRIFT_SECONDS}  # drift windows for the registry's judge",
        "",
        "[broker]",
        f'host = "{host}"',
        f"port = {port}",
        "",
        "# Model updates: the registry's signed models, verified with its public keys.",
        "[registry]",
        f'url = "{registry_url}"',
        f'token_file = "{token_file}"',
        f'keys_file = "{keys_file}"',
        "# Three cameras share this machine's cores, so inference times vary more",
        "# than on a device of its own: a wider latency budget for the health gate.",
        "gate_latency_factor = 20.0",
        "# A shorter probation (default 100 frames), so a loaded machine's few frames a",
        "# second still activate a new model within the demo's time.",
        "probation_frames = 30",
        "",
        "[[cameras]]",
        f'name = "{CAMERA}"',
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


def _registry_toml(db: Path, host: str, port: int, http_port: int) -> str:
    return "\n".join(
        [
            "# Written by flowfleet demo: the demo registry's settings.",
            "[database]",
            f'url = "{db}"',
            "",
            "[broker]",
            f'host = "{host}"',
            f"port = {port}",
            "",
            "[http]",
            f"port = {http_port}",
            "",
            "[rollouts]",
            "tick_s = 1   # step rollouts every second, so the demo's waves move briskly",
            "",
            "# The drift judge, sized for the demo's short windows (default thresholds).",
            "# Latency is left out: three agents share this machine's cores.",
            "[drift]",
            "interval_s = 2",
            "settle_s = 1",
            f"min_detections = {MIN_DETECTIONS}",
            f"min_frames = {MIN_FRAMES}",
            f"baseline_windows = {BASELINE_WINDOWS}",
            'policies = ["distribution", "confidence_variance"]',
            "",
        ]
    )


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
    rollout: bool = True,
    rollout_delay: float = 30.0,
    soak_s: float = 120.0,
) -> None:
    """Run the whole demo until Ctrl-C, SIGTERM or ``duration`` (see the module docstring)."""
    from flowfleet.demo_setup import DeviceRecord, prepare_registry
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
    if broker:  # checked before anything is written
        host, _, port_s = broker.rpartition(":")
        if not host or not port_s.isdigit():
            raise DemoError(f"--broker {broker!r}: expected HOST:PORT")
        port = int(port_s)

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    next_model = None
    if rollout:  # the really worse version the scripted rollout uploads
        try:
            next_model = new_bad_model(model, workdir)
        except (ImportError, ValueError) as exc:
            log.warning("no scripted rollout: cannot make the bad model: %s", exc)
            rollout = False
    db_path = workdir / "registry.sqlite"
    url = f"http://127.0.0.1:{http_port}/"
    records = [
        DeviceRecord(s.device, s.name, s.description, s.group, s.tags, s.latitude, s.longitude)
        for _, s in found
    ]
    # The registry's own start-up lines (migrations, the key, deployments) belong to
    # its log, not to the demo's first screen.
    logging.getLogger("flowfleet.registry").setLevel(logging.WARNING)
    try:
        prepared = prepare_registry(str(db_path), workdir, records, CAMERA, model)
    except Exception as exc:  # a database or key problem: say where, stop here
        raise DemoError(f"preparing the demo registry in {workdir} failed: {exc}") from exc
    _write_private(workdir / "operator.token", prepared.operator_token)
    own_broker = None
    if not broker:
        try:
            own_broker = Broker(workdir / "broker").start()
        except BrokerError as exc:
            raise DemoError(str(exc)) from None
        host, port = own_broker.host, own_broker.port
        log.info("mosquitto listening on %s:%d (log: %s)", host, port, workdir / "broker")
    reg_config = workdir / "registry.toml"
    reg_config.write_text(_registry_toml(db_path, host, port, http_port))
    story = StorySettings(
        url=url,
        devices=[s.device for _, s in found],
        groups=sorted({s.group for _, s in found}),
        canary=CANARY if any(s.device == CANARY for _, s in found) else found[0][1].device,
        soak_s=soak_s,
        model=prepared.model,
        next_model=str(next_model or ""),
        registry_config=str(reg_config),
    )
    (workdir / "demo.json").write_text(json.dumps(asdict(story), indent=2) + "\n")

    procs: list[tuple[str, subprocess.Popen]] = []
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    story_thread = None
    try:
        reg_log = workdir / "registry.log"
        reg = _spawn(["registry", "--config", str(reg_config)], reg_log)
        procs.append(("registry", reg))
        _wait_http(url + "healthz", 30, reg, reg_log)
        for name, scene in found:
            conf = workdir / f"{scene.device}.toml"
            conf.write_text(
                _agent_toml(
                    scene,
                    videos / name,
                    model,
                    workdir / scene.device,
                    host,
                    port,
                    bin_seconds,
                    url.rstrip("/"),
                    prepared.device_tokens[scene.device],
                    prepared.keys_file,
                )
            )
            procs.append(
                (
                    scene.device,
                    _spawn(["agent", "--config", str(conf)], workdir / f"{scene.device}.log"),
                )
            )
            log.info("agent %s counting %s (config %s)", scene.device, name, conf)
        cameras = "\n".join(
            f"    {s.device:<13} {s.name} ({name}), group {s.group}" for name, s in found
        )
        print(
            f"\nflowfleet demo running: open {url}\n"
            f"  sign in as {prepared.user} / {prepared.password} (operator; a new password "
            f"each start)\n"
            f"  {len(found)} agents, bins every {bin_seconds:g} s, logs in {workdir}:\n"
            f"{cameras}\n"
            f"  each agent takes its model from the registry: {prepared.model} "
            f"v{prepared.first_version}, signed by the demo's key\n"
            f"  registry commands: flowfleet registry --config {reg_config} ...  "
            f"(API token in {workdir / 'operator.token'})\n"
            "  press Ctrl-C to stop\n",
            flush=True,
        )
        if rollout:
            print(
                f"In {rollout_delay:g} s or more (once the drift judge has "
                f"{BASELINE_WINDOWS} windows of {prepared.model} v{prepared.first_version} "
                f"from {story.canary}), a staged rollout sends a really worse model "
                "version to the fleet; watch the registry stop it by itself "
                f"(play it again later: flowfleet demo --rollout --workdir {workdir}).",
                flush=True,
            )
            story_thread = threading.Thread(
                target=_story_thread,
                args=(story, prepared.operator_token, rollout_delay, stop),
                name="demo-rollout",
                daemon=True,
            )
            story_thread.start()
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
        stop.set()
        if story_thread is not None:
            story_thread.join(5)
        for s, h in previous.items():
            signal.signal(s, h)
        # Agents first, so their last bins reach the registry before it stops.
        for name, proc in reversed(procs):
            _terminate(name, proc)
        if own_broker:
            own_broker.stop()
        log.info("demo stopped")


@dataclass(frozen=True)
class StorySettings:
    """What the scripted rollout needs to know of a running demo (``demo.json``)."""

    url: str
    devices: list[str]
    groups: list[str]
    canary: str
    soak_s: float
    model: str
    next_model: str  # the file the rollout uploads as the next version
    registry_config: str


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def _say(text: str) -> None:
    print(text, flush=True)


def play_rollout(story: StorySettings, token: str, stop: threading.Event | None = None):
    """Run the scripted rollout against the demo registry (`demo_rollout.run_story`)."""
    from flowfleet.demo_rollout import Api, run_story

    return run_story(
        Api(story.url, token),
        model=story.model,
        model_file=Path(story.next_model),
        camera=CAMERA,
        canary=story.canary,
        devices=story.devices,
        groups=story.groups,
        soak_s=story.soak_s,
        baseline_windows=BASELINE_WINDOWS,
        min_detections=MIN_DETECTIONS,
        say=_say,
        stop=stop,
        cli=f"flowfleet registry --config {story.registry_config}",
    )


def _all_on_registry_model(story: StorySettings, token: str) -> bool:
    """Whether every demo device reports its camera running a registry model."""
    from flowfleet.demo_rollout import Api, StoryError

    try:
        running = Api(story.url, token).running()
    except (StoryError, OSError):
        return False
    return all(running.get(d, {}).get(CAMERA, (None, None))[1] for d in story.devices)


def _story_thread(story: StorySettings, token: str, delay: float, stop: threading.Event) -> None:
    from flowfleet.demo_rollout import StoryError

    # Start once every agent runs the registry's first version (and the delay passed).
    start = time.monotonic()
    while not stop.is_set():
        if time.monotonic() - start >= delay and _all_on_registry_model(story, token):
            break
        stop.wait(1.0)
    if stop.is_set():
        return
    try:
        play_rollout(story, token, stop)
    except StoryError as exc:
        if not stop.is_set():
            print(f"The rollout demo stopped: {exc}", flush=True)


def rollout_again(workdir: Path) -> None:
    """`flowfleet demo --rollout`: play the rollout on the demo running in ``workdir``."""
    from flowfleet.demo_rollout import StoryError

    workdir = workdir.resolve()
    try:
        story = StorySettings(**json.loads((workdir / "demo.json").read_text()))
        token = (workdir / "operator.token").read_text().strip()
    except (OSError, ValueError, TypeError) as exc:
        raise DemoError(f"no demo in {workdir} ({exc}); start one with flowfleet demo") from None
    if not story.next_model:
        raise DemoError(f"the demo in {workdir} runs without a model to roll out (see its log)")
    from flowfleet.models.catalog import CatalogError, default_entry, resolve

    try:  # a bad release no earlier play uploaded (see new_bad_model)
        bad = new_bad_model(resolve(default_entry().name), workdir)
    except (CatalogError, ImportError, ValueError) as exc:
        raise DemoError(f"cannot make the bad model: {exc}") from None
    try:
        play_rollout(replace(story, next_model=str(bad)), token)
    except StoryError as exc:
        raise DemoError(str(exc)) from None
    except OSError as exc:
        raise DemoError(f"the demo registry at {story.url} does not answer ({exc})") from None


def new_bad_model(model: Path, workdir: Path) -> Path:
    """Write a bad release of ``model`` into ``workdir`` that no earlier play of the
    story made: the n-th has its input scale divided by 128 * 2**(n-1)
    (`flowfleet.model_variants`), so its bytes, and its registry version, are new
    and each play of the story is the rollout of its own release."""
    from flowfleet.model_variants import broken_input_scaling

    stem, suffix = BAD_MODEL.rsplit(".", 1)
    n = 1
    while (workdir / (BAD_MODEL if n == 1 else f"{stem}-{n}.{suffix}")).exists():
        n += 1
    dst = workdir / (BAD_MODEL if n == 1 else f"{stem}-{n}.{suffix}")
    return broken_input_scaling(model, dst, gain=128.0 * 2 ** (n - 1))


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
    p.add_argument(
        "--no-rollout", action="store_true", help="do not play the scripted staged rollout"
    )
    p.add_argument(
        "--rollout-delay",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="start the scripted rollout this long after start, once every agent runs the "
        "registry's model (default 30)",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long the rollout watches each device before the next moves; the drift "
        "judge must confirm within it (default 120; keep it above the health beat "
        "interval, max(bin seconds, 5))",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help="only play the scripted rollout again, on the demo running in --workdir",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    beat = max(args.bin_seconds, 5.0)  # the agents' health beat interval
    if not args.no_rollout and not args.rollout and args.soak <= beat:
        raise CliError(
            f"--soak {args.soak:g}: must be longer than the agents' health beat interval "
            f"({beat:g} s, the larger of --bin-seconds and 5), or no beat falls in a soak",
            EXIT_USAGE,
        )
    if args.broker and not re.fullmatch(r".+:\d+", args.broker):
        raise CliError(f"--broker {args.broker!r}: expected HOST:PORT", EXIT_USAGE)
    if args.rollout_delay < 0:
        raise CliError(f"--rollout-delay {args.rollout_delay:g}: must be 0 or more", EXIT_USAGE)
    try:
        if args.rollout:
            rollout_again(Path(args.workdir))
            return 0
        run_demo(
            workdir=Path(args.workdir),
            http_port=args.http_port,
            broker=args.broker,
            bin_seconds=args.bin_seconds,
            duration=args.duration,
            rollout=not args.no_rollout,
            rollout_delay=args.rollout_delay,
            soak_s=args.soak,
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None
    return 0
