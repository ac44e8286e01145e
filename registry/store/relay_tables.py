"""Cloud relay tables (schema migration 17): the relays' outbox and their usage.

Ingest queues one `RelayMessage` per relay for every message it stores that the
relay's route selects, in the ingest transaction itself
(`flowfleet.registry.relays.outbox`): a stored message is in the outbox as soon as it
is committed. The relay job (`flowfleet.registry.relays.job`) deletes a row only after
the cloud acknowledged it; a row the cloud refuses for good stays, parked with the
reason. `RelayUsage` keeps per relay and hour what was forwarded (messages, bytes,
billing units, failures, retries, a latency histogram), which the report reads.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class RelayMessage(BaseModel):
    """One stored device message waiting to be forwarded by one relay.

    ``msg_id`` is the stable id ``<device>/<kind>/<seq>`` the cloud side deduplicates
    on; the device, kind and seq are read back from it (ingest writes three values per
    row and nothing more). Ingest queues a message only when it stores it, which happens once per
    (device, kind, seq), so a redelivery is never queued twice; no unique index
    enforces it again (each index costs ingest time, docs/relays.md).
    ``parked_at`` set: refused for good (``reason``), kept for an operator, never
    blocking the rows behind it.
    """

    id = pw.AutoField()
    relay = pw.CharField(max_length=16)
    msg_id = pw.CharField(max_length=160, help_text="<device>/<kind>/<seq>: all three in one")
    # NULL for what ingest queues: the relay reads the message from the table ingest
    # stored it in, by (device, seq), when it sends it (so ingest writes no second copy).
    payload = pw.TextField(null=True, help_text="the message (JSON), when not stored elsewhere")
    received_at = pw.DoubleField(help_text="when ingest received it (latency start)")
    # A database default: ingest's multi-row INSERT leaves it out (fewer values to bind).
    attempts = pw.IntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])
    last_error = pw.TextField(null=True)
    parked_at = pw.DoubleField(null=True)
    reason = pw.TextField(null=True)

    class Meta:
        table_name = "relay_message"
        indexes = ((("relay", "parked_at", "id"), False),)


class RelayUsage(BaseModel):
    """What one relay did in one hour (``hour``: its start, epoch seconds).

    ``latency`` is a JSON list of counts per bucket of
    `flowfleet.registry.relays.usage.LATENCY_EDGES_MS` (end-to-end: ingest received
    the message -> the cloud acknowledged it), so percentiles over any range of hours
    are a sum of histograms.
    """

    relay = pw.CharField(max_length=16)
    hour = pw.BigIntegerField()
    messages = pw.BigIntegerField(default=0)
    publishes = pw.BigIntegerField(default=0)
    bytes = pw.BigIntegerField(default=0)
    units = pw.BigIntegerField(default=0)
    failures = pw.BigIntegerField(default=0)
    retries = pw.BigIntegerField(default=0)
    parked = pw.BigIntegerField(default=0)
    latency = pw.TextField(default="[]")

    class Meta:
        table_name = "relay_usage"
        primary_key = pw.CompositeKey("relay", "hour")


# Created by schema migration 17.
RELAY_MODELS: tuple[type[BaseModel], ...] = (RelayMessage, RelayUsage)
