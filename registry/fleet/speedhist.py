"""Speed histograms in the rollups: bin rows to columns, columns to percentiles.

The buckets and the arithmetic (`flowfleet.speedhist`) belong to the wire contract,
since agents fill the histograms; this module is the registry's side of them:
`speed_rollup` keeps one additive column per bucket (`SPEED_HIST_COLUMNS`, migration
11), which `fleet.series` adds up per bucket of time and reads back as percentiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flowfleet import speedhist

from ..store.db import SPEED_HIST_COLUMNS

# The percentiles a speed series reports for each point and total.
PERCENTILES = (50, 85, 95)
_EMPTY = dict.fromkeys(SPEED_HIST_COLUMNS, 0)


def columns(hist: Sequence[int] | None) -> dict[str, int]:
    """A bin row's histogram as `speed_rollup` columns (zeros when it has none, so
    an upsert adds nothing to those buckets)."""
    if hist is None:
        return dict(_EMPTY)
    return dict(zip(SPEED_HIST_COLUMNS, (int(c) for c in hist), strict=True))


def from_sums(values: Iterable[object]) -> tuple[int, ...]:
    """A histogram from summed columns as the database returns them (SQLite's TOTAL
    gives floats, PostgreSQL's SUM decimals, an empty group NULL)."""
    return tuple(int(v or 0) for v in values)


def percentiles(hist: Sequence[int], max_kmh: float | None) -> dict[str, float | int | None]:
    """``p50_kmh``, ``p85_kmh``, ``p95_kmh`` of a histogram (None when it is empty),
    and ``hist_n``: how many tracks they describe (only bins that carried a
    histogram count; ``n`` may be larger when older agents contributed)."""
    out: dict[str, float | int | None] = {}
    for q in PERCENTILES:
        v = speedhist.percentile(hist, q, max_kmh)
        out[f"p{q}_kmh"] = None if v is None else round(v, 2)
    out["hist_n"] = sum(hist)
    return out


def merge(hists: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """The sum of several points' histograms (a series' total)."""
    return speedhist.merge(hists)
