"""Aggregates crossings and zone events per camera / line or zone / class.

One `Tally` is a window's worth of counts (a bin) or a run's totals; the agent keeps
one per open bin and turns it into the contract's `LineCount` / `ZoneCount` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowfleet.contract import LineCount, ZoneCount

from .counting import Crossing, ZoneEvent


@dataclass
class ZoneAgg:
    entries: int = 0
    exits: int = 0
    peak_occupancy: int = 0
    dwell_s_sum: float = 0.0
    dwell_n: int = 0

    @property
    def mean_dwell_s(self) -> float | None:
        return self.dwell_s_sum / self.dwell_n if self.dwell_n else None


class Tally:
    def __init__(self) -> None:
        self.lines: dict[tuple[str, str, str], list[int]] = {}
        self.zones: dict[tuple[str, str, str], ZoneAgg] = {}

    def declare_line(self, camera: str, line: str, classes: list[str]) -> None:
        """Make zero rows exist so a quiet line still reports 0 rather than nothing."""
        for c in classes:
            self.lines.setdefault((camera, line, c), [0, 0])

    def declare_zone(self, camera: str, zone: str, classes: list[str]) -> None:
        for c in classes:
            self.zones.setdefault((camera, zone, c), ZoneAgg())

    def add_crossing(self, camera: str, ev: Crossing) -> None:
        row = self.lines.setdefault((camera, ev.line, ev.class_name), [0, 0])
        row[0 if ev.direction == "in" else 1] += 1

    def add_zone_event(self, camera: str, ev: ZoneEvent) -> None:
        agg = self.zones.setdefault((camera, ev.zone, ev.class_name), ZoneAgg())
        if ev.kind == "entry":
            agg.entries += 1
        else:
            agg.exits += 1
            agg.dwell_s_sum += ev.dwell_s
            agg.dwell_n += 1

    def note_occupancy(self, camera: str, zone: str, by_class: dict[str, int]) -> None:
        for cname, n in by_class.items():
            agg = self.zones.setdefault((camera, zone, cname), ZoneAgg())
            agg.peak_occupancy = max(agg.peak_occupancy, n)

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
