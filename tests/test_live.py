"""Live updates (``GET /api/live``, Server-Sent Events) through the production server
(waitress, `HttpServer`) on real SQLite and PostgreSQL; count bins stored through the
registry's real ingest.

Checked: a stream says hello, then ``bins`` when a bin is stored and ``fleet`` when a
device appears; it ends by itself after its lifetime (``bye``) and frees its slot; at
most ``live_streams`` are open at once (one more: 503 with Retry-After, and the slot
of a client that went away is freed); the stream holds no thread past its lifetime.
The dashboard's use of it in a browser is in tests/test_webui.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from flowfleet.contract import CountBin, LineCount, Status, Topics
from flowfleet.registry.fleet.ingest import Ingestor
from flowfleet.registry.http.server import HttpServer
from flowfleet.registry.http.web import create_app

TOPICS = Topics()
LIFETIME_S = 6.0


class Stream:
    """One open /api/live response, read event by event."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        self.conn.request("GET", "/api/live")
        self.resp = self.conn.getresponse()

    def event(self) -> tuple[str, dict | None]:
        """The next event's (name, data); comments and retry lines are skipped."""
        name, data = None, None
        while True:
            line = self.resp.fp.readline().decode()
            if line == "":
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line == "" and name is not None:
                return name, data
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def served(registry):
    app = create_app(registry.db, registry=registry, live_streams=2, live_stream_s=LIFETIME_S)
    server = HttpServer(app, "127.0.0.1", 0, threads=4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.port, app.extensions["flowfleet_live"], Ingestor(registry.db, TOPICS)
    finally:
        app.extensions["flowfleet_live"].close()
        server.shutdown()


def _bin(device: str, seq: int) -> bytes:
    start = float(int(time.time()) // 60 * 60 - 60 * seq)
    rows = (LineCount(camera="front", line="door", class_="person", in_=seq, out=0),)
    return CountBin(device=device, seq=seq, start=start, end=start + 60, lines=rows).to_json()


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_a_stored_bin_and_a_new_device_reach_an_open_stream(served):
    port, streams, ingest = served
    s = Stream(port)
    try:
        assert s.resp.status == 200
        assert s.resp.getheader("Content-Type").startswith("text/event-stream")
        assert s.resp.getheader("Cache-Control") == "no-store"
        name, hello = s.event()
        assert name == "hello" and hello == {"lifetime_s": LIFETIME_S, "tick_s": 0.5}
        t0 = time.monotonic()
        assert ingest.handle(TOPICS.counts("cam-1"), _bin("cam-1", 1)) == "stored"
        # The bin's device is new too: both kinds arrive, in one tick or two.
        seen = {}
        while len(seen) < 2:
            name, data = s.event()
            seen[name] = data
        print(f"the events reached the stream {time.monotonic() - t0:.2f} s after ingest")
        assert seen["bins"]["bins"] == 1 and seen["bins"]["last_bin_at"] > 0
        assert seen["fleet"] == {"devices": 1}
        assert ingest.handle(
            TOPICS.status("cam-1"), Status(device="cam-1", state="online").to_json()
        )
        assert s.event() == ("fleet", {"devices": 1})  # presence changed
        # The stream ends by itself after its lifetime, and frees its slot.
        name, _ = s.event()
        while name != "bye":
            name, _ = s.event()
        assert time.monotonic() - t0 < LIFETIME_S + 5
        with pytest.raises(EOFError):
            s.event()
    finally:
        s.close()
    _wait(lambda: streams.open == 0, 5, "the slot to be freed")


def test_at_most_live_streams_are_open_and_a_gone_client_frees_its_slot(served):
    port, streams, _ = served
    first, second = Stream(port), Stream(port)
    try:
        assert first.event()[0] == "hello" and second.event()[0] == "hello"
        assert streams.open == 2
        third = Stream(port)
        assert third.resp.status == 503
        assert int(third.resp.getheader("Retry-After")) >= 1
        body = json.loads(third.resp.read())
        assert body["error"]["code"] == "too_many_streams"
        third.close()
        # The rest of the API is served meanwhile (the streams hold 2 of 4 threads).
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/devices")
        assert conn.getresponse().status == 200
        conn.close()
        # A client that goes away: its slot is free by the end of the stream's lifetime
        # at the latest (waitress does not read a connection while it serves it, so
        # the server notices only by writing). The other stream, opened at the same
        # time, may end in the same tick.
        first.close()
        _wait(lambda: streams.open <= 1, LIFETIME_S + 5, "the gone client's slot")
        again = Stream(port)
        assert again.event()[0] == "hello"
        again.close()
    finally:
        second.close()
    _wait(lambda: streams.open == 0, LIFETIME_S + 5, "every slot to be freed")
