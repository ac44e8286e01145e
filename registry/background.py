"""The registry's background loops share one shape: a daemon thread that runs a pass
every tick, at once when `wake` is called (a row was committed that it should act on),
and again straight away while a pass says more work is waiting.

`BackgroundLoop` holds that shape once; the command publisher, the rollout job, the
webhook sender and each cloud relay subclass it and supply `run_pass`. A pass that
raises is logged at WARNING once per failure spell (a database outage would otherwise
log every tick) and retried at the next tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import peewee as pw

log = logging.getLogger(__name__)


@contextmanager
def thread_connection(db: pw.Database) -> Iterator[None]:
    """This thread's database connection, opened (and closed) only if it has none
    (peewee's ``connection_context`` would close a caller's open connection)."""
    opened = db.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened:
            db.close()


class BackgroundLoop:
    """A daemon thread running `run_pass` every `wait_s` seconds, sooner on `wake`.

    Subclasses set ``thread_name`` and ``what`` (for the log), and override
    `run_pass` (return True when more work is waiting, to run again at once),
    `wait_s` (seconds until the next pass) and `join_s` (how long `stop` waits for a
    pass in progress).
    """

    thread_name = "registry-loop"
    what = "a background pass"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_pass(self) -> bool:
        raise NotImplementedError

    def wait_s(self) -> float:
        return 1.0

    def join_s(self) -> float:
        return 10.0

    def start(self) -> None:
        """Start the thread (a second call while it runs does nothing)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a pass now rather than at the next tick."""
        self._wake.set()

    def stop_thread(self) -> None:
        """Stop the thread, waiting up to `join_s` for a pass in progress."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.join_s())
            self._thread = None

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                more = self.run_pass()
                failing = False
                if more:
                    continue
            except Exception:
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "%s failed; retrying",
                    self.what,
                    exc_info=True,
                )
                failing = True
            self._wake.wait(self.wait_s())
            self._wake.clear()
