"""The registry's end-to-end acknowledgement of count bins.

A device keeps every count bin until the registry confirms it has it (see
`flowfleet.contract.Ack` and docs/protocol.md, "Delivery guarantees"). The registry
confirms with one number per device, ``counts_acked``: every bin 1..counts_acked is in
its custody. In custody means stored, dead-lettered (kept whole, for an operator to
replay), or declared dropped by the device itself (its outbox cap under the
``drop_oldest`` policy; such bins can never arrive). ``counts_max`` is the highest seq
received, so a device that sees ``counts_acked < seq <= counts_max`` for a bin it
sent long ago knows that bin was lost on the way and sends it again at once.

`advance_counts_ack` runs inside the transaction that stored the bin (or the dead
letter, or the declared gap), so the ack never runs ahead of what is committed.
"""

from __future__ import annotations

import peewee as pw

from ..store.db import DEAD_LETTER_MAX_BYTES, CountBin, CountGap, DeadLetter, Device

# Seqs read per query while walking forward over bins already in custody.
_WALK_CHUNK = 5000


def note_count_seq(device: str, seq: int) -> tuple[int, int] | None:
    """Record that ``seq`` of ``device`` is now in custody; advances the ack if it can.

    Call inside the transaction that made it so. Returns the device's new
    (counts_acked, counts_max), or None if the device is unknown.
    """
    acked = pw.fn.COALESCE(Device.counts_acked, 0)
    top = pw.fn.COALESCE(Device.counts_max, 0)
    # The common case, bins arriving in order: one statement.
    if (
        Device.update(counts_acked=seq, counts_max=seq)
        .where((Device.id == device) & (acked == seq - 1) & (top < seq))
        .execute()
    ):
        return seq, seq
    Device.update(counts_max=pw.Case(None, ((top < seq, seq),), top)).where(
        Device.id == device
    ).execute()
    return advance_counts_ack(device)


def note_gap(device: str, first: int, last: int, declared_at: float) -> tuple[int, int] | None:
    """The device declared bins ``first..last`` dropped: the ack may pass over them."""
    if last < first or first < 1:
        return ack_state(device)
    CountGap.create(device=device, first=first, last=last, declared_at=declared_at)
    return advance_counts_ack(device)


def advance_counts_ack(device: str) -> tuple[int, int] | None:
    """Move ``counts_acked`` forward over every seq now in custody.

    Returns the device's (counts_acked, counts_max), or None if it is unknown.
    """
    row = (
        Device.select(Device.counts_acked, Device.counts_max)
        .where(Device.id == device)
        .tuples()
        .first()
    )
    if row is None:
        return None
    start, top = row[0] or 0, row[1] or 0
    gaps = list(
        CountGap.select(CountGap.first, CountGap.last)
        .where((CountGap.device == device) & (CountGap.last > start))
        .order_by(CountGap.first)
        .tuples()
    )
    acked = _through_gaps(start, gaps)
    more = True
    while more:
        held = _held_after(device, acked)
        more = len(held) == _WALK_CHUNK  # a full chunk: more may follow
        for seq in held:
            acked = _through_gaps(acked, gaps)
            if seq <= acked:
                continue  # inside a declared gap already passed
            if seq != acked + 1:
                more = False  # a hole: the ack stops below it
                break
            acked = seq
        acked = _through_gaps(acked, gaps)
    if acked != start:
        Device.update(counts_acked=acked).where(Device.id == device).execute()
    return acked, max(top, acked)


def ack_state(device: str) -> tuple[int, int] | None:
    """The device's committed (counts_acked, counts_max), or None if it is unknown."""
    row = (
        Device.select(Device.counts_acked, Device.counts_max)
        .where(Device.id == device)
        .tuples()
        .first()
    )
    return None if row is None else (row[0] or 0, row[1] or 0)


def _through_gaps(acked: int, gaps: list[tuple[int, int]]) -> int:
    """Pass over declared gaps that start right after ``acked`` (or overlap it)."""
    moved = True
    while moved:
        moved = False
        for first, last in gaps:
            if first <= acked + 1 <= last:
                acked, moved = last, True
    return acked


def _held_after(device: str, acked: int) -> list[int]:
    """Seqs above ``acked`` held as stored bins or whole dead letters, ascending."""
    stored = (
        CountBin.select(CountBin.seq)
        .where((CountBin.device == device) & (CountBin.seq > acked))
        .order_by(CountBin.seq)
        .limit(_WALK_CHUNK)
        .tuples()
    )
    dead = (
        DeadLetter.select(DeadLetter.seq)
        .where(
            (DeadLetter.device == device)
            & (DeadLetter.kind == "counts")
            & (DeadLetter.seq > acked)
            & (DeadLetter.payload_size <= DEAD_LETTER_MAX_BYTES)
        )
        .order_by(DeadLetter.seq)
        .limit(_WALK_CHUNK)
        .tuples()
    )
    seqs = sorted({s for (s,) in stored} | {s for (s,) in dead})
    return seqs[:_WALK_CHUNK]
