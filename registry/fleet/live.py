"""What changed in the fleet, cheaply: markers a live stream compares between ticks.

The registry's HTTP server may run in another process than ingest (several ingest
workers, `flowfleet.registry.fleet.worker`), so a live stream cannot wait on an
in-process signal: it reads these markers every tick instead. Each is one aggregate
over a table with one row per device (or per rollout), whatever the length of the
fleet's history:

* ``bins``: count bins received and the newest one's arrival (`DeviceCounters`,
  kept by ingest in the transaction that stores the bins);
* ``fleet``: devices known, the latest presence change, record edit or acceptance
  (`Device`), the latest reported state (`ReportedState`) and the latest rollout
  change (`Rollout`).

Presence turning "stale" is a matter of the clock, not of a row: pages still
re-read the fleet now and then (see docs/webui.md, "Live").
"""

from __future__ import annotations

import peewee as pw

from ..store.counters_tables import DeviceCounters
from ..store.db import Device, ReportedState
from ..store.rollout_tables import Rollout


def markers() -> dict[str, list]:
    """``{"bins": [...], "fleet": [...]}``: equal lists mean nothing of that kind
    changed. The database connection must be open."""
    bins = DeviceCounters.select(
        pw.fn.SUM(DeviceCounters.bins), pw.fn.MAX(DeviceCounters.last_bin_at)
    ).tuples()[0]
    devices = Device.select(
        pw.fn.COUNT(Device.id),
        pw.fn.MAX(Device.state_since),
        pw.fn.MAX(Device.reported_at),
        pw.fn.MAX(Device.accepted_at),
    ).tuples()[0]
    reported = ReportedState.select(pw.fn.MAX(ReportedState.received_at)).scalar()
    rollouts = Rollout.select(pw.fn.MAX(Rollout.updated_at)).scalar()
    return {
        "bins": [int(bins[0] or 0), bins[1]],
        "fleet": [*devices, reported, rollouts],
    }
