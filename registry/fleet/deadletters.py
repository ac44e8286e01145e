"""Dead letters for operators: list them, look at one, and replay them after a fix.

A dead letter is a message the registry refused, kept with the reason (see
`flowfleet.registry.fleet.ingest`). Once the cause is fixed (a registry bug, a schema the
registry did not know yet, a device sending a bad field that an upgrade accepts),
`replay` ingests the kept messages again as if they had just arrived at their
original receive time. A replay never writes new dead letters: each letter records
its last replay (when, outcome, reason), and one that was stored (or turned out to
be stored already) counts as resolved. Every replay is in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee as pw

from flowfleet.contract import Topics

from ..store.db import DeadLetter, now
from .ingest import DEAD_LETTER, DEFERRED, DUPLICATE, STORED, Ingestor

RESOLVED = (STORED, DUPLICATE)
# A letter whose payload was cut to DEAD_LETTER_MAX_BYTES cannot be replayed.
TRUNCATED = "truncated"


class DeadLetterError(ValueError):
    """A dead letter that does not exist, or a selection that names nothing."""


def letter_dict(dl: DeadLetter, *, payload: bool = False) -> dict:
    """One dead letter as JSON-ready data (with the whole kept payload if asked)."""
    d = {
        "id": dl.id,
        "received_at": dl.received_at,
        "topic": dl.topic,
        "device": dl.device,
        "kind": dl.kind,
        "seq": dl.seq,
        "reason": dl.reason,
        "payload_size": dl.payload_size,
        "replayed_at": dl.replayed_at,
        "replay_outcome": dl.replay_outcome,
        "replay_reason": dl.replay_reason,
        "resolved": dl.replay_outcome in RESOLVED,
    }
    if payload:
        d["payload"] = bytes(dl.payload).decode("utf-8", errors="replace")
        d["payload_complete"] = len(bytes(dl.payload)) == dl.payload_size
    return d


def select(
    *,
    ids: list[int] | None = None,
    device: str | None = None,
    reason: str | None = None,
    include_resolved: bool = False,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Dead letters, oldest first, by id list or by filters."""
    query = DeadLetter.select().order_by(DeadLetter.id)
    if ids:
        query = query.where(DeadLetter.id.in_(ids))
    if device is not None:
        query = query.where(DeadLetter.device == device)
    if reason:
        query = query.where(DeadLetter.reason.contains(reason))
    if not include_resolved:
        query = query.where(
            DeadLetter.replay_outcome.is_null() | DeadLetter.replay_outcome.not_in(RESOLVED)
        )
    if limit is not None:
        query = query.limit(limit)
    return list(query)


def get(letter_id: int) -> DeadLetter:
    letter = DeadLetter.get_or_none(DeadLetter.id == letter_id)
    if letter is None:
        raise DeadLetterError(f"dead letter {letter_id} does not exist")
    return letter


@dataclass(frozen=True)
class Replayed:
    id: int
    topic: str
    outcome: str  # stored, duplicate, dead-letter (still refused), deferred, truncated
    reason: str


def replay(db: pw.Database, topics: Topics, letters: list[DeadLetter]) -> list[Replayed]:
    """Ingest each letter's message again and record the outcome on the letter."""
    ingestor = Ingestor(db, topics)
    results = []
    for letter in letters:
        body = bytes(letter.payload)
        if len(body) < letter.payload_size:
            outcome, why = (
                TRUNCATED,
                (f"only the first {len(body)} of {letter.payload_size} bytes were kept"),
            )
        else:
            outcome, why = ingestor.replay(letter.topic, body, letter.received_at)
        if outcome == DEFERRED:
            why = "the database failed; try again"
        DeadLetter.update(
            replayed_at=now(), replay_outcome=outcome, replay_reason=why or None
        ).where(DeadLetter.id == letter.id).execute()
        results.append(Replayed(letter.id, letter.topic, outcome, why))
    return results


def summary(results: list[Replayed]) -> dict[str, int]:
    out = {STORED: 0, DUPLICATE: 0, DEAD_LETTER: 0, DEFERRED: 0, TRUNCATED: 0}
    for r in results:
        out[r.outcome] = out.get(r.outcome, 0) + 1
    return out
