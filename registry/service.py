"""Run the registry: MQTT ingest plus the web UI/API in one process.

`run_registry` blocks until it is asked to stop (``stop_event``, Ctrl-C or SIGTERM)
and then shuts both halves down cleanly. Importing this module has no side effects;
the ``flowfleet registry`` CLI calls `run_registry` with the settings of its config
file (`flowfleet.registry.config`).

The web UI and API are served by waitress (`flowfleet.registry.http.server`).

When the broker refuses the registry's credentials on the first connection, the
registry stops and `run_registry` raises `BrokerRefused` (the CLI exits 1 with that one
line): nothing would ever be ingested, and a service manager shows the failure at
once. When it refuses them later (a password rotated on the broker first), the registry
logs one error for that outage and keeps retrying with backoff, serving the web UI
meanwhile.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flowfleet.contract import DEFAULT_ROOT, Topics
from flowfleet.mqtt import AUTH_REFUSALS, BrokerAddress, MqttConnection

from .catalog.modelreg import ModelRegistry, RegistryConfig
from .catalog.watch import WatchFolder
from .config import (
    DriftSection,
    EnrollmentSection,
    IngestSection,
    MapSection,
    RolloutsSection,
    WebhooksSection,
)
from .errors import BrokerRefused
from .fleet.commands import CommandPublisher
from .fleet.drift import DriftJudge
from .fleet.retention import RetentionJob
from .fleet.rollout_gates import default_gates
from .fleet.rollout_job import RolloutJob
from .fleet.rollout_steps import RolloutStepper
from .fleet.shadow import agreement_source, drift_shadow_source
from .fleet.webhooks import WebhookJob
from .fleet.worker import IngestWorker, WorkerPool, retire_workers
from .http.server import HttpServer, ProxyTrust
from .http.web import create_app
from .relays.settings import RelaysSection
from .store.db import describe

log = logging.getLogger(__name__)


# How long the broker gets to accept the session before we log that it has not (the
# worker keeps retrying in the background either way).
CONNECT_GRACE_S = 10.0


def _identity(broker: BrokerAddress) -> str:
    """Who the registry is on the broker, for error messages (never the password)."""
    if broker.username:
        return f"user {broker.username!r}"
    if broker.cert_file:
        return f"client certificate {broker.cert_file}"
    return "no credentials"


class _RefusalWatch:
    """Tells a refused first connection from a refusal after the registry was in,
    and reports the latter once per outage (MqttConnection logs the rest at debug)."""

    def __init__(self, broker: BrokerAddress) -> None:
        self.broker = broker
        self.connection: MqttConnection | None = None
        self.first = threading.Event()  # credentials refused before any session
        self.message = ""
        self._reported_after = -1  # the session count when the last error was logged

    def refused(self, reason: str, code: int) -> None:  # paho's thread
        auth = code in AUTH_REFUSALS
        what = "the registry's credentials" if auth else "the registry's session"
        self.message = f"broker {self.broker} refused {what} ({_identity(self.broker)}): {reason}"
        sessions = self.connection.connects if self.connection is not None else 0
        if sessions == 0 and auth:
            self.first.set()
        elif self._reported_after != sessions:
            self._reported_after = sessions
            log.error("%s; retrying with backoff", self.message)


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # listening everywhere; show an address a browser can open
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _enrollment_settings(section: EnrollmentSection | None, topics_root: str):
    if section is None or not section.ca_dir:
        return None
    from .fleet.enrollment import EnrollmentSettings

    return EnrollmentSettings(
        Path(section.ca_dir),
        section.broker_host or "",
        section.broker_port,
        topics_root,
        section.cert_days,
        Path(section.broker_dir) if section.broker_dir else None,
        Path(section.broker_pidfile) if section.broker_pidfile else None,
        broker_auth=section.broker_auth,
        broker_acl=section.broker_acl,
        broker_admins=tuple(section.broker_admins),
        broker_password_base=(
            Path(section.broker_password_base) if section.broker_password_base else None
        ),
        broker_reload_command=section.broker_reload_command,
        broker_password_port=section.broker_password_port,
        rate_limit_window_s=section.rate_limit_window_s,
        rate_limit_per_address=section.rate_limit_per_address,
        rate_limit_per_token=section.rate_limit_per_token,
    )


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
    http_threads: int = 8,
    live_streams: int | None = None,
    live_stream_s: float = 60.0,
    proxy: ProxyTrust | None = None,
    site_timezone: str = "UTC",
    raw_retention_days: float | None = 90.0,
    ingest: IngestSection | None = None,
    stale_after_s: float = 180.0,
    webhooks: WebhooksSection | None = None,
    drift: DriftSection | None = None,
    rollouts: RolloutsSection | None = None,
    relays: RelaysSection | None = None,
    map_section: MapSection | None = None,
    enrollment: EnrollmentSection | None = None,
) -> None:
    """Ingest device messages from ``broker`` into ``db_path`` and serve the web UI.

    Args:
        db_path: SQLite file or ``sqlite:///`` URL; created if missing.
        broker: the MQTT broker the devices publish to, with the registry's
            credentials (username and password, and/or TLS CA and client certificate).
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
        http_threads: requests the web server handles at once.
        live_streams, live_stream_s: Server-Sent Events streams (``/api/live``) open
            at once (None: half of ``http_threads``, at most 4; always fewer than the
            threads) and how long each lasts (`flowfleet.registry.http.live_api`).
        proxy: which reverse-proxy headers to believe; none by default.
        site_timezone: IANA name of the site's timezone: day rollups (and the day
            buckets of /api/series) run from its midnight to midnight.
        raw_retention_days: raw count bins, health beats and shadow-comparison
            windows older than this are removed once an hour (the rollups keep every
            count); None keeps them.
        ingest: how many ingest workers share the device subscription (worker 1 in
            this process, the others in child processes) and their batches.
        stale_after_s: a device silent for longer is shown with presence "stale".
        webhooks: the ``[webhooks]`` section: audit entries are sent to the configured
            webhooks by a job in this process (every registry process runs one; they
            share the work through the database).
        drift: the drift judge's settings (`DriftSection`); its passes run every
            ``interval_s`` unless ``enabled`` is false.
        rollouts: the rollout job (on unless ``enabled`` is false; one registry
            process at a time steps rollouts, through a lease) and plan defaults.
        relays: the cloud relays (`flowfleet.registry.relays`): ingest queues what they
            forward, and a job in this process forwards it (one process per relay at a
            time, through a lease).
        map_section: the web UI map's tile URL and attribution (`MapSection`); none:
            markers on a plain background.
        enrollment: the ``[enrollment]`` section: with a ``ca_dir``, devices enroll
            by claim at ``POST /api/enroll`` (`flowfleet.registry.fleet.enrollment`).

    Raises OSError if the HTTP port cannot be bound (before anything else starts), and
    BrokerRefused if the broker refuses the registry's credentials on the first
    connection (after stopping what it started).
    """
    stop = stop_event if stop_event is not None else threading.Event()
    refusals = _RefusalWatch(broker)
    ingest = ingest or IngestSection()
    relays = relays or RelaysSection()
    relay_routes = relays.routes()
    relay_job = None
    worker = IngestWorker(
        db_path,
        broker,
        Topics(topics_root),
        client_id=client_id,
        on_connect_refused=refusals.refused,
        site_timezone=site_timezone,
        shared=ingest.workers > 1,
        batch_max=ingest.batch_max,
        batch_wait_s=ingest.batch_wait_ms / 1000.0,
        store=ingest.store,
        relay_routes=relay_routes,
        on_relays_queued=lambda: relay_job.wake() if relay_job is not None else None,
    )
    pool = (
        WorkerPool(
            ingest.workers,
            db_path,
            broker,
            topics_root,
            client_id,
            site_timezone,
            ingest.batch_max,
            ingest.batch_wait_ms / 1000.0,
            ingest.store,
            relay_routes,
        )
        if ingest.workers > 1
        else None
    )

    def ingest_stats() -> dict[str, object]:
        stats = worker.stats()
        stats["workers"] = 1 + (pool.alive() if pool is not None else 0)
        return stats

    refusals.connection = worker.connection
    fill_rollups(worker.db, worker.ingestor.buckets)
    models = ModelRegistry.from_config(worker.db, registry_config or RegistryConfig.beside(db_path))
    models.start()  # creates the signing key on first start
    topics = Topics(topics_root)

    # Deployments queue the devices' retained desired states in the commands outbox;
    # this publishes them after commit, QoS 1 on the ingest session (its PUBACKs).
    commands = CommandPublisher(worker.db, worker.connection)
    webhooks = webhooks or WebhooksSection()
    hooks = WebhookJob(worker.db, webhooks.job_settings()) if webhooks.enabled else None
    from .relays.job import build_job

    relay_job = build_job(worker.db, relays)
    enroll_settings = _enrollment_settings(enrollment, topics_root)
    if enroll_settings is not None and enroll_settings.broker_auth:
        # The broker's password file and ACL match the records from the start (the
        # registry's own password line included, before ingest connects).
        from .fleet import broker_auth

        with worker.db.connection_context():
            broker_auth.sync(enroll_settings)
    app = create_app(
        worker.db,
        ingest_stats=ingest_stats,
        registry=models,
        anonymous_read=anonymous_read,
        commands=commands,
        topics=topics,
        site_timezone=site_timezone,
        stale_after_s=stale_after_s,
        webhooks=hooks,
        map_tiles=map_section.tiles if map_section is not None else None,
        map_attribution=map_section.attribution if map_section is not None else "",
        enrollment=enroll_settings,
        live_streams=min(
            min(4, http_threads // 2) if live_streams is None else live_streams,
            max(0, http_threads - 1),
        ),
        live_stream_s=live_stream_s,
    )
    rollouts = rollouts or RolloutsSection()
    # Staged rollouts: the job steps them (a lease keeps it to one registry process);
    # the API wakes it, and runs an abort through its stepper at once.
    rollout_job = (
        RolloutJob(
            RolloutStepper(
                models,
                gates=default_gates(agreement_source()),
                commands=commands,
                topics=topics,
            ),
            tick_s=rollouts.tick_s,
            lease_s=rollouts.lease_s,
        )
        if rollouts.enabled
        else None
    )
    app.extensions["flowfleet_rollout_job"] = rollout_job
    app.extensions["flowfleet_relays"] = relay_job
    app.extensions["flowfleet_rollout_defaults"] = rollouts.plan_defaults()
    server = HttpServer(app, http_host, http_port, threads=http_threads, proxy=proxy)
    watcher = (
        WatchFolder(models, watch_dir, commands=commands, topics=topics)
        if watch_dir is not None
        else None
    )
    webhook_log_days = webhooks.log_retention_days or None
    retention = (
        RetentionJob(worker.db, raw_retention_days, webhook_log_days=webhook_log_days)
        if raw_retention_days or webhook_log_days
        else None
    )
    drift = drift or DriftSection()
    # The drift judge runs in every registry process; its named lock makes passes
    # take turns, and its cursor means a window is judged once.
    judge = (
        DriftJudge(
            worker.db,
            models,
            drift.stats_settings(),
            drift.judge_options(),
            commands=commands,
            topics=topics,
            shadow=drift_shadow_source(),
        )
        if drift.enabled
        else None
    )
    url = _url(http_host, server.port)
    http_thread = threading.Thread(target=server.serve_forever, name="registry-http", daemon=True)
    restore_signals = _stop_on_sigterm(stop)
    try:
        worker.start()
        if pool is not None:
            pool.start()
        threading.Thread(
            target=_retire_workers,
            args=(broker, client_id, ingest.workers),
            name="ingest-retire",
            daemon=True,
        ).start()
        commands.start()
        http_thread.start()
        if watcher is not None:
            watcher.start()
        if retention is not None:
            retention.start()
        if hooks is not None:
            hooks.start()
        if judge is not None:
            judge.start(drift.interval_s)
        if rollout_job is not None:
            rollout_job.start()
        if relay_job is not None:
            relay_job.start()
        log.info(
            "registry web UI at %s (waitress, %d threads; database %s)",
            url,
            http_threads,
            describe(worker.db),
        )
        deadline = time.monotonic() + CONNECT_GRACE_S
        while (
            not worker.connected
            and not refusals.first.is_set()
            and not stop.is_set()
            and time.monotonic() < deadline
        ):
            stop.wait(0.05)
        if refusals.first.is_set():
            raise BrokerRefused(refusals.message)
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
        if retention is not None:
            retention.stop()
        if hooks is not None:
            hooks.stop()  # what is not delivered yet is sent after the next start
        if judge is not None:
            judge.stop()
        if rollout_job is not None:
            rollout_job.stop()  # gives the lease up: another registry may take over now
        if relay_job is not None:
            relay_job.stop()  # what the clouds did not acknowledge is sent after a restart
        app.extensions["flowfleet_live"].close()  # live streams end before the server stops
        if http_thread.is_alive():
            server.shutdown()
        server.close()
        commands.stop()  # what is not acknowledged yet is sent on the next start
        if pool is not None:
            pool.stop()
        # Stop ingest last-but-cleanly: a clean DISCONNECT keeps the persistent
        # session, so the broker queues whatever devices send until the next start.
        worker.stop()
        restore_signals()
        log.info("registry stopped")


def _retire_workers(broker: BrokerAddress, client_id: str, workers: int) -> None:
    """Sessions of ingest workers beyond those configured would keep taking a share of
    the shared subscription: discard them (see `retire_workers`)."""
    try:
        retired = retire_workers(broker, client_id, workers)
    except Exception:
        log.exception("could not retire the sessions of ingest workers beyond %d", workers)
        return
    if retired:
        log.warning(
            "discarded the broker sessions of ingest workers no longer configured (%s) and "
            "what was queued there; devices send again every count bin the registry has not "
            "confirmed",
            ", ".join(retired),
        )


def fill_rollups(db, buckets) -> None:
    """Bins stored before the rollups existed: fill the rollups once, at start."""
    from .fleet import series
    from .store.db import CountBin, LineRollup, SpeedRollup, ZoneRollup

    if any(m.select().exists() for m in (LineRollup, ZoneRollup, SpeedRollup)):
        return
    if not CountBin.select().exists():
        return
    total = CountBin.select().count()
    log.info("filling the rollups from %d stored count bins (%s days)", total, buckets.name)
    n = series.rebuild(db, buckets, progress=lambda n: log.info("rollups: %d of %d bins", n, total))
    log.info("rollups filled from %d bins", n)


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
