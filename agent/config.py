"""Typed agent configuration, validated at load.

An agent reads one TOML file (``/etc/flowfleet/agent.toml`` by default). Unknown keys
are rejected and every error names the key and the file, for example::

    /etc/flowfleet/agent.toml: cameras.0.lines.1.points: a line needs exactly 2 points

Lines and zones can also be given on the command line as ``NAME:x1,y1,x2,y2`` and
``NAME:x1,y1;x2,y2;x3,y3`` (source-image pixels); `parse_line` / `parse_zone` turn
those into the same typed values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flowfleet.configfile import ConfigError, Strict, check_broker_login, read_toml
from flowfleet.configfile import describe as _describe
from flowfleet.configfile import read_secret as _read_secret
from flowfleet.contract import DEFAULT_ROOT, NAME_PATTERN, check_name
from flowfleet.identity import check_device_id

from .counting import StationarySpec
from .speed import SpeedSpec
from .tracker import TrackerSpec

DEFAULT_CONFIG = Path("/etc/flowfleet/agent.toml")
MIN_LATENCY_FRAMES = 5  # fewest probation frames whose median may roll a model back

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Point = tuple[float, float]


_Strict = Strict


class LineSpec(_Strict):
    name: Name
    points: tuple[Point, Point] = Field(description="A then B; crossing left->right of A->B is in")
    hysteresis: float = Field(8.0, ge=0, description="pixels past the line before a side counts")

    @field_validator("points")
    @classmethod
    def _distinct(cls, v):
        if v[0] == v[1]:
            raise ValueError("the line's two points are the same")
        return v


class ZoneSpec(_Strict):
    name: Name
    points: tuple[Point, ...] = Field(min_length=3)


class CameraConfig(_Strict):
    name: Name
    source: str = Field(
        description="video file or image folder (relative to the config file), stream URL "
        "(rtsp://...), camera (0, /dev/video0) or GStreamer pipeline"
    )
    model: str = Field(description="model file (.tflite)")
    labels: str | None = None
    classes: Literal["all"] | tuple[str, ...] | None = None
    lines: tuple[LineSpec, ...] = ()
    zones: tuple[ZoneSpec, ...] = ()
    anchor: Literal["bottom_center", "center", "top_center"] = "bottom_center"
    loop: bool = False
    realtime: bool = True
    fps_cap: float | None = Field(None, gt=0)
    threads: int = Field(2, ge=1, le=16)
    conf_threshold: float = Field(0.1, ge=0, le=1)
    fps: float = Field(10.0, gt=0, description="frame rate of an image-folder source")
    speed: SpeedSpec | None = Field(None, description="ground homography and smoothing")
    stationary: StationarySpec | None = Field(
        None, description="exclude parked objects from flow counts"
    )
    tracker: TrackerSpec = Field(
        default_factory=TrackerSpec, description="tracker settings (docs/counting.md)"
    )


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_root: str = DEFAULT_ROOT
    username: str | None = None
    # The password never sits in the config itself: it comes from a file (mode 0600,
    # e.g. /etc/flowfleet/password) or from an environment variable (systemd's
    # EnvironmentFile= / LoadCredential=). It is never logged.
    password_file: str | None = None
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(1.0, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)

    @field_validator("username")
    @classmethod
    def _username(cls, v):
        # The broker makes it the ACL's %u and the client id: a device's identity.
        return None if v is None else check_device_id(v, "username")

    @model_validator(mode="after")
    def _consistent(self):
        check_broker_login(self, "the device certificate")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is below reconnect_min_s")
        return self


class OutboxConfig(_Strict):
    """Limits of the local outbox and how fast a backlog drains.

    Policy when a limit is hit: ``keep_counts`` (default) drops the oldest health
    beats first, then the oldest events, and never drops a count bin (the outbox then
    grows past ``max_messages`` rather than lose a count); ``drop_oldest`` drops the
    oldest messages of any kind, count bins included. Every drop is logged, sent as an
    ``outbox_dropped`` event and counted in the health beat's ``outbox_dropped``.
    """

    max_messages: int = Field(100_000, ge=10)
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0, description="for droppable messages")
    policy: Literal["keep_counts", "drop_oldest"] = "keep_counts"
    send_rate: float = Field(5000.0, gt=0, description="messages/s while draining a backlog")
    inflight: int = Field(20, ge=1, le=1000, description="unacknowledged publishes at once")
    # End-to-end acknowledgement: "registry" keeps each count bin until the registry
    # confirms it stored it (its retained ack), so no broker failure can lose a count;
    # "broker" deletes it on the broker's PUBACK, for devices that publish to
    # consumers other than a flowfleet registry (nothing would ever confirm).
    confirm: Literal["registry", "broker"] = "registry"
    confirm_timeout_s: float = Field(
        120.0, gt=0, description="send an unconfirmed count bin again after this long"
    )
    confirm_timeout_max_s: float = Field(
        3600.0, gt=0, description="the resend delay doubles per send up to this"
    )

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> OutboxConfig:
        if self.confirm_timeout_max_s < self.confirm_timeout_s:
            raise ValueError("confirm_timeout_max_s is below confirm_timeout_s")
        return self


class MetricsConfig(_Strict):
    """Prometheus endpoint; off unless ``port`` is set."""

    port: int | None = Field(None, ge=1, le=65535)
    host: str = "127.0.0.1"


class RegistryConfig(_Strict):
    """Where model updates come from and how a new model is judged before it counts.

    Off unless ``url`` is set. The API token comes from a file or an environment
    variable (never the config itself, never logged); ``keys_file`` is the public key
    bundle from ``flowfleet registry keys export``: without it nothing can be verified,
    so it is required with ``url``.
    """

    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    token_file: str | None = None
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    keys_file: str | None = None
    models_dir: str | None = Field(None, description="default: <state_dir>/models")
    timeout_s: float = Field(30.0, gt=0, le=600, description="per HTTP request")
    download_attempts: int = Field(5, ge=1, le=100)
    gate_latency_factor: float = Field(
        5.0, gt=0, description="budget: this times the current model's median latency"
    )
    gate_max_ms: float | None = Field(None, gt=0, description="fixed latency budget (ms)")
    gate_frame_max_age_s: float = Field(
        10.0,
        gt=0,
        description="a camera without a frame this recent is down: its update waits "
        "(pending) and is gated on the camera's next frame",
    )
    cert_renew_at: float = Field(
        2 / 3,
        ge=0,
        lt=1,
        description="renew the broker certificate in the running agent once this share "
        "of its lifetime has passed (agent/renewal.py); 0: never (the daily timer only)",
    )
    probation_frames: int = Field(100, ge=1, description="frames watched after a swap")
    max_errors: int = Field(3, ge=1, description="detector errors in probation -> roll back")
    probation_latency_frames: int = Field(
        30,
        ge=0,
        description="roll back when the median inference time over this many latest "
        "probation frames exceeds the gate's latency budget; 0: no latency check",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.token_file and self.token_env:
            raise ValueError("give token_file or token_env, not both")
        if self.url and not self.keys_file:
            raise ValueError("url needs keys_file (the registry's public key bundle)")
        n = self.probation_latency_frames
        if 0 < n < MIN_LATENCY_FRAMES:
            raise ValueError(
                f"probation_latency_frames must be 0 (off) or at least {MIN_LATENCY_FRAMES}: "
                "a few slow frames must not roll a model back"
            )
        # The default is capped at probation_frames; an explicit value that could
        # never be reached within the probation is a mistake worth naming.
        if "probation_latency_frames" in self.model_fields_set and n > self.probation_frames:
            raise ValueError(
                f"probation_latency_frames ({n}) exceeds probation_frames "
                f"({self.probation_frames}): the latency check could never run"
            )
        return self


class ShadowConfig(_Strict):
    """Shadow comparisons (the registry starts them through the desired state).

    ``share`` is the default share of a camera's frames the candidate model sees
    when the desired state gives none (it runs every ``round(1 / share)``-th frame);
    the default keeps the added CPU time near 30% of the pipeline's on a Pi class
    device (docs/benchmarks.md#shadow). ``window_seconds`` is how often each
    comparison's window is sent.
    """

    share: float = Field(0.2, gt=0, le=1)
    window_seconds: float = Field(60.0, gt=0, le=86400)


class AgentConfig(_Strict):
    device_id: Name
    state_dir: str = "/var/lib/flowfleet"
    bin_seconds: float = Field(60.0, gt=0, le=3600)
    health_seconds: float = Field(30.0, gt=0, le=3600)
    drift_seconds: float = Field(300.0, ge=0, le=86400, description="0: no drift summaries")
    broker: BrokerConfig = BrokerConfig()
    outbox: OutboxConfig = OutboxConfig()
    metrics: MetricsConfig = MetricsConfig()
    registry: RegistryConfig = RegistryConfig()
    shadow: ShadowConfig = ShadowConfig()
    cameras: tuple[CameraConfig, ...] = Field(min_length=1)

    @field_validator("device_id")
    @classmethod
    def _not_reserved(cls, v):
        return check_device_id(v, "device id")

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, v):
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"camera names must be unique, repeated: {', '.join(dupes)}")
        return v


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent TOML file; relative paths resolve against its folder."""
    path = Path(path)
    data = read_toml(path)
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
    base = path.resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / Path(p).expanduser())

    def rel_source(spec: str) -> str:
        # Streams (rtsp://...), camera indices, /dev/videoN and GStreamer pipelines
        # are not file paths; only plain paths resolve against the config's folder.
        s = spec.strip()
        if "://" in s or "!" in s or s.isdigit() or s.startswith("/dev/"):
            return s
        return rel(s)

    cameras = tuple(
        c.model_copy(
            update={
                "source": rel_source(c.source),
                "model": rel(c.model),
                "labels": rel(c.labels),
            }
        )
        for c in config.cameras
    )
    b = config.broker
    files = ("password_file", "ca_file", "cert_file", "key_file")
    broker = b.model_copy(update={k: rel(getattr(b, k)) for k in files})
    problems = []
    for key in files:
        value = getattr(broker, key)
        if value is not None and not os.access(value, os.R_OK):
            why = "file not found" if not Path(value).exists() else "file not readable"
            problems.append(f"broker.{key}: {why}: {value}")
    if broker.password_env and broker.password_env not in os.environ:
        problems.append(
            f"broker.password_env: environment variable {broker.password_env} is not set"
        )
    r = config.registry
    registry = r.model_copy(
        update={k: rel(getattr(r, k)) for k in ("token_file", "keys_file", "models_dir")}
    )
    for key in ("token_file", "keys_file"):
        value = getattr(registry, key)
        if value is not None and not os.access(value, os.R_OK):
            why = "file not found" if not Path(value).exists() else "file not readable"
            problems.append(f"registry.{key}: {why}: {value}")
    if registry.token_env and registry.token_env not in os.environ:
        problems.append(f"registry.token_env: environment variable {registry.token_env} is not set")
    if registry.keys_file and os.access(registry.keys_file, os.R_OK):
        problem = check_key_bundle(registry.keys_file)
        if problem:
            problems.append(f"registry.keys_file: {problem}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config.model_copy(
        update={
            "cameras": cameras,
            "broker": broker,
            "registry": registry,
            "state_dir": rel(config.state_dir),
        }
    )


def check_key_bundle(path: str) -> str | None:
    """None if ``path`` is a usable key bundle, else why not (one line)."""
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"not a JSON key bundle: {exc}: {path}"
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        return f'no keys in the bundle (want {{"keys": [...]}}): {path}'
    for entry in keys:
        if not isinstance(entry, dict) or not {"key_id", "public_key"} <= entry.keys():
            return f"a key entry lacks key_id or public_key: {path}"
    return None


def read_token(registry: RegistryConfig) -> str | None:
    """The registry API token from its file or environment variable (never logged)."""
    return _read_secret("registry.token", registry.token_file, registry.token_env, strip_env=True)


def read_password(broker: BrokerConfig) -> str | None:
    """The broker password from its file or environment variable (never logged)."""
    # An environment value is taken as is: a password may end in whitespace.
    return _read_secret(
        "broker.password", broker.password_file, broker.password_env, strip_env=False
    )


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{what}: coordinates must be numbers, got {text!r}") from None


def parse_line(spec: str) -> LineSpec:
    """``NAME:x1,y1,x2,y2`` -> LineSpec (raises ConfigError naming the argument)."""
    what = f"--line {spec!r}"
    name, sep, coords = spec.partition(":")
    if not sep:
        raise ConfigError(f"{what}: expected NAME:x1,y1,x2,y2")
    values = _floats(coords, what)
    if len(values) != 4:
        raise ConfigError(f"{what}: a line needs 2 points (4 numbers), got {len(values)} numbers")
    try:
        check_name(name, "line name")
        return LineSpec(name=name, points=((values[0], values[1]), (values[2], values[3])))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{what}: {_short(exc)}") from None


def parse_zone(spec: str) -> ZoneSpec:
    """``NAME:x1,y1;x2,y2;x3,y3[;...]`` -> ZoneSpec."""
    what = f"--zone {spec!r}"
    name, sep, coords = spec.partition(":")
    if not sep:
        raise ConfigError(f"{what}: expected NAME:x1,y1;x2,y2;x3,y3")
    points = []
    for pair in coords.split(";"):
        values = _floats(pair, what)
        if len(values) != 2:
            raise ConfigError(f"{what}: each point is x,y; got {pair!r}")
        points.append((values[0], values[1]))
    if len(points) < 3:
        raise ConfigError(f"{what}: a zone needs at least 3 points, got {len(points)}")
    try:
        check_name(name, "zone name")
        return ZoneSpec(name=name, points=tuple(points))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{what}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return exc.errors()[0]["msg"]
    return str(exc)
