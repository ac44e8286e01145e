"""The shadow parts of the wire contract: the desired state's ``shadow`` entry and the
device's shadow window (bounds, consistency, compatibility)."""

from __future__ import annotations

import json
import time

import pytest

from flowfleet.contract import ContractError, Topics, parse_payload
from flowfleet.contract_shadow import ShadowWindow, agreement_of
from tests.factories import shadow_window, valid_payload

NOW = time.time()


def test_a_desired_state_without_shadow_is_what_it_always_was():
    body = valid_payload("desired", now=NOW)
    desired = parse_payload("desired", json.dumps(body).encode(), device="cam-1")
    assert desired.shadow is None
    assert "shadow" not in json.loads(desired.to_json())


@pytest.mark.parametrize(
    ("shadow", "error"),
    [
        ({"front": {"model": "MODEL"}}, None),
        ({"front": {"model": "MODEL", "share": 0.25}}, None),
        ({"front": {"model": "MODEL", "share": 1}}, None),
        ({"front": {"model": "MODEL", "share": 0}}, "field 'shadow.front.share'"),
        ({"front": {"model": "MODEL", "share": 1.5}}, "field 'shadow.front.share'"),
        ({"front": {"share": 0.5}}, "field 'shadow.front.model': Field required"),
        ({"front": {"model": "MODEL", "rate": 1}}, "field 'shadow.front.rate'"),
        ({"a/b": {"model": "MODEL"}}, "field 'shadow.a/b.[key]'"),
    ],
)
def test_desired_shadow_entries(shadow, error):
    body = valid_payload("desired", now=NOW)
    model = body["models"]["front"]
    body["shadow"] = {
        cam: {k: (model if v == "MODEL" else v) for k, v in entry.items()}
        for cam, entry in shadow.items()
    }
    raw = json.dumps(body).encode()
    if error is None:
        desired = parse_payload("desired", raw, device="cam-1")
        assert desired.shadow["front"].model.sha256 == model["sha256"]
        assert parse_payload("desired", desired.to_json()) == desired
    else:
        with pytest.raises(ContractError) as exc:
            parse_payload("desired", raw, device="cam-1")
        assert str(exc.value).startswith(error), str(exc.value)


def test_shadow_topic_and_round_trip():
    topics = Topics("site/v1")
    assert topics.shadow("cam-1") == "site/v1/devices/cam-1/shadow"
    assert topics.parse_device_topic("site/v1/devices/cam-1/shadow") == ("cam-1", "shadow")
    body = shadow_window("cam-1", 5, NOW - 600)
    window = parse_payload("shadow", json.dumps(body).encode(), device="cam-1", now=NOW)
    assert isinstance(window, ShadowWindow)
    assert parse_payload("shadow", window.to_json(), device="cam-1", now=NOW) == window
    empty = shadow_window("cam-1", 6, NOW - 600, boxes=(0, 0), matched=0)
    assert "agreement" not in json.loads(
        parse_payload("shadow", json.dumps(empty).encode()).to_json()
    )


@pytest.mark.parametrize(
    ("matched", "active", "candidate", "agreement"),
    [(0, 0, 0, None), (10, 10, 10, 1.0), (5, 10, 5, 0.6667), (0, 10, 0, 0.0)],
)
def test_agreement_of(matched, active, candidate, agreement):
    assert agreement_of(matched, active, candidate) == agreement
