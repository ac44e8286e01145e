"""``GET /api/live``: Server-Sent Events that tell an open page when to re-read the API.

Events (``event:`` name, ``data:`` JSON):

* ``hello``: at the start: ``{"lifetime_s", "tick_s"}``;
* ``bins``: count bins arrived (``{"bins": total received, "last_bin_at"}``);
* ``fleet``: a device appeared, changed presence or reported a new state, or a
  rollout changed (``{"devices": n}``);
* ``bye``: the stream's lifetime is over; the browser's ``EventSource`` reconnects by
  itself after the ``retry`` the stream announced.

The events carry no data a page shows: the page re-reads the same REST API it polls
otherwise, so the live path cannot show anything the API would not.

Why bounded: the production server (waitress, `flowfleet.registry.http.server`) serves
each request on one of a fixed pool of threads, and a stream holds its thread while
open. So a stream ends after ``lifetime_s`` (the browser reconnects), and at most
``max_streams`` are open at once: one more is refused with 503 and ``Retry-After``,
and the page falls back to short polling (`static/dashboard.js`). Waitress does not
read a connection while it answers it, so a closed tab is noticed only by writing
(an event, the keep-alive comment every 15 s): its slot is free by the end of the
stream's lifetime at the latest. Readable wherever the dashboard is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from flask import Blueprint, Response, current_app

from ..errors import RegistryError
from ..fleet import live
from .api import error_response, query_args

bp = Blueprint("live", __name__)

KEEPALIVE_S = 15.0  # a comment this often: proxies keep the connection, we notice a closed one


@dataclass
class LiveStreams:
    """How many streams may be open, for how long, and how often they look."""

    max_streams: int = 4
    lifetime_s: float = 60.0
    tick_s: float = 0.5
    retry_ms: int = 1000
    _open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def acquire(self) -> bool:
        with self._lock:
            if self._open >= self.max_streams:
                return False
            self._open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._open -= 1

    def close(self, timeout: float = 2.0) -> bool:
        """End every stream at its next tick and wait (up to ``timeout``) until they
        have: called before the server stops, so no stream writes to a closed socket.
        True when none is left open."""
        self.closing.set()
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.open

    @property
    def open(self) -> int:
        """Streams open now."""
        with self._lock:
            return self._open


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@bp.get("/api/live")
def api_live():
    query_args(())
    streams: LiveStreams = current_app.extensions["flowfleet_live"]
    if not streams.acquire():
        busy = error_response(
            RegistryError(
                503,
                "too_many_streams",
                f"{streams.max_streams} live streams are open, the most this registry "
                "serves; poll the API instead",
            )
        )
        busy.headers["Retry-After"] = str(max(1, round(streams.lifetime_s / 2)))
        return busy
    db = current_app.extensions["flowfleet_db"]
    released = threading.Event()

    def release() -> None:
        # Called when the server closes the response: also when the client went away
        # before the stream started (a generator that never ran has no finally to run).
        if not released.is_set():
            released.set()
            streams.release()

    def stream() -> Iterator[str]:
        # Flask has closed the request's connection by now (the response is streamed
        # after the view returns): this thread opens its own and closes it at the end.
        opened = False
        try:
            opened = db.connect(reuse_if_open=True)
            yield f"retry: {streams.retry_ms}\n\n" + _event(
                "hello", {"lifetime_s": streams.lifetime_s, "tick_s": streams.tick_s}
            )
            start = last_write = time.monotonic()
            last = live.markers()
            while time.monotonic() - start < streams.lifetime_s and not streams.closing.is_set():
                if streams.closing.wait(streams.tick_s):
                    break
                marks = live.markers()
                out = []
                if marks["bins"] != last["bins"]:
                    out.append(
                        _event("bins", {"bins": marks["bins"][0], "last_bin_at": marks["bins"][1]})
                    )
                if marks["fleet"] != last["fleet"]:
                    out.append(_event("fleet", {"devices": marks["fleet"][0]}))
                last = marks
                if not out and time.monotonic() - last_write >= KEEPALIVE_S:
                    out.append(": keep-alive\n\n")
                if out:
                    last_write = time.monotonic()
                    yield "".join(out)
            yield _event("bye", {"reconnect_ms": streams.retry_ms})
        finally:
            if opened and not db.is_closed():
                db.close()

    resp = Response(stream(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    resp.call_on_close(release)
    return resp
