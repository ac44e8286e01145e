"""The shadow-comparison window: a candidate model run beside the active one.

Part of the wire contract (documented in docs/protocol.md#shadow; kept apart from
contract.py only for size). The registry asks for a comparison with a ``shadow``
entry in the desired state (`flowfleet.contract.ShadowRef`); the device answers per
camera and window with a `ShadowWindow` on ``{root}/devices/{device}/shadow``
(QoS 1, its own per-device ``seq``, like the other streams).

Agreement is symmetric (the Dice / F1 form): on every compared frame the two
models' boxes of the counted classes are matched greedily, highest IoU first, one
to one, only boxes of the same class and only at IoU > ``IOU_THRESHOLD``;
``agreement = 2 * matched / (boxes_active + boxes_candidate)`` over the window, so
1.0 means every box of either model has its twin in the other and a model that
finds half as many boxes (all of them right) scores 0.67. It is absent when neither
model found a box (no evidence either way).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from flowfleet import contract as _c

IOU_THRESHOLD = 0.5  # a box pair matches above this IoU
MAX_SHADOW_ROWS = 64 * 64  # (line, class) rows: lines of a camera x classes

Ratio = Annotated[float, Field(ge=0, le=1)]
PerFrame = Annotated[float, Field(ge=0, le=_c.MAX_DETECTIONS_PER_FRAME)]


class ShadowModel(_c._Model):
    """A model as the device knows it: its file, and the registry's name and version
    when it came from the registry (absent for the config's own file)."""

    file: _c.FileName
    model: _c.FileName | None = None
    version: _c.ModelVersion | None = None
    sha256: _c.Sha256 | None = None


class ShadowLineCount(_c._Row):
    """Crossings of one line by one class in the window, by each model."""

    line: _c.Name
    class_: _c.ClassName = Field(alias="class")
    active_in: _c.Count
    active_out: _c.Count
    candidate_in: _c.Count
    candidate_out: _c.Count


class ShadowZoneCount(_c._Row):
    """One zone and class in the window: entries by each model (the active model's
    over every frame, the candidate's over its frames) and the mean occupancy of
    each over the compared frames."""

    zone: _c.Name
    class_: _c.ClassName = Field(alias="class")
    active_entries: _c.Count
    candidate_entries: _c.Count
    active_occupancy: Annotated[float, Field(ge=0, le=_c.MAX_DETECTIONS_PER_FRAME)]
    candidate_occupancy: Annotated[float, Field(ge=0, le=_c.MAX_DETECTIONS_PER_FRAME)]


class ShadowDrift(_c._Model):
    """One model's raw output on the compared frames, binned as in a drift summary
    (`flowfleet.contract.DriftSummary`: before class filtering, the same confidence
    bins), so the registry can judge it against that model's own drift baseline."""

    frames: _c.Frames
    detections: _c.Detections
    confidence_hist: tuple[_c.Detections, ...] = Field(min_length=10, max_length=10)
    class_mix: Annotated[dict[_c.ClassName, _c.Detections], Field(max_length=_c.MAX_CLASS_MIX)] = (
        Field(default_factory=dict)
    )


class ShadowWindow(_c._Payload):
    """One camera's shadow comparison over the window [start, end).

    ``frames`` is what the active model saw, ``frames_compared`` the share of them the
    candidate saw too (every k-th frame); detections per frame and agreement are over
    the compared frames, counts over the whole window (the candidate's own tracker
    sees only its frames). ``seq`` is a fifth per-device sequence.
    """

    kind: Literal["shadow"] = "shadow"
    seq: _c.Seq
    camera: _c.Name
    start: _c.Timestamp
    end: _c.Timestamp
    active: ShadowModel
    candidate: ShadowModel
    share: Annotated[float, Field(gt=0, le=1)]
    frames: _c.Frames
    frames_compared: _c.Frames
    lines: Annotated[tuple[ShadowLineCount, ...], Field(max_length=MAX_SHADOW_ROWS)] = ()
    zones: Annotated[tuple[ShadowZoneCount, ...], Field(max_length=MAX_SHADOW_ROWS)] = ()
    detections_per_frame_active: PerFrame
    detections_per_frame_candidate: PerFrame
    boxes_active: _c.Detections
    boxes_candidate: _c.Detections
    matched: _c.Detections
    agreement: Ratio | None = None
    latency_ms_active: _c.Millis | None = Field(None, description="median, compared frames")
    latency_ms_candidate: _c.Millis | None = Field(None, description="median, compared frames")
    candidate_drift: ShadowDrift | None = Field(
        None, description="the candidate's raw output on the compared frames (drift bins)"
    )

    _end = field_validator("end")(_c._window)

    @field_validator("frames_compared")
    @classmethod
    def _within_frames(cls, n: int, info: ValidationInfo) -> int:
        frames = info.data.get("frames")
        if frames is not None and n > frames:
            raise ValueError(f"frames_compared {n} is more than frames {frames}")
        return n

    @field_validator("lines", "zones")
    @classmethod
    def _one_row_per_key(cls, rows: tuple, info: ValidationInfo) -> tuple:
        seen = set()
        for row in rows:
            key = (getattr(row, "line", None) or row.zone, row.class_)
            if key in seen:
                raise ValueError(f"{info.field_name} has {key} more than once")
            seen.add(key)
        return rows

    @model_validator(mode="after")
    def _consistent(self):
        boxes = (self.boxes_active, self.boxes_candidate)
        if self.matched > min(boxes):
            raise ValueError(f"matched {self.matched} is more than the boxes of a model {boxes}")
        if (self.agreement is None) != (sum(boxes) == 0):
            raise ValueError("agreement is given exactly when either model found a box")
        d = self.candidate_drift
        if d is not None and d.frames != self.frames_compared:
            raise ValueError(
                f"candidate_drift.frames {d.frames} is not frames_compared {self.frames_compared}"
            )
        return self


def agreement_of(matched: int, boxes_active: int, boxes_candidate: int) -> float | None:
    """The symmetric agreement (see the module doc); None when there are no boxes."""
    total = boxes_active + boxes_candidate
    return None if total == 0 else round(min(1.0, 2.0 * matched / total), 4)


_c.PAYLOADS["shadow"] = ShadowWindow
