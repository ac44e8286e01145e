"""Aggregates crossings, zone events and speeds per camera / line or zone / class.

One `Tally` is a window's worth of counts (a bin) or a run's totals; the agent keeps
one per open bin and turns it into the contract's `LineCount` / `ZoneCount` /
`SpeedCount` rows. Class-agnostic totals come from `line_totals()` (sums over
classes) and `zone_totals` (entries, exits and dwell summed over classes, and the
peak number of objects of any class inside at once, which is not the sum of the
per-class peaks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from flowfleet.contract import LineCount, SpeedCount, ZoneCount

from .counting import Crossing, ZoneEvent
from .speed import SpeedAgg, SpeedEvent

# Dwell-time histogram bins, seconds: [0, 5), [5, 10), ..., [600, inf).
DWELL_EDGES_S = (0.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def dwell_bin_labels() -> list[str]:
    edges = [f"{e:g}" for e in DWELL_EDGES_S]
    return [f"{a}-{b}s" for a, b in pairwise(edges)] + [f"{edges[-1]}s+"]


@dataclass
class ZoneAgg:
    entries: int = 0
    exits: int = 0
    peak_occupancy: int = 0
    dwell_s_sum: float = 0.0
    dwell_n: int = 0
    dwell_s: list[float] = field(default_factory=list)  # each exited track's dwell

    @property
    def mean_dwell_s(self) -> float | None:
        return self.dwell_s_sum / self.dwell_n if self.dwell_n else None

    def add(self, ev: ZoneEvent) -> None:
        if ev.kind == "entry":
            self.entries += 1
        else:
            self.exits += 1
            self.dwell_s_sum += ev.dwell_s
            self.dwell_n += 1
            self.dwell_s.append(ev.dwell_s)

    def dwell_percentile(self, q: float) -> float | None:
        return float(np.percentile(self.dwell_s, q)) if self.dwell_s else None

    def dwell_histogram(self) -> list[int]:
        """Counts per `DWELL_EDGES_S` bin (the last bin is open-ended)."""
        idx = np.searchsorted(DWELL_EDGES_S, self.dwell_s, side="right") - 1
        return np.bincount(idx, minlength=len(DWELL_EDGES_S)).tolist()

    def dwell_summary(self) -> dict:
        def r(v):
            return None if v is None else round(v, 2)

        return {
            "mean_dwell_s": r(self.mean_dwell_s),
            "p50_dwell_s": r(self.dwell_percentile(50)),
            "p90_dwell_s": r(self.dwell_percentile(90)),
            "max_dwell_s": r(max(self.dwell_s) if self.dwell_s else None),
            "dwell_histogram": dict(zip(dwell_bin_labels(), self.dwell_histogram(), strict=True)),
        }


class Tally:
    def __init__(self) -> None:
        self.lines: dict[tuple[str, str, str], list[int]] = {}
        self.zones: dict[tuple[str, str, str], ZoneAgg] = {}
        self.zone_totals: dict[tuple[str, str], ZoneAgg] = {}  # over classes
        # (camera, line or None for every track of the camera, class) -> speeds
        self.speeds: dict[tuple[str, str | None, str], SpeedAgg] = {}

    def declare_line(self, camera: str, line: str, classes: list[str]) -> None:
        """Make zero rows exist so a quiet line still reports 0 rather than nothing."""
        for c in classes:
            self.lines.setdefault((camera, line, c), [0, 0])

    def declare_zone(self, camera: str, zone: str, classes: list[str]) -> None:
        for c in classes:
            self.zones.setdefault((camera, zone, c), ZoneAgg())
        self.zone_totals.setdefault((camera, zone), ZoneAgg())

    def add_crossing(self, camera: str, ev: Crossing) -> None:
        row = self.lines.setdefault((camera, ev.line, ev.class_name), [0, 0])
        row[0 if ev.direction == "in" else 1] += 1

    def add_zone_event(self, camera: str, ev: ZoneEvent) -> None:
        self.zones.setdefault((camera, ev.zone, ev.class_name), ZoneAgg()).add(ev)
        self.zone_totals.setdefault((camera, ev.zone), ZoneAgg()).add(ev)

    def note_occupancy(self, camera: str, zone: str, by_class: dict[str, int]) -> None:
        for cname, n in by_class.items():
            agg = self.zones.setdefault((camera, zone, cname), ZoneAgg())
            agg.peak_occupancy = max(agg.peak_occupancy, n)
        total = self.zone_totals.setdefault((camera, zone), ZoneAgg())
        total.peak_occupancy = max(total.peak_occupancy, sum(by_class.values()))

    def add_speed(self, camera: str, ev: SpeedEvent) -> None:
        self.speeds.setdefault((camera, ev.line, ev.class_name), SpeedAgg()).add(ev)

    def line_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(camera, line) -> (in, out) summed over classes."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for (cam, line, _), (n_in, n_out) in sorted(self.lines.items()):
            a, b = out.get((cam, line), (0, 0))
            out[(cam, line)] = (a + n_in, b + n_out)
        return out

    def speed_totals(self) -> dict[tuple[str, str | None], SpeedAgg]:
        """(camera, line or None) -> speeds of every class together."""
        out: dict[tuple[str, str | None], SpeedAgg] = {}
        for (cam, line, _), agg in self.speeds.items():
            out.setdefault((cam, line), SpeedAgg()).merge(agg)
        return out

    def line_counts(self) -> tuple[LineCount, ...]:
        return tuple(
            LineCount(camera=cam, line=line, class_=cls, in_=v[0], out=v[1])
            for (cam, line, cls), v in sorted(self.lines.items())
        )

    def zone_counts(self) -> tuple[ZoneCount, ...]:
        return tuple(
            ZoneCount(
                camera=cam,
                zone=zone,
                class_=cls,
                entries=a.entries,
                exits=a.exits,
                peak_occupancy=a.peak_occupancy,
                dwell_s_sum=round(a.dwell_s_sum, 3),
                dwell_n=a.dwell_n,
            )
            for (cam, zone, cls), a in sorted(self.zones.items())
        )

    def speed_counts(self) -> tuple[SpeedCount, ...] | None:
        """Contract rows, or None when nothing was measured (the bin omits ``speeds``)."""
        if not self.speeds:
            return None
        return tuple(
            SpeedCount(
                camera=cam,
                line=line,
                class_=cls,
                n=a.n,
                mean_kmh=a.mean_kmh,
                p85_kmh=a.p85_kmh,
                max_kmh=a.max_kmh,
                insufficient=a.insufficient,
                hist=a.hist,
            )
            for (cam, line, cls), a in sorted(self.speeds.items(), key=_speed_key)
        )


def _speed_key(item) -> tuple:
    (cam, line, cls), _ = item
    return (cam, line is not None, line or "", cls)
