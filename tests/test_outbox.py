"""The agent's SQLite outbox: sequences, totals and persistence across reopen."""

from __future__ import annotations

import pytest

from flowfleet.agent.outbox import Outbox
from flowfleet.contract import CountBin, LineCount, parse_payload


def make_bin(seq: int, n_in: int = 1, n_out: int = 0) -> CountBin:
    return CountBin(
        device="dev-1",
        seq=seq,
        start=seq * 60.0,
        end=seq * 60.0 + 60,
        lines=(LineCount(camera="c", line="l", class_="car", in_=n_in, out=n_out),),
    )


def test_sequences_continue_after_reopen(tmp_path):
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    assert [box.enqueue_bin("t", make_bin).seq for _ in range(3)] == [1, 2, 3]
    box.close()
    box = Outbox(path)
    assert box.enqueue_bin("t", make_bin).seq == 4
    assert box.depth() == 4
    assert box.line_totals() == {("c", "l", "car"): (4, 0)}


def test_streams_have_separate_sequences(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.enqueue_bin("t", make_bin)
    assert box.enqueue("health", "h", lambda seq: b"{}") == 1
    assert box.enqueue_bin("t", make_bin).seq == 2


def test_pending_is_oldest_first_and_delete_removes(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    for _ in range(5):
        box.enqueue_bin("topic/x", make_bin)
    rows = box.pending(3)
    assert [parse_payload("counts", r[2]).seq for r in rows] == [1, 2, 3]
    assert box.pending(2, exclude={rows[0][0]})[0][0] == rows[1][0]
    box.delete(rows[0][0])
    assert box.depth() == 4


def test_failed_build_changes_nothing(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")

    def broken(seq):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        box.enqueue_bin("t", broken)
    assert box.depth() == 0 and box.last_seq("counts") == 0 and box.line_totals() == {}
