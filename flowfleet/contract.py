"""The wire contract between agents and the registry.

This is the only module both sides import. It owns the MQTT topic layout and the
payload schemas; `docs/protocol.md` documents the same thing for third parties and
must change together with this file.

Topic layout (``{root}`` is ``flowfleet/v1`` unless configured otherwise)::

    {root}/devices/{device}/status    device -> registry  retained  QoS 1
    {root}/devices/{device}/counts    device -> registry            QoS 1
    {root}/devices/{device}/health    device -> registry            QoS 1
    {root}/devices/{device}/events    device -> registry            QoS 1
    {root}/devices/{device}/drift     device -> registry            QoS 1
    {root}/devices/{device}/shadow    device -> registry            QoS 1
    {root}/devices/{device}/reported  device -> registry  retained  QoS 1
    {root}/commands/{device}/desired  registry -> device  retained  QoS 1
    {root}/commands/{device}/ack      registry -> device  retained  QoS 1

A device publishes only under ``{root}/devices/{its id}/`` and reads only
``{root}/commands/{its id}/``, so a broker ACL can enforce that a device speaks
only for itself. The registry takes the device id from the topic, never from the
payload alone: a payload whose ``device`` field disagrees with its topic is refused.

On the wire `parse_payload` is strict: no type coercion (``true`` is not a number,
``"5"`` is not an integer; an integer is fine where a number is expected), finite
numbers only (``NaN`` and ``Infinity`` are refused, also as the non-standard JSON
tokens), and every number and string within the bounds below, chosen to fit the
registry's columns (BIGINT, double) and a real device with a wide margin. Payloads
built in Python (by the agent and the registry) get the same bounds and the usual
conversions.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from flowfleet.contract_device import Cameras, DesiredGeometry, Hardware, SnapshotRequest

from . import speedhist

SCHEMA_VERSION = 1
DEFAULT_ROOT = "flowfleet/v1"
QOS = 1
MAX_PAYLOAD_BYTES = 128 * 1024

# Device, camera, line and zone names travel inside topics and URLs: keep them to a
# conservative alphabet so they never contain MQTT wildcards or path separators.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

# -- bounds (docs/protocol.md#bounds; change both together) ----------------------------
MAX_SAFE_INT = 2**53 - 1  # exact in JavaScript (the dashboard) and any JSON parser
MAX_SEQ = MAX_SAFE_INT  # every seq, and the acknowledged seqs of an ack
# One row of one window (line crossings, zone entries/exits/peak, speed tracks of one
# class): 16,000 a second in a 60 s bin. One row per key per bin, so a total over n
# bins is at most n * 1e6: exact as a double up to nine billion full bins.
MAX_COUNT = 1_000_000
MAX_TOTAL = MAX_SAFE_INT  # lifetime counters (frames, restarts, drops) and byte sizes
MAX_WINDOW_S = 86_400.0  # end - start of a count bin or a drift window
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01T00:00:00Z; timestamps start at 0
# Receive-time window, checked when `parse_payload` is given ``now``: ts/start/end at
# most a day ahead of the receiver's clock (skew) and two years behind it (a device
# keeps unsent bins while it is offline).
MAX_CLOCK_AHEAD_S = 86_400.0
MAX_AGE_S = 2 * 366 * 86_400.0
MAX_UPTIME_S = 20 * 366 * 86_400.0  # also the longest dwell of one track
MAX_DWELL_S_SUM = MAX_COUNT * MAX_UPTIME_S  # one zone row: MAX_COUNT tracks
MAX_SPEED_KMH = 1_000.0
MAX_FPS = 100_000.0
MAX_LATENCY_MS = 3_600_000.0  # per-frame detector time and its percentiles
MAX_DETECTIONS_PER_FRAME = 10_000.0
MAX_WINDOW_FRAMES = int(MAX_FPS * MAX_WINDOW_S)  # frames of one drift window
MAX_WINDOW_DETECTIONS = int(MAX_WINDOW_FRAMES * MAX_DETECTIONS_PER_FRAME)
MAX_BLUR = 10_000_000.0  # the Laplacian variance of an 8-bit image is below 1.1e6
MAX_LOAD = 100_000.0
MAX_CPU_COUNT = 65_536
MIN_TEMP_C, MAX_TEMP_C = -100.0, 200.0
MAX_MODEL_VERSION = 2**31 - 1  # 32-bit in the registry and its API
MAX_CLASS_MIX = 64  # labels in a drift summary's class_mix (agents send 32)
MAX_EVENT_DATA = 64  # keys of an event's data
MAX_TEXT = 1024  # event message, event data strings, update reasons
MAX_LABEL = 64  # class names, event data keys, throttle flags
MAX_FILE_NAME = 255  # model files and model names as devices report them
MAX_VERSION_TEXT = 128  # agent_version (a 128-character column in the registry)
MAX_URL = 2048
# NUL cannot be stored in a PostgreSQL text column: no string may contain it.
_NO_NUL = r"^[^\x00]*$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Total = Annotated[int, Field(ge=0, le=MAX_TOTAL)]
Seq = Annotated[int, Field(ge=1, le=MAX_SEQ)]
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP)]
ModelVersion = Annotated[int, Field(ge=1, le=MAX_MODEL_VERSION)]
Kmh = Annotated[float, Field(ge=0, le=MAX_SPEED_KMH)]
Millis = Annotated[float, Field(ge=0, le=MAX_LATENCY_MS)]
Percent = Annotated[float, Field(ge=0, le=100)]
Celsius = Annotated[float, Field(ge=MIN_TEMP_C, le=MAX_TEMP_C)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Strings: never NUL; at most so many characters (FreeText: only the payload cap).
ClassName = Annotated[str, Field(min_length=1, max_length=MAX_LABEL, pattern=_NO_NUL)]
Label = Annotated[str, Field(max_length=MAX_LABEL, pattern=_NO_NUL)]
Text = Annotated[str, Field(max_length=MAX_TEXT, pattern=_NO_NUL)]
FileName = Annotated[str, Field(max_length=MAX_FILE_NAME, pattern=_NO_NUL)]
VersionText = Annotated[str, Field(max_length=MAX_VERSION_TEXT, pattern=_NO_NUL)]
Url = Annotated[str, Field(max_length=MAX_URL, pattern=_NO_NUL)]
FreeText = Annotated[str, Field(pattern=_NO_NUL)]

DEVICE_KINDS = ("status", "counts", "health", "events", "drift", "reported", "shadow")
COMMAND_KINDS = ("desired", "ack")


class ContractError(ValueError):
    """A payload or topic that does not satisfy the contract; the message says why."""


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def check_name(name: str, what: str) -> str:
    """Return ``name`` or raise ContractError naming ``what`` was wrong."""
    if not is_valid_name(name):
        raise ContractError(
            f"{what} {name!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "starts with a letter or digit; at most 64 characters)"
        )
    return name


class Topics:
    """Builds and parses every topic; nothing else in the code base formats topics."""

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        self.root = root.rstrip("/")

    def device(self, device: str, kind: str) -> str:
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.root}/devices/{check_name(device, 'device id')}/{kind}"

    def command(self, device: str, kind: str) -> str:
        if kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command topic kind {kind!r}")
        return f"{self.root}/commands/{check_name(device, 'device id')}/{kind}"

    def status(self, device: str) -> str:
        return self.device(device, "status")

    def counts(self, device: str) -> str:
        return self.device(device, "counts")

    def health(self, device: str) -> str:
        return self.device(device, "health")

    def events(self, device: str) -> str:
        return self.device(device, "events")

    def drift(self, device: str) -> str:
        return self.device(device, "drift")

    def reported(self, device: str) -> str:
        return self.device(device, "reported")

    def shadow(self, device: str) -> str:
        return self.device(device, "shadow")

    def desired(self, device: str) -> str:
        return self.command(device, "desired")

    def ack(self, device: str) -> str:
        return self.command(device, "ack")

    def all_devices(self) -> str:
        """Subscription filter for everything devices publish."""
        return f"{self.root}/devices/+/+"

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """Split a device topic into (device id, kind) or raise ContractError."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise ContractError(f"topic {topic!r} is not under {prefix}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise ContractError(f"topic {topic!r} is not {prefix}<device>/<kind>")
        device, kind = parts
        check_name(device, "device id in topic")
        if kind not in DEVICE_KINDS:
            raise ContractError(f"topic {topic!r} has unknown kind {kind!r}")
        return device, kind


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Row(_Model):
    """A row whose wire names are not Python names (``class``, ``in``)."""

    model_config = ConfigDict(populate_by_name=True)


def _window(end: float, info: ValidationInfo) -> float:
    """A window's ``end``: not before ``start`` and at most MAX_WINDOW_S after it."""
    start = info.data.get("start")
    if start is not None:
        if end < start:
            raise ValueError(f"window end {end} is before start {start}")
        if end - start > MAX_WINDOW_S:
            raise ValueError(
                f"window of {end - start:.0f} s (start {start}) is longer than {MAX_WINDOW_S:.0f} s"
            )
    return end


class _Payload(_Model):
    schema_: Literal[1] = Field(SCHEMA_VERSION, alias="schema")
    device: Name

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema_is_int(cls, value: object) -> object:
        # Literal[1] alone accepts true and 1.0 (they compare equal to 1).
        if type(value) is not int or value != SCHEMA_VERSION:
            raise ValueError(f"unsupported version {_short(value)} (want {SCHEMA_VERSION})")
        return value

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Status(_Payload):
    """Availability. Retained; the broker publishes the `offline` form as Last Will."""

    kind: Literal["status"] = "status"
    state: Literal["online", "offline"]
    ts: Timestamp | None = Field(None, description="seconds since the Unix epoch, UTC")
    agent_version: VersionText | None = None
    # Optional, in the online form only (flowfleet.contract_device): older agents and
    # the Last Will leave them out.
    hardware: Hardware | None = None
    cameras: Cameras | None = None

    @field_validator("cameras")
    @classmethod
    def _one_camera_each(cls, cameras: tuple | None) -> tuple | None:
        names = [c.camera for c in cameras or ()]
        if len(set(names)) != len(names):
            raise ValueError("a camera is listed more than once")
        return cameras


class LineCount(_Row):
    """Crossings of one line by one class during one window."""

    camera: Name
    line: Name
    class_: ClassName = Field(alias="class")
    in_: Count = Field(alias="in")
    out: Count


class ZoneCount(_Row):
    """Zone activity of one class during one window."""

    camera: Name
    zone: Name
    class_: ClassName = Field(alias="class")
    entries: Count
    exits: Count
    peak_occupancy: Count
    dwell_s_sum: Annotated[float, Field(ge=0, le=MAX_DWELL_S_SUM)] = 0.0
    dwell_n: Count = 0


class SpeedCount(_Row):
    """Ground speeds of one class during one window, from a camera's speed calibration.

    ``line`` absent: every track of the camera that ended in the window (its mean
    speed); ``line`` given: the speed of each track at the moment it crossed the line.
    ``n`` counts measured tracks; ``insufficient`` counts tracks too short to measure
    (never reported as 0 km/h). The means and p85 are None when ``n`` is 0.
    ``hist`` (optional; agents before it omit it) counts the ``n`` tracks per bucket
    of `flowfleet.speedhist.EDGES_KMH`, so percentiles combine across bins.
    """

    camera: Name
    line: Name | None = None
    class_: ClassName = Field(alias="class")
    n: Count
    mean_kmh: Kmh | None = None
    p85_kmh: Kmh | None = None
    max_kmh: Kmh | None = None
    insufficient: Count = 0
    # max_length bounds the work a hostile list costs before the exact check.
    hist: tuple[Count, ...] | None = Field(None, max_length=speedhist.BUCKETS)

    @field_validator("hist")
    @classmethod
    def _hist_of_n(cls, hist: tuple[int, ...] | None, info: ValidationInfo):
        return speedhist.check(hist, info.data.get("n"))


class CountBin(_Payload):
    """Counts of one device over one time window [start, end).

    ``seq`` is the device's count-bin sequence number: it starts at 1, grows by
    exactly one per bin and is never reused, so (device, seq) identifies a bin and a
    gap means a bin that has not arrived (yet).
    """

    kind: Literal["counts"] = "counts"
    seq: Seq
    start: Timestamp = Field(description="window start, seconds since the Unix epoch, UTC")
    end: Timestamp = Field(description="window end (exclusive), seconds since the Unix epoch")
    lines: tuple[LineCount, ...] = ()
    zones: tuple[ZoneCount, ...] = ()
    # Optional (absent unless a camera of the device measures speed), so bins without
    # speeds are byte-for-byte what schema 1 agents always sent.
    speeds: tuple[SpeedCount, ...] | None = None

    _end = field_validator("end")(_window)

    @field_validator("lines", "zones", "speeds")
    @classmethod
    def _one_row_per_key(cls, rows: tuple | None, info: ValidationInfo) -> tuple | None:
        key, seen = ("zone" if info.field_name == "zones" else "line"), set()
        for row in rows or ():
            k = (row.camera, getattr(row, key), row.class_)
            if k in seen:
                raise ValueError(f"{info.field_name} has {k} more than once; one row per key")
            seen.add(k)
        return rows


Score = Annotated[float, Field(ge=0, le=1)]


class TrackerThresholds(_Model):
    """A camera's tracker score thresholds and where they come from (issue 20):
    ``auto`` (calibrated from its own persistent detection scores: their median and
    how many), ``warming_up`` (still collecting) or ``config`` (set explicitly)."""

    mode: Literal["auto", "warming_up", "config"]
    high_thresh: Score | None = None
    new_track_thresh: Score | None = None
    strong_birth_thresh: Score | None = None
    median_score: Score | None = None
    samples: Total | None = None


class CameraHealth(_Model):
    camera: Name
    state: Literal["running", "starting", "failed", "stopped"]
    fps: Annotated[float, Field(ge=0, le=MAX_FPS)] = 0.0
    inference_ms: Millis = 0.0
    frames: Total = 0
    dropped_frames: Total = 0
    model: FileName | None = None
    error: FreeText | None = None
    restarts: Total = 0
    inference_p95_ms: Millis | None = None
    thresholds: TrackerThresholds | None = None


class SystemHealth(_Model):
    """The device's own figures; each is absent where the platform does not expose it."""

    load_1m: Annotated[float, Field(ge=0, le=MAX_LOAD)] | None = None
    cpu_percent: Percent | None = None
    cpu_count: Annotated[int, Field(ge=1, le=MAX_CPU_COUNT)] | None = None
    mem_total_bytes: Total | None = None
    mem_available_bytes: Total | None = None
    process_rss_bytes: Total | None = None
    disk_free_bytes: Total | None = None
    disk_total_bytes: Total | None = None
    soc_temp_c: Celsius | None = None
    throttled: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = Field(
        None, description="vcgencmd get_throttled bit mask (Pi)"
    )
    throttled_flags: Annotated[tuple[Label, ...], Field(max_length=32)] | None = None
    gpu_percent: Percent | None = None
    gpu_temp_c: Celsius | None = None


class Health(_Payload):
    """Periodic health beat. ``seq`` is a separate per-device sequence for beats."""

    kind: Literal["health"] = "health"
    seq: Seq
    ts: Timestamp
    uptime_s: Annotated[float, Field(ge=0, le=MAX_UPTIME_S)]
    outbox_depth: Total = 0
    outbox_dropped: Total = Field(0, description="messages the outbox cap dropped, lifetime")
    publish_refused: Total | None = Field(
        None, description="publishes the broker refused since the agent started (absent: none)"
    )
    error: Text | None = Field(
        None, description="the device's latest error that is not a camera's (absent: none)"
    )
    cameras: tuple[CameraHealth, ...] = ()
    system: SystemHealth | None = None
    agent_version: VersionText | None = None


def _event_value(value: object) -> str | int | float | bool | None:
    """One value of an event's data: a bounded string, integer or finite number, a
    bool or null (numpy scalars from Python become plain numbers)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT or "\x00" in value:
            raise ValueError(f"strings are at most {MAX_TEXT} characters, without NUL")
        return value
    if isinstance(value, numbers.Integral):
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise ValueError(f"integers are within +-{MAX_SAFE_INT} (2**53 - 1)")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("Input should be a finite number")
        return value
    raise ValueError(f"must be a string, number, boolean or null, not {type(value).__name__}")


EventValue = Annotated[str | int | float | bool | None, PlainValidator(_event_value)]


class Event(_Payload):
    """Something that happened on a device (outbox drop, camera failure, resume, ...).

    ``seq`` is a third per-device sequence with the same rules as the others.
    """

    kind: Literal["events"] = "events"
    seq: Seq
    ts: Timestamp
    type: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    severity: Literal["info", "warning", "error"] = "info"
    camera: Name | None = None
    message: Text = ""
    data: Annotated[dict[Label, EventValue], Field(max_length=MAX_EVENT_DATA)] = Field(
        default_factory=dict
    )


class ModelRef(_Model):
    """One model version a camera should run, with what the device needs to verify it.

    ``manifest`` is the base64 of the registry's signed manifest bytes, exactly as
    signed (see `flowfleet.signing`); ``signature`` is the base64 ed25519 signature
    over those bytes by the key ``key_id``. ``url`` may be relative to the registry's
    URL. A device refuses a reference without manifest, signature and key id.
    """

    name: Name
    version: ModelVersion
    sha256: Sha256
    url: Url
    signature: Annotated[str, Field(max_length=256, pattern=_NO_NUL)] | None = None
    manifest: Annotated[str, Field(max_length=96 * 1024, pattern=_NO_NUL)] | None = None
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | None = None


class ShadowRef(_Model):
    """A candidate model one camera runs beside its active model, never counting with it
    (docs/protocol.md#shadow). Verified exactly like an update; ``share`` is the share
    of the camera's frames it sees (absent: the agent's configured default)."""

    model: ModelRef
    share: Annotated[float, Field(gt=0, le=1)] | None = None


class Desired(_Payload):
    """Registry -> device desired state (retained). ``version`` grows with every change.

    ``shadow`` (optional, absent unless the registry asks for a shadow comparison, so
    desired states without one are what agents before it accept) maps a camera to the
    candidate model it runs in shadow; a camera left out runs none.
    """

    kind: Literal["desired"] = "desired"
    version: Annotated[int, Field(ge=1, le=MAX_SAFE_INT)]
    models: dict[Name, ModelRef] = Field(default_factory=dict, description="camera -> model")
    shadow: Annotated[dict[Name, ShadowRef], Field(max_length=64)] | None = Field(
        None, description="camera -> candidate model run in shadow"
    )
    # Camera set-up (optional, absent unless an operator set one; docs/protocol.md#geometry).
    geometry: Annotated[dict[Name, DesiredGeometry], Field(max_length=64)] | None = Field(
        None, description="camera -> lines and zones it should count with"
    )
    snapshot: Annotated[dict[Name, SnapshotRequest], Field(max_length=64)] | None = Field(
        None,
        description="camera -> id of the latest calibration snapshot the registry asked "
        "for; the device uploads one JPEG per new id, never unasked",
    )


UpdateState = Literal["downloading", "verified", "activated", "failed", "rolled_back"]


class CameraModel(_Model):
    """Which model one camera runs, and how its last model update went."""

    camera: Name
    model: FileName | None = Field(None, description="registry model name; None: the config's file")
    version: ModelVersion | None = None
    sha256: Sha256 | None = None
    file: FileName | None = Field(None, description="model file name on the device")
    update: UpdateState | None = Field(None, description="state of the last update")
    update_model: FileName | None = None
    update_version: ModelVersion | None = None
    reason: Text | None = None
    update_ts: Timestamp | None = None


class Reported(_Payload):
    """Device -> registry reported state (retained): what each camera runs now.

    ``desired_version`` is the highest desired-state version the device has applied
    (accepted or refused); a registry compares it with the version it published.
    """

    kind: Literal["reported"] = "reported"
    ts: Timestamp
    desired_version: Annotated[int, Field(ge=1, le=MAX_SAFE_INT)] | None = None
    cameras: tuple[CameraModel, ...] = ()
    geometry: Cameras | None = Field(
        None, description="each camera's lines and zones as it counts now"
    )


# Fixed histogram edges of a drift summary, so windows compare bin by bin.
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))  # 10 bins over [0, 1]
DETECTIONS_EDGES = (0, 1, 2, 3, 5, 9, 17)  # bins 0, 1, 2, 3-4, 5-8, 9-16, 17+

Frames = Annotated[int, Field(ge=0, le=MAX_WINDOW_FRAMES)]
Detections = Annotated[int, Field(ge=0, le=MAX_WINDOW_DETECTIONS)]


class DriftSummary(_Payload):
    """What one camera's detector saw during a window, for drift checks (no images).

    ``confidence_hist`` has one count per bin of `CONFIDENCE_EDGES` (the last bin
    includes 1.0); ``detections_hist`` counts frames by detections per frame in the
    bins of `DETECTIONS_EDGES` (the last bin is open). ``seq`` is a fourth per-device
    sequence.
    """

    kind: Literal["drift"] = "drift"
    seq: Seq
    camera: Name
    model: FileName | None = None
    start: Timestamp
    end: Timestamp
    frames: Frames
    detections: Detections
    confidence_hist: tuple[Detections, ...] = Field(min_length=10, max_length=10)
    detections_per_frame: Annotated[float, Field(ge=0, le=MAX_DETECTIONS_PER_FRAME)]
    detections_hist: tuple[Frames, ...] = Field(min_length=7, max_length=7)
    class_mix: Annotated[dict[ClassName, Detections], Field(max_length=MAX_CLASS_MIX)] = Field(
        default_factory=dict
    )
    mean_box_area: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="mean box area as a fraction of the image"
    )
    latency_ms_p50: Millis | None = None
    latency_ms_p90: Millis | None = None
    latency_ms_p99: Millis | None = None
    brightness: Annotated[float, Field(ge=0, le=255)] | None = None
    blur: Annotated[float, Field(ge=0, le=MAX_BLUR)] | None = Field(
        None, description="mean variance of the Laplacian (lower is blurrier)"
    )

    _end = field_validator("end")(_window)


class Ack(_Payload):
    """Registry -> device end-to-end acknowledgement of count bins (retained).

    ``counts`` is the highest count-bin seq up to which the registry has stored every
    bin (1..counts, with no gap; 0 before the first). A device keeps a count bin until
    an ack covers it, so no broker failure can lose one. ``counts_max`` is the highest
    seq stored at all: a bin between the two was lost on the way and the device sends
    it again at once. ``ts`` is when the registry published this ack.
    """

    kind: Literal["ack"] = "ack"
    ts: Timestamp
    counts: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    counts_max: Annotated[int, Field(ge=0, le=MAX_SEQ)]

    @field_validator("counts_max")
    @classmethod
    def _ordered(cls, counts_max: int, info: ValidationInfo) -> int:
        counts = info.data.get("counts")
        if counts is not None and counts_max < counts:
            raise ValueError(f"counts_max {counts_max} is below counts {counts}")
        return counts_max


PAYLOADS: dict[str, type[_Payload]] = {
    "status": Status,
    "counts": CountBin,
    "health": Health,
    "events": Event,
    "drift": DriftSummary,
    "reported": Reported,
    "desired": Desired,
    "ack": Ack,
}


def _short(value: object, limit: int = 60) -> str:
    """repr of a value from a payload, cut so a reason stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _reason(exc: ValidationError, kind: str) -> str:
    """One line naming the field: the envelope (schema, kind) first, as it explains
    every other error, then the first error in field order."""
    errors = exc.errors(include_url=False)
    err = next(
        (e for top in ("schema", "kind") for e in errors if e["loc"][:1] == (top,)), errors[0]
    )
    loc, etype = err["loc"], err["type"]
    if etype == "json_invalid":
        return f"payload is not JSON: {err['ctx']['error']}"
    if not loc and etype == "model_type":
        return f"payload is a JSON {type(err['input']).__name__}, not an object"
    if loc == ("kind",) and etype == "literal_error":
        return f"field 'kind': {_short(err['input'])} sent on the {kind!r} topic"
    # Object keys from the payload are part of the location: cut long ones.
    where = ".".join(str(p) if len(str(p)) <= 64 else f"{str(p)[:61]}..." for p in loc)
    where = where or "payload"
    if etype == "value_error":
        return f"field {where!r}: {err['ctx']['error']}"
    if etype == "string_pattern_mismatch" and err["ctx"]["pattern"] == _NO_NUL:
        return f"field {where!r}: must not contain NUL characters"
    return f"field {where!r}: {err['msg']}"


def _check_received(payload: _Payload, now: float) -> None:
    """Refuse timestamps too far from the receiver's clock ``now`` (see MAX_AGE_S)."""
    for name in ("ts", "start", "end"):
        value = getattr(payload, name, None)
        if value is None:
            continue
        if value > now + MAX_CLOCK_AHEAD_S:
            raise ContractError(
                f"field {name!r}: {value} is {value - now:.0f} s after the receive time "
                f"{now:.3f}; at most {MAX_CLOCK_AHEAD_S:.0f} s ahead is accepted (clock skew)"
            )
        # A status is applied in arrival order whatever its ts, and a retained online
        # carries the ts of a connect that may be years old: only the future bound.
        if value < now - MAX_AGE_S and not isinstance(payload, Status):
            raise ContractError(
                f"field {name!r}: {value} is {now - value:.0f} s before the receive time "
                f"{now:.3f}; at most {MAX_AGE_S:.0f} s (2 years) old is accepted"
            )


def parse_payload(
    kind: str, raw: bytes, *, device: str | None = None, now: float | None = None
) -> _Payload:
    """Decode and validate a payload of the given kind, strictly (see the module doc).

    ``device`` is the id the transport authenticated (taken from the topic); when
    given, a payload claiming another device is refused. ``now`` is the receive time
    (seconds since the epoch); when given, the payload's ``ts``, ``start`` and ``end``
    must lie within MAX_CLOCK_AHEAD_S after it and MAX_AGE_S before it. Raises
    ContractError with a one-line reason naming the offending field.
    """
    if kind not in PAYLOADS:
        raise ContractError(f"unknown payload kind {kind!r}")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ContractError(f"payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    try:
        # One pass from bytes to model: pydantic's own JSON parser (it reads the NaN
        # and Infinity tokens, which the finite-number check then refuses by field).
        # by_name=False: the wire names are the aliases ("in", "class") only.
        payload = PAYLOADS[kind].model_validate_json(raw, strict=True, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ContractError(_reason(exc, kind)) from None
    if "schema_" not in payload.model_fields_set:
        raise ContractError(f"field 'schema': missing (want {SCHEMA_VERSION})")
    if device is not None and payload.device != device:
        raise ContractError(
            f"field 'device': payload says {payload.device!r} but was published by {device!r}"
        )
    if now is not None:
        _check_received(payload, now)
    return payload


# The shadow-comparison window lives in its own module (size); importing it registers
# its payload kind in PAYLOADS. At the end, so that module finds everything above.
import flowfleet.contract_shadow  # noqa: E402,F401
