"""Typed agent configuration, validated at load.

An agent reads one TOML file (``/etc/flowfleet/agent.toml`` by default). Unknown keys
are rejected and every error names the key and the file, for example::

    /etc/flowfleet/agent.toml: cameras.0.lines.1.points: a line needs exactly 2 points

Lines and zones can also be given on the command line as ``NAME:x1,y1,x2,y2`` and
``NAME:x1,y1;x2,y2;x3,y3`` (source-image pixels); `parse_line` / `parse_zone` turn
those into the same typed values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowfleet.contract import DEFAULT_ROOT, NAME_PATTERN, check_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on Jetson images
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/flowfleet/agent.toml")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Point = tuple[float, float]


class ConfigError(ValueError):
    """Invalid configuration; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    source: str = Field(description="video file path (RTSP / devices come later)")
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


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_root: str = DEFAULT_ROOT
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class AgentConfig(_Strict):
    device_id: Name
    state_dir: str = "/var/lib/flowfleet"
    bin_seconds: float = Field(60.0, gt=0, le=3600)
    health_seconds: float = Field(30.0, gt=0, le=3600)
    broker: BrokerConfig = BrokerConfig()
    cameras: tuple[CameraConfig, ...] = Field(min_length=1)

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, v):
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"camera names must be unique, repeated: {', '.join(dupes)}")
        return v


def _describe(exc: ValidationError, source: str) -> str:
    """All problems on one line, unknown keys first: 'file: key: problem; key: ...'."""
    problems = []
    for err in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(problems)


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent TOML file; relative paths resolve against its folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
    base = path.resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / Path(p).expanduser())

    cameras = tuple(
        c.model_copy(
            update={"source": rel(c.source), "model": rel(c.model), "labels": rel(c.labels)}
        )
        for c in config.cameras
    )
    return config.model_copy(update={"cameras": cameras, "state_dir": rel(config.state_dir)})


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
