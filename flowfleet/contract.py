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
    {root}/devices/{device}/reported  device -> registry  retained  QoS 1
    {root}/commands/{device}/desired  registry -> device  retained  QoS 1
    {root}/commands/{device}/ack      registry -> device  retained  QoS 1

A device publishes only under ``{root}/devices/{its id}/`` and reads only
``{root}/commands/{its id}/``, so a broker ACL can enforce that a device speaks
only for itself. The registry takes the device id from the topic, never from the
payload alone: a payload whose ``device`` field disagrees with its topic is refused.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
DEFAULT_ROOT = "flowfleet/v1"
QOS = 1
MAX_PAYLOAD_BYTES = 128 * 1024

# Device, camera, line and zone names travel inside topics and URLs: keep them to a
# conservative alphabet so they never contain MQTT wildcards or path separators.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Count = Annotated[int, Field(ge=0)]
Seq = Annotated[int, Field(ge=1)]

DEVICE_KINDS = ("status", "counts", "health", "events", "drift", "reported")
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


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal[1] = Field(SCHEMA_VERSION, alias="schema")
    device: Name

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Status(_Payload):
    """Availability. Retained; the broker publishes the `offline` form as Last Will."""

    kind: Literal["status"] = "status"
    state: Literal["online", "offline"]
    ts: float | None = Field(None, description="seconds since the Unix epoch, UTC")
    agent_version: str | None = None


class LineCount(BaseModel):
    """Crossings of one line by one class during one window."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    camera: Name
    line: Name
    class_: Annotated[str, Field(alias="class", min_length=1, max_length=64)]
    in_: Count = Field(alias="in")
    out: Count


class ZoneCount(BaseModel):
    """Zone activity of one class during one window."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    camera: Name
    zone: Name
    class_: Annotated[str, Field(alias="class", min_length=1, max_length=64)]
    entries: Count
    exits: Count
    peak_occupancy: Count
    dwell_s_sum: Annotated[float, Field(ge=0)] = 0.0
    dwell_n: Count = 0


class SpeedCount(BaseModel):
    """Ground speeds of one class during one window, from a camera's speed calibration.

    ``line`` absent: every track of the camera that ended in the window (its mean
    speed); ``line`` given: the speed of each track at the moment it crossed the line.
    ``n`` counts measured tracks; ``insufficient`` counts tracks too short to measure
    (never reported as 0 km/h). The means and p85 are None when ``n`` is 0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    camera: Name
    line: Name | None = None
    class_: Annotated[str, Field(alias="class", min_length=1, max_length=64)]
    n: Count
    mean_kmh: Annotated[float, Field(ge=0)] | None = None
    p85_kmh: Annotated[float, Field(ge=0)] | None = None
    max_kmh: Annotated[float, Field(ge=0)] | None = None
    insufficient: Count = 0


class CountBin(_Payload):
    """Counts of one device over one time window [start, end).

    ``seq`` is the device's count-bin sequence number: it starts at 1, grows by
    exactly one per bin and is never reused, so (device, seq) identifies a bin and a
    gap means a bin that has not arrived (yet).
    """

    kind: Literal["counts"] = "counts"
    seq: Seq
    start: float = Field(description="window start, seconds since the Unix epoch, UTC")
    end: float = Field(description="window end (exclusive), seconds since the Unix epoch")
    lines: tuple[LineCount, ...] = ()
    zones: tuple[ZoneCount, ...] = ()
    # Optional (absent unless a camera of the device measures speed), so bins without
    # speeds are byte-for-byte what schema 1 agents always sent.
    speeds: tuple[SpeedCount, ...] | None = None

    @model_validator(mode="after")
    def _window_ordered(self) -> CountBin:
        if self.end < self.start:
            raise ValueError(f"window end {self.end} is before start {self.start}")
        seen_speeds = set()
        for row in self.speeds or ():
            k = (row.camera, row.line, row.class_)
            if k in seen_speeds:
                raise ValueError(f"speeds has {k} more than once; one row per key")
            seen_speeds.add(k)
        for rows, key in ((self.lines, "line"), (self.zones, "zone")):
            seen = set()
            for row in rows:
                k = (row.camera, getattr(row, key), row.class_)
                if k in seen:
                    raise ValueError(f"{key}s has {k} more than once; one row per key")
                seen.add(k)
        return self


class CameraHealth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    camera: Name
    state: Literal["running", "starting", "failed", "stopped"]
    fps: Annotated[float, Field(ge=0)] = 0.0
    inference_ms: Annotated[float, Field(ge=0)] = 0.0
    frames: Count = 0
    dropped_frames: Count = 0
    model: str | None = None
    error: str | None = None
    restarts: Count = 0
    inference_p95_ms: Annotated[float, Field(ge=0)] | None = None


class SystemHealth(BaseModel):
    """The device's own figures; each is absent where the platform does not expose it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_1m: Annotated[float, Field(ge=0)] | None = None
    cpu_percent: Annotated[float, Field(ge=0)] | None = None
    cpu_count: Annotated[int, Field(ge=1)] | None = None
    mem_total_bytes: Count | None = None
    mem_available_bytes: Count | None = None
    process_rss_bytes: Count | None = None
    disk_free_bytes: Count | None = None
    disk_total_bytes: Count | None = None
    soc_temp_c: float | None = None
    throttled: Count | None = Field(None, description="vcgencmd get_throttled bit mask (Pi)")
    throttled_flags: tuple[str, ...] | None = None
    gpu_percent: Annotated[float, Field(ge=0)] | None = None
    gpu_temp_c: float | None = None


class Health(_Payload):
    """Periodic health beat. ``seq`` is a separate per-device sequence for beats."""

    kind: Literal["health"] = "health"
    seq: Seq
    ts: float
    uptime_s: Annotated[float, Field(ge=0)]
    outbox_depth: Count = 0
    outbox_dropped: Count = Field(0, description="messages the outbox cap dropped, lifetime")
    publish_refused: Count | None = Field(
        None, description="publishes the broker refused since the agent started (absent: none)"
    )
    error: Annotated[str, Field(max_length=1024)] | None = Field(
        None, description="the device's latest error that is not a camera's (absent: none)"
    )
    cameras: tuple[CameraHealth, ...] = ()
    system: SystemHealth | None = None
    agent_version: str | None = None


EventValue = str | int | float | bool | None


class Event(_Payload):
    """Something that happened on a device (outbox drop, camera failure, resume, ...).

    ``seq`` is a third per-device sequence with the same rules as the others.
    """

    kind: Literal["events"] = "events"
    seq: Seq
    ts: float
    type: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    severity: Literal["info", "warning", "error"] = "info"
    camera: Name | None = None
    message: Annotated[str, Field(max_length=1024)] = ""
    data: dict[Annotated[str, Field(max_length=64)], EventValue] = Field(default_factory=dict)


class ModelRef(BaseModel):
    """One model version a camera should run, with what the device needs to verify it.

    ``manifest`` is the base64 of the registry's signed manifest bytes, exactly as
    signed (see `flowfleet.signing`); ``signature`` is the base64 ed25519 signature
    over those bytes by the key ``key_id``. ``url`` may be relative to the registry's
    URL. A device refuses a reference without manifest, signature and key id.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    version: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    url: str
    signature: str | None = None
    manifest: Annotated[str, Field(max_length=96 * 1024)] | None = None
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | None = None


class Desired(_Payload):
    """Registry -> device desired state (retained). ``version`` grows with every change."""

    kind: Literal["desired"] = "desired"
    version: Annotated[int, Field(ge=1)]
    models: dict[Name, ModelRef] = Field(default_factory=dict, description="camera -> model")


UpdateState = Literal["downloading", "verified", "activated", "failed", "rolled_back"]


class CameraModel(BaseModel):
    """Which model one camera runs, and how its last model update went."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    camera: Name
    model: str | None = Field(None, description="registry model name; None: the config's file")
    version: Annotated[int, Field(ge=1)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    file: str | None = Field(None, description="model file name on the device")
    update: UpdateState | None = Field(None, description="state of the last update")
    update_model: str | None = None
    update_version: Annotated[int, Field(ge=1)] | None = None
    reason: Annotated[str, Field(max_length=1024)] | None = None
    update_ts: float | None = None


class Reported(_Payload):
    """Device -> registry reported state (retained): what each camera runs now.

    ``desired_version`` is the highest desired-state version the device has applied
    (accepted or refused); a registry compares it with the version it published.
    """

    kind: Literal["reported"] = "reported"
    ts: float
    desired_version: Annotated[int, Field(ge=1)] | None = None
    cameras: tuple[CameraModel, ...] = ()


# Fixed histogram edges of a drift summary, so windows compare bin by bin.
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))  # 10 bins over [0, 1]
DETECTIONS_EDGES = (0, 1, 2, 3, 5, 9, 17)  # bins 0, 1, 2, 3-4, 5-8, 9-16, 17+


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
    model: str | None = None
    start: float
    end: float
    frames: Count
    detections: Count
    confidence_hist: tuple[Count, ...] = Field(min_length=10, max_length=10)
    detections_per_frame: Annotated[float, Field(ge=0)]
    detections_hist: tuple[Count, ...] = Field(min_length=7, max_length=7)
    class_mix: dict[Annotated[str, Field(min_length=1, max_length=64)], Count] = Field(
        default_factory=dict
    )
    mean_box_area: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="mean box area as a fraction of the image"
    )
    latency_ms_p50: Annotated[float, Field(ge=0)] | None = None
    latency_ms_p90: Annotated[float, Field(ge=0)] | None = None
    latency_ms_p99: Annotated[float, Field(ge=0)] | None = None
    brightness: Annotated[float, Field(ge=0, le=255)] | None = None
    blur: Annotated[float, Field(ge=0)] | None = Field(
        None, description="mean variance of the Laplacian (lower is blurrier)"
    )


class Ack(_Payload):
    """Registry -> device end-to-end acknowledgement of count bins (retained).

    ``counts`` is the highest count-bin seq up to which the registry has stored every
    bin (1..counts, with no gap; 0 before the first). A device keeps a count bin until
    an ack covers it, so no broker failure can lose one. ``counts_max`` is the highest
    seq stored at all: a bin between the two was lost on the way and the device sends
    it again at once. ``ts`` is when the registry published this ack.
    """

    kind: Literal["ack"] = "ack"
    ts: float
    counts: Annotated[int, Field(ge=0)]
    counts_max: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self) -> Ack:
        if self.counts_max < self.counts:
            raise ValueError(f"counts_max {self.counts_max} is below counts {self.counts}")
        return self


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


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"field {where!r}: {err['msg']}"


def parse_payload(kind: str, raw: bytes, *, device: str | None = None) -> _Payload:
    """Decode and validate a payload of the given kind.

    ``device`` is the id the transport authenticated (taken from the topic); when
    given, a payload claiming another device is refused. Raises ContractError with a
    one-line reason naming the offending field.
    """
    if kind not in PAYLOADS:
        raise ContractError(f"unknown payload kind {kind!r}")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ContractError(f"payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError(f"payload is a JSON {type(data).__name__}, not an object")
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise ContractError(f"field 'schema': unsupported version {schema!r} (want 1)")
    data.setdefault("kind", kind)
    if data["kind"] != kind:
        raise ContractError(f"field 'kind': {data['kind']!r} sent on the {kind!r} topic")
    try:
        payload = PAYLOADS[kind].model_validate(data)
    except ValidationError as exc:
        raise ContractError(_first_error(exc)) from None
    if device is not None and payload.device != device:
        raise ContractError(
            f"field 'device': payload says {payload.device!r} but was published by {device!r}"
        )
    return payload
