"""Property-based fuzzing of the wire contract and of ingest on a real SQLite registry.

Messages start from valid payloads (`tests.factories.valid_payload`) and get up to
three mutations: a field set to a random JSON value (boundary numbers such as 2**31,
2**53, 2**63 - 1, 2**64, 1e308, the NaN / Infinity tokens, bools, strings, nested
garbage), a field deleted, or an unknown field added; some are cut short or are not
JSON at all. Whatever arrives, `Ingestor.handle` must end in stored, duplicate or
dead-lettered with a reason (never "error", never an exception), and the registry's
pages must keep answering 200 with strictly valid JSON and exact totals.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowfleet import contract as c
from flowfleet.contract import ContractError, Topics, parse_payload
from flowfleet.registry.fleet.ingest import DEAD_LETTER, DUPLICATE, STORED, Ingestor
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.counters_tables import COUNTER_MODELS
from flowfleet.registry.testing import temporary_database
from tests.factories import valid_payload

TOPICS = Topics()
NOW = time.time()
KINDS = (*c.DEVICE_KINDS, *c.COMMAND_KINDS)

BOUNDARY_NUMBERS = [
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**53 - 1,
    2**53,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    c.MAX_COUNT,
    c.MAX_COUNT + 1,
    0.5,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    NOW,
    NOW + 2 * 86_400,
    NOW - 3 * 366 * 86_400,
]

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(BOUNDARY_NUMBERS),
    st.integers(),
    st.floats(),
    st.text(max_size=70),
    st.sampled_from(["", "5", "1e3", "NaN", "car", "x" * 65, "a\x00b", "cam/1", "ü"]),
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def _paths(node, prefix=()):
    """Every (container, key) pair of a JSON document, outermost first."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*prefix, key)
        if isinstance(value, (dict, list)) and value:
            yield from _paths(value, (*prefix, key))


def _parent(body, path):
    for key in path[:-1]:
        body = body[key]
    return body


@st.composite
def messages(draw):
    """(topic, raw bytes) of one message as a device (or anything else) might send."""
    kind = draw(st.sampled_from(c.DEVICE_KINDS))
    device = draw(st.sampled_from(["cam-1", "cam-2"]))
    body = valid_payload(kind, device, seq=draw(st.integers(1, 3)), now=NOW)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(body))))
        parent = _parent(body, path)
        action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "set":
            parent[path[-1]] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    raw = json.dumps(body).encode()  # NaN and Infinity become the bare tokens
    shape = draw(st.sampled_from(["json"] * 8 + ["cut", "bytes"]))
    if shape == "cut":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif shape == "bytes":
        raw = draw(st.binary(max_size=64))
    topic_kind = kind if draw(st.integers(0, 9)) else draw(st.sampled_from(c.DEVICE_KINDS))
    return TOPICS.device(device, topic_kind), raw


# -- the contract alone ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.data())
def test_parse_payload_accepts_only_what_round_trips_as_strict_json(kind, data):
    body = valid_payload(kind, now=NOW)
    for _ in range(data.draw(st.integers(0, 3))):
        path = data.draw(st.sampled_from(list(_paths(body))))
        _parent(body, path)[path[-1]] = data.draw(json_values)
    raw = json.dumps(body).encode()
    try:
        payload = parse_payload(kind, raw, device="cam-1", now=NOW)
    except ContractError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    out = payload.to_json()
    json.loads(out, parse_constant=_refuse_constant)
    assert parse_payload(kind, out, device="cam-1", now=NOW) == payload


def _refuse_constant(token: str):
    raise AssertionError(f"bare {token} in JSON")


# -- ingest and the pages ----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory):
    with temporary_database("sqlite", tmp_path_factory.mktemp("fuzz")) as url:
        db = regdb.open_database(url)
        yield db, Ingestor(db, TOPICS), create_app(db).test_client()


def _empty(db) -> None:
    # The per-device counters ingest keeps beside the raw tables go too, or the next
    # example would read the last one's counts.
    with db.atomic():
        for model in (*reversed(regdb.MODELS), *COUNTER_MODELS):
            model.delete().execute()


def _strict_get(client, url: str):
    resp = client.get(url)
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200, (url, resp.status_code, text[:300])
    if url.startswith("/api/"):
        return json.loads(text, parse_constant=_refuse_constant)
    return text


def _expected_line_totals() -> dict:
    acc: Counter = Counter()
    for row in regdb.CountBin.select():
        for lc in json.loads(row.payload)["lines"]:
            key = (row.device_id, lc["camera"], lc["line"], lc["class"])
            acc[(*key, "in")] += lc["in"]
            acc[(*key, "out")] += lc["out"]
    return {k[:4]: (acc[(*k[:4], "in")], acc[(*k[:4], "out")]) for k in acc}


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(messages(), min_size=1, max_size=4))
def test_ingest_never_fails_and_pages_stay_valid(registry_db, batch):
    db, ingestor, client = registry_db
    _empty(db)
    for topic, raw in batch:
        outcome = ingestor.handle(topic, raw)
        assert outcome in (STORED, DUPLICATE, DEAD_LETTER), (outcome, raw[:200])
        event(f"outcome: {outcome}")  # shown by --hypothesis-show-statistics
        if outcome == DEAD_LETTER:
            letter = regdb.DeadLetter.select().order_by(regdb.DeadLetter.id.desc()).get()
            assert letter.reason.strip(), raw[:200]
            # A payload the contract accepted must store: anything else is a bug.
            assert not letter.reason.startswith("could not validate"), letter.reason
            assert "database error" not in letter.reason, letter.reason

    totals = _strict_get(client, "/api/totals")
    got = {
        (r["device"], r["camera"], r["line"], r["class"]): (r["in"], r["out"])
        for r in totals["lines"]
    }
    assert got == _expected_line_totals()
    for zone in totals["zones"]:
        assert all(math.isfinite(zone[k]) for k in ("entries", "exits", "dwell_s_sum"))
    for dev in _strict_get(client, "/api/devices")["devices"]:
        assert 0 <= dev["gaps"] <= c.MAX_SEQ
    _strict_get(client, "/api/dead-letters")
    _strict_get(client, "/")
