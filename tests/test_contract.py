"""The wire contract: topics and payload validation."""

from __future__ import annotations

import json

import pytest

from flowfleet.contract import (
    ContractError,
    CountBin,
    LineCount,
    Status,
    Topics,
    parse_payload,
)


def count_bin(**overrides) -> CountBin:
    base = dict(
        device="cam-1",
        seq=1,
        start=1000.0,
        end=1060.0,
        lines=(LineCount(camera="c1", line="door", class_="person", in_=3, out=1),),
    )
    base.update(overrides)
    return CountBin(**base)


def test_topics_round_trip():
    t = Topics()
    assert t.counts("cam-1") == "flowfleet/v1/devices/cam-1/counts"
    assert t.desired("cam-1") == "flowfleet/v1/commands/cam-1/desired"
    assert t.parse_device_topic(t.health("cam-1")) == ("cam-1", "health")


@pytest.mark.parametrize(
    "bad", ["cam/1", "+", "#", "", "a" * 65, "-leading"], ids=lambda s: repr(s)[:12]
)
def test_device_names_that_would_break_topics_are_refused(bad):
    with pytest.raises(ContractError):
        Topics().counts(bad)


def test_count_bin_json_uses_wire_names():
    data = json.loads(count_bin().to_json())
    assert data["schema"] == 1 and data["kind"] == "counts"
    assert data["lines"][0] == {
        "camera": "c1",
        "line": "door",
        "class": "person",
        "in": 3,
        "out": 1,
    }
    assert parse_payload("counts", count_bin().to_json(), device="cam-1") == count_bin()


def _raw(**changes) -> bytes:
    data = json.loads(count_bin().to_json())
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "device", "message"),
    [
        (b"not json", "cam-1", "not JSON"),
        (b"[1, 2]", "cam-1", "not an object"),
        (_raw(schema=2), "cam-1", "'schema'"),
        (_raw(seq=0), "cam-1", "'seq'"),
        (_raw(extra=1), "cam-1", "'extra'"),
        (_raw(end=10.0), "cam-1", "before start"),
        (
            _raw(lines=[{"camera": "c1", "line": "d", "class": "car", "in": -1, "out": 0}]),
            "cam-1",
            "lines.0.in",
        ),
        (_raw(kind="health"), "cam-1", "'kind'"),
        (count_bin().to_json(), "cam-2", "published by 'cam-2'"),
        (b"x" * 200_000, "cam-1", "over the"),
    ],
)
def test_bad_payloads_name_the_problem(raw, device, message):
    with pytest.raises(ContractError, match=message):
        parse_payload("counts", raw, device=device)


def test_status_payload():
    s = Status(device="cam-1", state="offline")
    assert json.loads(s.to_json()) == {
        "schema": 1,
        "device": "cam-1",
        "kind": "status",
        "state": "offline",
    }
