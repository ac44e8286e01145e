"""`flowfleet registry dead-letters list|show|replay`, in-process, on SQLite and PostgreSQL.

The letters are the ones an earlier registry wrote when its database was locked
(a valid bin dead-lettered as "database is locked", the fault this command exists
for), one that is still wrong, and one whose payload was cut to the kept size.
"""

from __future__ import annotations

import json

import pytest

from flowfleet.cli import main
from flowfleet.contract import Topics
from flowfleet.registry.fleet.ack import ack_state
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import KINDS, release, temporary_database

from .factories import count_bin

TOPICS = Topics()


@pytest.fixture(params=KINDS)
def cli(request, tmp_path, capsys):
    """A database holding three dead letters; runs `flowfleet registry ...` on it."""
    with temporary_database(request.param, tmp_path) as url:
        db = regdb.open_database(url)
        with db.connection_context():
            regdb.Device.create(id="cam-1", first_seen=1.0)
            letter(count_bin("cam-1", 1).to_json(), "database error while storing: locked")
            letter(count_bin("cam-1", 2).to_json(), "database error while storing: locked")
            letter(b'{"schema": 1, "seq": "x"}', "field 'seq': not an int")
            cut = count_bin("cam-1", 3).to_json()
            letter(cut[:20], "database error while storing: locked", size=len(cut))
        release()

        def run(*argv: str):
            release()  # each invocation opens the database afresh, like a new process
            rc = main(["registry", *argv, "--db", url])
            out, err = capsys.readouterr()
            return rc, out, err

        run.url = url
        yield run
        release()


def letter(payload: bytes, reason: str, size: int | None = None) -> None:
    regdb.DeadLetter.create(
        received_at=regdb.now(),
        topic=TOPICS.counts("cam-1"),
        device="cam-1",
        reason=reason,
        payload=payload,
        payload_size=len(payload) if size is None else size,
    )


def test_list_show_and_replay_after_the_fix(cli):
    rc, out, _ = cli("dead-letters", "list")
    assert rc == 0 and out.count("#") == 4 and "database error while storing" in out
    rc, out, _ = cli("dead-letters", "list", "--reason", "not an int", "--json")
    (only,) = json.loads(out)
    assert only["reason"] == "field 'seq': not an int" and only["resolved"] is False

    rc, out, _ = cli("dead-letters", "show", "1")
    shown = json.loads(out)
    assert shown["payload_complete"] and json.loads(shown["payload"])["seq"] == 1

    rc, out, _ = cli("dead-letters", "replay", "--device", "cam-1")
    assert rc == 1, "some letters are still unresolved"
    assert "#1" in out and "stored" in out
    assert "still refused" in out and "truncated" in out
    assert "4 replayed: 2 stored, 0 already stored, 1 still refused" in out

    rc, out, _ = cli("dead-letters", "list")
    assert out.count("#") == 2  # the wrong one and the cut one remain
    rc, out, _ = cli("dead-letters", "list", "--all")
    assert out.count("[replay: stored]") == 2
    rc, out, _ = cli("dead-letters", "replay", "1", "--json")
    assert rc == 0 and json.loads(out)["summary"]["duplicate"] == 1  # replaying is safe

    release()
    db = regdb.open_database(cli.url)
    with db.connection_context():
        assert sorted(b.seq for b in regdb.CountBin.select()) == [1, 2]
        assert ack_state("cam-1") == (2, 2)
        entries = list(
            regdb.AuditEntry.select().where(regdb.AuditEntry.action == "dead-letters-replay")
        )
        assert len(entries) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "name dead letters to replay"),
        (("1", "--all"), "name dead letters to replay"),
        (("1", "--reason", "x"), "--reason goes with --device or --all"),
        (("99",), "dead letter 99 does not exist"),
    ],
)
def test_replay_refuses_unclear_selections(cli, argv, message):
    rc, _, err = cli("dead-letters", "replay", *argv)
    assert rc != 0 and message in err
