"""Speed histograms: fixed km/h buckets that agents fill and the registry adds up.

A count bin's ``p85_kmh`` does not combine across bins, so each speed row may also
carry ``hist``: how many of its ``n`` tracks fell in each bucket of `EDGES_KMH`.
Histograms of the same edges combine by adding them bucket by bucket, so a minute,
hour or day rollup holds the histogram of every track in it, and any percentile of
a rollup is read from it (`percentile`) to within one bucket width.

This module is part of the wire contract (`flowfleet.contract` imports it, and
docs/protocol.md documents the edges): changing `EDGES_KMH` changes the meaning of
every histogram already sent or stored, so the edges never change within a schema
version. It needs nothing but the standard library, like the rest of the contract.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

# Lower edges of the buckets, km/h. Bucket i holds speeds in [EDGES_KMH[i],
# EDGES_KMH[i + 1]); the last one, [160, MAX_SPEED_KMH], is open-ended.
#
# Why these: the width grows with the speed so that the relative resolution stays
# near 10-15 % from a walk to a motorway, in few enough buckets (49) to be columns of
# a rollup row.
# - 0-10 by 0.5: pedestrians (2-8 km/h: a stroll, a brisk walk, a jog). A 1 km/h
#   bucket would be 20 % of a walking speed.
# - 10-30 by 2: runners, cyclists, e-scooters (limited to 20 or 25 km/h).
# - 30-80 by 5: urban traffic; the common limits 30, 50, 70 km/h are edges, so "how
#   many drove over the limit" is exact.
# - 80-160 by 10: rural roads and motorways; 80, 100, 120, 130 km/h are edges.
# - 160 and above: one bucket; its percentiles are bounded by the row's max_kmh.
EDGES_KMH: tuple[float, ...] = (
    tuple(i * 0.5 for i in range(20))  # 0, 0.5, ..., 9.5
    + tuple(float(v) for v in range(10, 30, 2))  # 10, 12, ..., 28
    + tuple(float(v) for v in range(30, 80, 5))  # 30, 35, ..., 75
    + tuple(float(v) for v in range(80, 170, 10))  # 80, 90, ..., 160
)
BUCKETS = len(EDGES_KMH)  # 49


def bucket_of(kmh: float) -> int:
    """The index of the bucket holding ``kmh`` (>= 0)."""
    return max(0, bisect.bisect_right(EDGES_KMH, kmh) - 1)


def histogram(speeds: Iterable[float]) -> tuple[int, ...]:
    """Counts per bucket of ``speeds`` (km/h); sums to how many speeds there are."""
    counts = [0] * BUCKETS
    for v in speeds:
        counts[bucket_of(v)] += 1
    return tuple(counts)


def check(hist: Sequence[int] | None, n: int | None) -> Sequence[int] | None:
    """``hist`` if it is a histogram of ``n`` tracks (or None); ValueError saying why
    not. The contract checks each count's bounds; this checks the whole."""
    if hist is None:
        return hist
    if len(hist) != BUCKETS:
        raise ValueError(
            f"has {len(hist)} buckets; a speed histogram has {BUCKETS} "
            "(flowfleet.speedhist.EDGES_KMH)"
        )
    if n is not None and sum(hist) != n:
        raise ValueError(f"counts {sum(hist)} tracks but n is {n}; they must be equal")
    return hist


def merge(hists: Iterable[Sequence[int] | None]) -> tuple[int, ...]:
    """The bucket-by-bucket sum of ``hists`` (None entries count as empty)."""
    total = [0] * BUCKETS
    for h in hists:
        if h is None:
            continue
        if len(h) != BUCKETS:
            raise ValueError(f"a speed histogram has {BUCKETS} buckets, not {len(h)}")
        for i, c in enumerate(h):
            total[i] += c
    return tuple(total)


def percentile(hist: Sequence[int], q: float, max_kmh: float | None = None) -> float | None:
    """The ``q``-th percentile (0..100) of the speeds counted in ``hist``, km/h.

    Finds the bucket where the cumulative count reaches ``q`` % of the total and
    interpolates linearly inside it, as if its tracks were spread evenly over the
    bucket: the answer is within one bucket width of the exact percentile. A known
    ``max_kmh`` closes the highest non-empty bucket when it lies inside it (so also the
    open last bucket); without it a percentile in the last bucket is that bucket's
    lower edge (160 km/h: "at least").
    None when the histogram is empty.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    n = sum(hist)
    if n <= 0:
        return None
    target = q / 100.0 * n
    below = 0
    top_bucket = max(i for i, c in enumerate(hist) if c > 0)
    for i, c in enumerate(hist):
        if c <= 0:
            continue
        if below + c >= target or i == top_bucket:
            lo = EDGES_KMH[i]
            hi = EDGES_KMH[i + 1] if i + 1 < BUCKETS else None
            if i == top_bucket and max_kmh is not None and lo <= max_kmh < (hi or math.inf):
                hi = max_kmh  # no track was faster
            if hi is None:
                return lo
            frac = min(1.0, max(0.0, (target - below) / c))
            return lo + frac * (hi - lo)
        below += c
    return None  # not reached: the top bucket always answers
