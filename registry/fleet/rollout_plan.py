"""What a rollout moves and in what order: its targets and its plan, validated.

Targets (`Targets`) name devices, groups, a tag selector (devices carrying every
listed tag), or the whole fleet (every device record); they are resolved once, at
creation, into the rollout's device rows.

The plan (`Plan`) orders them: canary devices first (wave 0: named, or a count or a
percentage picked at random with a recorded seed), then ``waves`` waves of the rest
(shuffled with the same seed). Within a wave devices are moved at most
``rate_per_minute`` a minute (None: all at once); the rate grows by
``rate_growth`` with every wave that succeeded. A device succeeds once it reported
the model active and stayed healthy for ``soak_s``; it must report it within
``timeout_s``, and its health beats may not pause for longer than
``beat_timeout_s``. With ``shadow_s`` each canary device first runs the new model in
shadow beside its current one (the agent's shadow comparison) for that long, and
fails without being moved when their counts disagree. `AbortCriteria` says when the
whole rollout stops and rolls back.

Bad input raises `RegistryError` 400 naming the field (``plan.soak_s``,
``targets.groups``) and nothing is created.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RegistryError, check_name
from ..store.db import Device
from . import groups

MAX_TARGETS = 10_000
DAY_S = 86_400.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Canary(_Strict):
    """Canary devices: named ones, or ``count`` or ``percent`` of the targets at random."""

    devices: tuple[str, ...] | None = Field(None, max_length=1000)
    count: int | None = Field(None, ge=0, le=MAX_TARGETS)
    percent: float | None = Field(None, gt=0, le=100)

    @model_validator(mode="after")
    def _one_way(self):
        given = [k for k in ("devices", "count", "percent") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of devices, count or percent, not {' and '.join(given)}")
        return self


class AbortCriteria(_Strict):
    """Abort when, after ``min_finished`` devices finished, a failure kind reaches its
    percentage of the finished devices; a canary aborts after ``canary_failures``+1
    failed canary devices (0: the first one)."""

    min_finished: int = Field(5, ge=1, le=MAX_TARGETS)
    failed_percent: float = Field(20.0, ge=0, le=100)
    rolled_back_percent: float = Field(20.0, ge=0, le=100)
    timed_out_percent: float = Field(20.0, ge=0, le=100)
    drifted_percent: float = Field(20.0, ge=0, le=100)
    canary_failures: int = Field(0, ge=0, le=1000)

    def percent(self, kind: str) -> float:
        return getattr(self, f"{kind}_percent")


class Plan(_Strict):
    canary: Canary = Canary(count=1)
    waves: int = Field(3, ge=1, le=100, description="waves after the canary")
    rate_per_minute: float | None = Field(None, gt=0, le=1_000_000)
    rate_growth: float = Field(1.0, ge=1.0, le=100.0)
    soak_s: float = Field(600.0, ge=0, le=7 * DAY_S)
    timeout_s: float = Field(1800.0, gt=0, le=7 * DAY_S)
    beat_timeout_s: float = Field(180.0, gt=0, le=DAY_S)
    abort: AbortCriteria = AbortCriteria()
    seed: int | None = Field(None, ge=0, le=2**53 - 1)
    # The canary's shadow phase: each canary first runs the new model beside its current
    # one for shadow_s seconds; counts that agree less than shadow_min_agreement (over
    # at least shadow_min_boxes boxes) fail it before it ever moves.
    shadow_s: float = Field(0.0, ge=0, le=7 * DAY_S, description="0: no shadow phase")
    shadow_share: float | None = Field(None, gt=0, le=1, description="None: agent default")
    shadow_min_agreement: float = Field(0.7, ge=0, le=1)
    shadow_min_boxes: int = Field(100, ge=1, le=10**9)
    # After a canary moves, it runs its previous model in shadow through the soak, so
    # the count-agreement gate compares the two on the same frames (shadow_share of
    # them); without it the gate judges only comparisons an operator started.
    soak_shadow: bool = False

    def wave_rate(self, wave: int) -> float | None:
        """Devices per minute while moving ``wave`` (1 is the first after the canary)."""
        if self.rate_per_minute is None:
            return None
        return self.rate_per_minute * self.rate_growth ** max(0, wave - 1)


class Targets(_Strict):
    devices: tuple[str, ...] = Field((), max_length=MAX_TARGETS)
    groups: tuple[str, ...] = Field((), max_length=100)
    tags: tuple[str, ...] = Field((), max_length=16, description="devices with all of them")
    all: bool = False

    @model_validator(mode="after")
    def _something(self):
        if self.all and (self.devices or self.groups or self.tags):
            raise ValueError("all targets the whole fleet: give no devices, groups or tags")
        if not (self.all or self.devices or self.groups or self.tags):
            raise ValueError("name devices, groups or tags, or all: true")
        return self


def _refusal(exc: ValidationError, prefix: str) -> RegistryError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    message = err["msg"].removeprefix("Value error, ")
    return RegistryError(400, "invalid_field", f"{where}: {message}", where)


def parse_plan(data: Any) -> Plan:
    """The validated plan (None or {} gives the defaults)."""
    try:
        return Plan.model_validate(data or {})
    except ValidationError as exc:
        raise _refusal(exc, "plan") from None


def parse_targets(data: Any) -> Targets:
    try:
        targets = Targets.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise _refusal(exc, "targets") from None
    for field in ("devices", "groups", "tags"):
        for value in getattr(targets, field):
            check_name(value, f"targets.{field}", field[:-1])
    return targets


def _tags(text: str | None) -> set[str]:
    try:
        return set(json.loads(text)) if text else set()
    except ValueError:
        return set()


def resolve(targets: Targets) -> list[str]:
    """The sorted device ids ``targets`` names (404 for an unknown group, 409 when the
    set is empty or too large)."""
    chosen: set[str] = set(targets.devices)
    for name in targets.groups:
        chosen.update(groups.members(name))
    if targets.tags or targets.all:
        want = set(targets.tags)
        for dev_id, tags in Device.select(Device.id, Device.tags).tuples():
            if targets.all or want <= _tags(tags):
                chosen.add(dev_id)
    if not chosen:
        raise RegistryError(409, "no_targets", "the targets name no device", "targets")
    if len(chosen) > MAX_TARGETS:
        raise RegistryError(
            409, "too_many_targets", f"a rollout moves at most {MAX_TARGETS} devices", "targets"
        )
    return sorted(chosen)


def assign_waves(devices: list[str], plan: Plan, seed: int) -> dict[str, int]:
    """Each device's wave: 0 for the canary, then 1..``plan.waves`` for the rest,
    shuffled with ``seed`` and split as evenly as possible (earlier waves not larger).
    Raises 400 for canary devices that are not targets."""
    rng = random.Random(seed)
    canary_spec = plan.canary
    if canary_spec.devices is not None:
        strangers = sorted(set(canary_spec.devices) - set(devices))
        if strangers:
            raise RegistryError(
                400,
                "invalid_field",
                f"plan.canary.devices: {', '.join(strangers)} not among the targets",
                "plan.canary.devices",
            )
        canary = sorted(set(canary_spec.devices))
    else:
        if canary_spec.percent is not None:
            k = math.ceil(len(devices) * canary_spec.percent / 100.0)
        else:
            k = canary_spec.count or 0
        canary = sorted(rng.sample(devices, min(k, len(devices))))
    rest = [d for d in devices if d not in set(canary)]
    rng.shuffle(rest)
    waves = {d: 0 for d in canary}
    n = min(plan.waves, len(rest)) or 1
    base, extra = divmod(len(rest), n)
    start = 0
    for w in range(1, n + 1):
        size = base + (1 if w > n - extra else 0)  # later waves take the remainder
        for d in rest[start : start + size]:
            waves[d] = w
        start += size
    return waves
