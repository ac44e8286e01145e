"""A real HTTP webhook receiver for tests: http.server on a free port, in a thread.

It verifies every request's signature the way docs/webhooks.md tells a receiver to,
and answers from a script (a status code, "hang" to answer only after the sender's
timeout), then 200 once the script is used up. It can be stopped (the port refuses
connections) and started again on the same port.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: str, headers, body: bytes, tolerance_s: float = 300.0) -> dict:
    """The receiver's check from docs/webhooks.md: raises ValueError unless signed."""
    timestamp = headers["X-Flowfleet-Timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        raise ValueError("stale timestamp")
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest("sha256=" + expected, headers["X-Flowfleet-Signature"]):
        raise ValueError("bad signature")
    return json.loads(body)


@dataclass
class Received:
    headers: dict
    body: bytes
    answered: int | str
    verified: bool

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # webhook name -> secret
    script: list = field(default_factory=list)
    hang_s: float = 1.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    answer = receiver.script.pop(0) if receiver.script else 200
                try:
                    name = json.loads(body)["webhook"]
                    verify(receiver.secrets[name], self.headers, body)
                    ok = True
                except (ValueError, KeyError):
                    ok = False
                with receiver._lock:
                    receiver.requests.append(Received(dict(self.headers), body, answer, ok))
                if answer == "hang":
                    time.sleep(receiver.hang_s)
                    answer = 200
                try:
                    self.send_response(int(answer))
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting (a "hang")

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        """Requests answered 2xx in time (not the hung ones the sender gave up on)."""
        with self._lock:
            return [r for r in self.requests if isinstance(r.answered, int) and r.answered < 300]
