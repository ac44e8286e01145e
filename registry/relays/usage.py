"""What each relay forwarded, per hour, and the numbers the report is made of.

The relay job adds one `Tally` per pass to the relay's `RelayUsage` row of the current
hour (`record`). Latency is end to end, from ingest receiving the message to the
cloud acknowledging it, kept as counts per bucket of `LATENCY_EDGES_MS` so that
percentiles over any period come from summed histograms (`summary`); a percentile is
the upper edge of its bucket (at most 25 % above the true value).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

from ..store.relay_tables import RelayUsage

# 0.1 ms .. ~2.6 days in steps of x1.25; one more bucket for anything beyond.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(0.1 * 1.25**k for k in range(77))


@dataclass
class Tally:
    """One pass of a relay: added to its hour's row."""

    messages: int = 0
    publishes: int = 0
    bytes: int = 0
    units: int = 0
    failures: int = 0
    retries: int = 0
    parked: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))

    def observe_ms(self, ms: float) -> None:
        self.latency[bisect.bisect_left(LATENCY_EDGES_MS, ms)] += 1

    def empty(self) -> bool:
        return not (self.messages or self.failures or self.retries or self.parked)


def hour_of(t: float) -> int:
    return int(t // 3600) * 3600


def record(relay: str, t: float, tally: Tally) -> None:
    """Add ``tally`` to ``relay``'s row of the hour of ``t`` (inside a transaction; one
    relay job per relay at a time, through its lease, so read-modify-write is safe)."""
    if tally.empty():
        return
    hour = hour_of(t)
    RelayUsage.insert(relay=relay, hour=hour).on_conflict_ignore().execute()
    row = RelayUsage.get((RelayUsage.relay == relay) & (RelayUsage.hour == hour))
    hist = json.loads(row.latency) or [0] * len(tally.latency)
    hist += [0] * (len(tally.latency) - len(hist))
    merged = [a + b for a, b in zip(hist, tally.latency, strict=True)]
    u = RelayUsage
    u.update(
        messages=u.messages + tally.messages,
        publishes=u.publishes + tally.publishes,
        bytes=u.bytes + tally.bytes,
        units=u.units + tally.units,
        failures=u.failures + tally.failures,
        retries=u.retries + tally.retries,
        parked=u.parked + tally.parked,
        latency=json.dumps(merged),
    ).where((u.relay == relay) & (u.hour == hour)).execute()


def percentile(hist: list[int], q: float) -> float | None:
    """The ``q`` (0..1) percentile in ms of a latency histogram, None when empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return LATENCY_EDGES_MS[min(i, len(LATENCY_EDGES_MS) - 1)]
    return LATENCY_EDGES_MS[-1]


def summary(since: float, until: float) -> dict[str, dict]:
    """Per relay over the hours overlapping [since, until): totals and latency
    percentiles (ms), and the span of hours covered (for scaling to a month)."""
    u = RelayUsage
    rows = u.select().where((u.hour >= hour_of(since)) & (u.hour < until)).order_by(u.hour)
    out: dict[str, dict] = {}
    hists: dict[str, list[int]] = {}
    for row in rows:
        s = out.setdefault(
            row.relay,
            {
                "messages": 0,
                "publishes": 0,
                "bytes": 0,
                "units": 0,
                "failures": 0,
                "retries": 0,
                "parked": 0,
                "first_hour": row.hour,
                "last_hour": row.hour,
            },
        )
        for k in ("messages", "publishes", "bytes", "units", "failures", "retries", "parked"):
            s[k] += getattr(row, k)
        s["last_hour"] = row.hour
        h = json.loads(row.latency)
        acc = hists.setdefault(row.relay, [0] * len(h))
        acc += [0] * (len(h) - len(acc))
        for i, n in enumerate(h):
            acc[i] += n
    for relay, s in out.items():
        h = hists.get(relay, [])
        s["latency_ms"] = {
            "p50": percentile(h, 0.50),
            "p95": percentile(h, 0.95),
            "p99": percentile(h, 0.99),
        }
    return out


def delete_before(t: float, relay: str | None = None) -> int:
    """Forget usage older than ``t`` (hours that ended before it), of ``relay`` or all."""
    cond = RelayUsage.hour + 3600 <= t
    if relay is not None:
        cond &= RelayUsage.relay == relay
    return RelayUsage.delete().where(cond).execute()


__all__ = ["LATENCY_EDGES_MS", "Tally", "delete_before", "percentile", "record", "summary"]
