"""Keep native runtimes' chatter on stderr away from the user unless asked for.

LiteRT's C++ code prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``
straight to file descriptor 2 when an interpreter is prepared: Python's
``sys.stderr`` and logging never see it, so it reached every ``flowfleet count``.
`captured_stderr` points fd 2 at a temporary file around such a call, then logs the
known informational lines at DEBUG (shown with ``-v``) and writes anything else back
to the real stderr, so a warning or an error from the runtime is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading

log = logging.getLogger(__name__)

# Lines a runtime prints on every start that say nothing a user must act on.
CHATTER = ("INFO: Created TensorFlow Lite", "INFO: Initialized TensorFlow Lite runtime")

_lock = threading.Lock()  # fd 2 is process-wide: one redirection at a time


@contextlib.contextmanager
def captured_stderr():
    """Run the body with fd 2 redirected; then route what was written (see module doc).

    Python-level writes to ``sys.stderr`` by other threads in that window (a log
    line) land in the same file and are written back afterwards, not dropped.
    """
    with _lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            # No usable fd 2 (a closed stderr, an embedded interpreter): nothing to hide.
            yield
            return
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace")
    _route(text)


def _route(text: str) -> None:
    rest = []
    for line in text.splitlines(keepends=True):
        if line.startswith(CHATTER):
            log.debug("runtime: %s", line.rstrip())
        else:
            rest.append(line)
    if rest:
        sys.stderr.write("".join(rest))
        sys.stderr.flush()
