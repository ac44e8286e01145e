"""Registry-side bounds that need the database (the contract's need only the payload).

`check_seq_jump` refuses a sequence number that leaps far above what a device has
stored: seq grows by one per bin, so a bin numbered a million above the device's
highest is a broken or hostile device, and storing it would report about a million
"missing" bins (``gaps`` in /api/devices) and hold the end-to-end acknowledgement
behind a gap that never fills. The contract alone caps seq at 2**53 - 1.
"""

from __future__ import annotations

import peewee as pw

from ..store.db import CountBin

# A device may run ahead of the registry by this many bins: a million one-minute bins
# is almost two years offline, far beyond what an outbox keeps.
MAX_SEQ_JUMP = 1_000_000


def check_seq_jump(
    db: pw.Database,
    device: str,
    seq: int,
    *,
    table: type[pw.Model] = CountBin,
    max_jump: int = MAX_SEQ_JUMP,
) -> str | None:
    """A one-line reason to refuse ``seq`` from ``device``, or None when it is fine.

    ``seq`` may be at most ``max_jump`` above the highest seq the device has stored in
    ``table`` (count bins by default; any model with ``device`` and ``seq`` columns).
    A device with none stored yet may start anywhere: a device moved onto a new
    registry keeps its numbering. One indexed MAX() query on ``db``; run it in the
    transaction that stores the message so concurrent workers see a consistent
    highest seq.
    """
    query = table.select(pw.fn.MAX(table.seq)).where(table.device == device)
    what = table._meta.table_name.replace("_", " ")
    return seq_jump_reason(device, seq, query.scalar(db), what, max_jump)


def seq_jump_reason(
    device: str,
    seq: int,
    top: int | None,
    what: str = "count bin",
    max_jump: int = MAX_SEQ_JUMP,
) -> str | None:
    """The refusal of `check_seq_jump` given the device's highest stored seq ``top``
    (None: nothing stored yet), or None when ``seq`` is fine."""
    if top is not None and seq - top > max_jump:
        return (
            f"field 'seq': {seq} is more than {max_jump} above the highest stored {what} "
            f"seq {top} of {device!r} (seq grows by one per message)"
        )
    return None
