"""Per-device ingest counters (schema migration 20): what ``GET /api/devices`` shows
about each device's raw history without counting it on every request.

Ingest adds to a device's row in the same transaction that stores the bins, beats
or dead letters it counts (`flowfleet.registry.fleet.counters`), and only for rows it
actually inserted: a redelivery stored once is counted once. Retention subtracts the
health beats it removes; count bins it removes stay counted (``bins`` is what was
received, as ``device.bins_pruned`` made the old count). The migration fills the
table from the raw tables of an existing database.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class DeviceCounters(BaseModel):
    """One device's running totals. ``device`` is the id ingest stored under (a dead
    letter's device may be one the registry does not know), hence no foreign key."""

    device = pw.CharField(max_length=256, primary_key=True)
    bins = pw.BigIntegerField(default=0, help_text="count bins received (stored or pruned)")
    bin_seq_max = pw.BigIntegerField(null=True, help_text="highest count-bin seq stored")
    last_bin_at = pw.DoubleField(null=True, help_text="when the newest stored bin arrived")
    beats = pw.BigIntegerField(default=0, help_text="health beats stored now")
    beat_seq_max = pw.BigIntegerField(null=True, help_text="highest health-beat seq stored")
    last_beat_at = pw.DoubleField(null=True, help_text="when the newest beat arrived")
    dead_letters = pw.BigIntegerField(default=0, help_text="dead letters naming the device")

    class Meta:
        table_name = "device_counters"


COUNTER_MODELS: tuple[type[pw.Model], ...] = (DeviceCounters,)
