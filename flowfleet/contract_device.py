"""What a device says about itself in its ``online`` status: hardware and cameras.

Part of the wire contract (`flowfleet.contract` imports these into `Status`; both
are optional there, so agents that predate them stay valid). Documented in
docs/protocol.md#status. Kept apart from contract.py only for size; it imports
nothing from it, so it restates the two shared pieces below (a test checks they agree).

``hardware`` is read by the agent at start (`flowfleet.agent.hardware`): board, CPU
architecture, accelerators, OS, kernel, Python and the detector runtimes installed.
A field left out means "not known", never "none": an empty ``accelerators`` list
means the agent looked and found none, an absent one that it did not look.
``cameras`` is each camera's counting geometry (lines and zones in image pixels) as
configured on the device, so the registry can draw and name what is counted.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Same as flowfleet.contract.NAME_PATTERN and its _NO_NUL (tests/test_devices.py checks).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NO_NUL = r"^[^\x00]*$"

MAX_CAMERAS = 64  # cameras in one status
MAX_SHAPES = 64  # lines, and zones, of one camera
MAX_POLYGON = 64  # points of one zone
MAX_COORD = 100_000.0  # image pixels (a 16K frame is 15,360 wide)
MAX_ACCELERATORS = 16
MAX_RUNTIMES = 16
MAX_HW_TEXT = 128  # board model, OS name, kernel, runtime version strings
# Runtimes a detector can use (the registry's model formats, docs/runtimes.md).
RUNTIMES = ("tflite", "onnx", "eim")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
HwText = Annotated[str, Field(max_length=MAX_HW_TEXT, pattern=_NO_NUL)]
Coord = Annotated[float, Field(ge=-MAX_COORD, le=MAX_COORD)]
Point = tuple[Coord, Coord]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Hardware(_Model):
    """The device's hardware and software, as the agent found them at start."""

    board: HwText | None = Field(None, description="board model, e.g. 'Raspberry Pi 5 Model B'")
    board_id: Name | None = Field(
        None, description="short board name: rpi5, rpi4, jetson-orin, jetson-nano, ..."
    )
    arch: Name | None = Field(
        None, description="CPU architecture: x86_64, aarch64, arm, x86, riscv64, ..."
    )
    accelerators: Annotated[tuple[Name, ...], Field(max_length=MAX_ACCELERATORS)] | None = Field(
        None, description="edgetpu, hailo, cuda, ...; [] = none found; absent = not probed"
    )
    os: HwText | None = Field(None, description="/etc/os-release PRETTY_NAME")
    kernel: HwText | None = None
    python: HwText | None = None
    runtimes: Annotated[dict[Name, HwText], Field(max_length=MAX_RUNTIMES)] | None = Field(
        None,
        description="detector runtimes installed (tflite, onnx, eim, ...) -> 'package "
        "version'; a runtime left out is not installed; absent = not probed",
    )


class LineGeometry(_Model):
    name: Name
    points: tuple[Point, Point] = Field(description="A then B; left -> right of A->B is in")


class ZoneGeometry(_Model):
    name: Name
    points: Annotated[tuple[Point, ...], Field(min_length=3, max_length=MAX_POLYGON)]


class Homography(_Model):
    """A camera's speed calibration: four points as image pixels and as ground metres
    (same order)."""

    image: tuple[Point, Point, Point, Point] = Field(description="pixels in the image")
    ground: tuple[Point, Point, Point, Point] = Field(description="metres on the ground")


class CameraGeometry(_Model):
    """One camera's counting lines and zones, in image pixels."""

    camera: Name
    lines: Annotated[tuple[LineGeometry, ...], Field(max_length=MAX_SHAPES)] = ()
    zones: Annotated[tuple[ZoneGeometry, ...], Field(max_length=MAX_SHAPES)] = ()
    speed: bool = Field(False, description="the camera measures ground speed")
    homography: Homography | None = Field(
        None, description="its speed calibration's four points (absent: none, or not told)"
    )


Cameras = Annotated[tuple[CameraGeometry, ...], Field(max_length=MAX_CAMERAS)]


class DesiredGeometry(_Model):
    """The lines and zones the registry wants one camera to count with (its desired
    state's ``geometry``, set from the web UI's camera set-up). The agent validates
    them with its own config models and replaces the running counters between two
    frames; a line or zone whose name and points are unchanged keeps counting."""

    lines: Annotated[tuple[LineGeometry, ...], Field(max_length=MAX_SHAPES)] = ()
    zones: Annotated[tuple[ZoneGeometry, ...], Field(max_length=MAX_SHAPES)] = ()
    homography: Homography | None = Field(
        None, description="new speed calibration; absent: the camera keeps its own"
    )


SnapshotRequest = Annotated[int, Field(ge=1, le=2**53 - 1)]
