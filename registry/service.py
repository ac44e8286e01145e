"""Run the registry: MQTT ingest plus the web UI/API in one process.

`run_registry` blocks until it is asked to stop (``stop_event``, Ctrl-C or SIGTERM)
and then shuts both halves down cleanly. Importing this module has no side effects;
the ``flowfleet registry`` CLI calls `run_registry`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

from flowfleet.contract import DEFAULT_ROOT, Topics
from flowfleet.mqtt import BrokerAddress

from .catalog.modelreg import ModelRegistry, RegistryConfig
from .catalog.watch import WatchFolder
from .fleet.commands import CommandPublisher
from .fleet.ingest import IngestWorker
from .http.web import create_app
from .store.db import describe

log = logging.getLogger(__name__)


# How long the broker gets to accept the session before we log that it has not (the
# worker keeps retrying in the background either way).
CONNECT_GRACE_S = 10.0


class _QuietRequestHandler(WSGIRequestHandler):
    """Logs only failed requests: the dashboard polls every 2 s and would flood the log."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(getattr(code, "value", code)).startswith(("4", "5")):
            super().log_request(code, size)


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # listening everywhere; show an address a browser can open
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def run_registry(
    db_path: str | Path,
    broker: BrokerAddress,
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    topics_root: str = DEFAULT_ROOT,
    stop_event: threading.Event | None = None,
    *,
    client_id: str = "flowfleet-registry",
    on_ready: Callable[[str], None] | None = None,
    registry_config: RegistryConfig | None = None,
    anonymous_read: str = "local",
    watch_dir: str | Path | None = None,
) -> None:
    """Ingest device messages from ``broker`` into ``db_path`` and serve the web UI.

    Args:
        db_path: SQLite file or ``sqlite:///`` URL; created if missing.
        broker: the MQTT broker the devices publish to.
        http_host, http_port: where the web UI/API listens; port 0 picks a free port.
        topics_root: topic root shared with the agents (``flowfleet/v1``).
        stop_event: set it to stop; without one, runs until Ctrl-C or SIGTERM.
        client_id: MQTT client id of the persistent ingest session; keep it stable
            so the broker delivers what was queued while the registry was down.
        on_ready: called with the web UI's URL once the web server runs and the
            broker accepted the ingest session (or CONNECT_GRACE_S passed).
        registry_config: artifact store, signing key directory and upload limit of
            the model registry; default `RegistryConfig.beside(db_path)`.
        anonymous_read: dashboard reads without a token: "local", "none" or "all".
        watch_dir: a folder whose dropped model files are registered (see
            `flowfleet.registry.catalog.watch`); none by default.

    Raises OSError if the HTTP port cannot be bound (before anything else starts).
    """
    stop = stop_event if stop_event is not None else threading.Event()
    worker = IngestWorker(db_path, broker, Topics(topics_root), client_id=client_id)
    models = ModelRegistry.from_config(worker.db, registry_config or RegistryConfig.beside(db_path))
    models.start()  # creates the signing key on first start
    topics = Topics(topics_root)

    # Deployments queue the devices' retained desired states in the commands outbox;
    # this publishes them after commit, QoS 1 on the ingest session (its PUBACKs).
    commands = CommandPublisher(worker.db, worker.connection)
    app = create_app(
        worker.db,
        ingest_stats=worker.stats,
        registry=models,
        anonymous_read=anonymous_read,
        commands=commands,
        topics=topics,
    )
    server = make_server(
        http_host, http_port, app, threaded=True, request_handler=_QuietRequestHandler
    )
    watcher = (
        WatchFolder(models, watch_dir, commands=commands, topics=topics)
        if watch_dir is not None
        else None
    )
    url = _url(http_host, server.server_port)
    http_thread = threading.Thread(target=server.serve_forever, name="registry-http", daemon=True)
    restore_signals = _stop_on_sigterm(stop)
    try:
        worker.start()
        commands.start()
        http_thread.start()
        if watcher is not None:
            watcher.start()
        log.info("registry web UI at %s (database %s)", url, describe(worker.db))
        deadline = time.monotonic() + CONNECT_GRACE_S
        while not worker.connected and not stop.is_set() and time.monotonic() < deadline:
            stop.wait(0.05)
        if worker.connected:
            log.info("ingesting from %s under %s/", broker, topics_root)
        elif not stop.is_set():
            log.warning("broker %s has not accepted the session yet; retrying", broker)
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        log.info("registry stopping")
        if watcher is not None:
            watcher.stop()
        if http_thread.is_alive():
            server.shutdown()
        server.server_close()
        commands.stop()  # what is not acknowledged yet is sent on the next start
        # Stop ingest last-but-cleanly: a clean DISCONNECT keeps the persistent
        # session, so the broker queues whatever devices send until the next start.
        worker.stop()
        restore_signals()
        log.info("registry stopped")


def _stop_on_sigterm(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``stop``; returns a function that restores the old handler.

    Signal handlers can only be installed from the main thread; elsewhere (tests, an
    embedding application) the caller's stop_event is the way to stop.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        log.info("SIGTERM received")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
