"""A cloud's daily message quota, enforced: Azure IoT Hub's messages per unit and day.

IoT Hub counts device-to-cloud messages against a daily quota (the tier's messages
per unit times the hub's units; 4 KB blocks, 0.5 KB on the free F1 tier) that
resets at 00:00 UTC; past it the hub refuses messages until the next day. The relay
does not run into that wall: before each pass the relay job asks the quota how many
blocks are left today (`DailyQuota.left`, from the relay's own hourly usage in the
database, so a restart does not forget the morning), sends only the packets that fit,
in queue order, and holds the rest in the outbox (not a failure, not an attempt,
never parked or dropped) until the next UTC day. The hold shows in
`flowfleet_registry_relay_quota_held`, ``..._relay_quota_left``, the relay's state in
``GET /api/relays`` and the report.

The tier's quota comes from the price table (``prices.toml``, ``[azure] tiers``), the
same one the report prices tiers with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import usage

DAY_S = 86400


def day_start(t: float) -> float:
    """00:00 UTC of the day of ``t`` (epoch seconds)."""
    return math.floor(t / DAY_S) * DAY_S


def azure_tiers() -> dict[str, dict]:
    """IoT Hub's tiers by name from the price table (messages_per_day per unit, block
    size, the most units a hub may have)."""
    from .report import load_prices

    prices = load_prices()["azure"]
    return {
        t["tier"]: {**t, "unit_bytes": t.get("unit_bytes", prices["unit_bytes"])}
        for t in prices["tiers"]
    }


@dataclass(frozen=True)
class DailyQuota:
    """``units`` hub units of ``tier``: ``per_unit`` blocks of ``block_bytes`` a day each."""

    tier: str
    units: int
    per_unit: int
    block_bytes: int
    #: the relay's billing unit (its usage rows count these): equal to block_bytes
    #: except on F1, whose 0.5 KB blocks are bounded from bytes and publishes
    usage_unit_bytes: int = 4096

    @classmethod
    def azure(cls, tier: str, units: int) -> DailyQuota:
        tiers = azure_tiers()
        if tier not in tiers:
            raise ValueError(f"unknown IoT Hub tier {tier!r} (one of {', '.join(tiers)})")
        t = tiers[tier]
        if not 1 <= units <= t["max_units"]:
            raise ValueError(f"tier {tier} has 1 to {t['max_units']} units, not {units}")
        return cls(tier, units, int(t["messages_per_day"]), int(t["unit_bytes"]))

    @property
    def limit(self) -> int:
        """Blocks a day."""
        return self.units * self.per_unit

    def blocks(self, size: int) -> int:
        """Blocks one message of ``size`` bytes counts against the quota."""
        return max(1, math.ceil(size / self.block_bytes))

    def used(self, relay: str, t: float) -> int:
        """Blocks ``relay`` sent on the UTC day of ``t`` (from its hourly usage rows)."""
        start = day_start(t)
        s = usage.summary(start, start + DAY_S).get(relay)
        if not s:
            return 0
        if self.block_bytes == self.usage_unit_bytes:
            return s["units"]
        # Smaller blocks than the usage rows count: each message is at most one
        # partial block more than its bytes fill, so this never undercounts.
        return s["bytes"] // self.block_bytes + s["publishes"]

    def left(self, relay: str, t: float) -> int:
        return max(0, self.limit - self.used(relay, t))

    def resets_at(self, t: float) -> float:
        """When the quota of the day of ``t`` is whole again (next 00:00 UTC)."""
        return day_start(t) + DAY_S

    def status(self, relay: str, t: float) -> dict:
        """The quota for the API and the report (call inside a connection)."""
        used = self.used(relay, t)
        return {
            "tier": self.tier,
            "units": self.units,
            "blocks_per_day": self.limit,
            "block_bytes": self.block_bytes,
            "used_today": used,
            "left_today": max(0, self.limit - used),
            "resets_at": self.resets_at(t),
        }
