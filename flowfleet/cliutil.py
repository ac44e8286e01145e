"""Shared pieces of the `flowfleet` command line: errors, exit codes, logging, signals.

Each area registers its own subcommands (`agent/cli.py`, `registry/cli/main.py`,
`models/cli.py`, `flowfleet/demo.py`); `flowfleet/cli.py` only assembles them.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line error for the user; ``code`` is the process exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def first_problem(exc, what: str) -> str:
    """The first problem of a pydantic ``ValidationError`` on one line: ``what key:
    problem``, or ``what: problem`` when it concerns the value as a whole."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{what} {where}: {msg}" if where else f"{what}: {msg}"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` so services shut down cleanly."""

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
