"""Prometheus metrics of the registry (``GET /metrics``, text exposition format).

Names follow Prometheus conventions: the ``flowfleet_registry_`` prefix, base units
(seconds, bytes), ``_total`` for counters. Counters live in this process (each
registry worker is scraped on its own; sum them in PromQL); the fleet gauges
(devices by state, model versions, dead letters stored) are read from the database
at scrape time, so every worker reports the same, shared values.

==========================================================  ==========================
metric                                                      labels
==========================================================  ==========================
flowfleet_registry_uploads_total                            result (created, duplicate,
                                                            refused), runtime
flowfleet_registry_deploys_total                            result (ok, failed)
flowfleet_registry_rollbacks_total                          device-reported rollbacks
flowfleet_registry_ingest_messages_total                    kind, outcome (stored,
                                                            duplicate, dead-letter, error)
flowfleet_registry_dead_letters_total                       dead letters written
flowfleet_registry_ingest_batch_size (hist.)                (none): messages per ingest
                                                            transaction
flowfleet_registry_commands_published_total                 commands the broker acknowledged
flowfleet_registry_webhook_attempts_total                   outcome (delivered, failed,
                                                            given_up): webhook POSTs
flowfleet_registry_http_request_duration_seconds (hist.)    method, endpoint, status
flowfleet_registry_devices                                  state (online, offline,
                                                            unknown)
flowfleet_registry_model_versions                           (none)
flowfleet_registry_dead_letters_stored                      (none)
flowfleet_registry_commands_pending                         (none): commands outbox rows not
                                                            yet acknowledged by the broker
flowfleet_registry_commands_oldest_pending_seconds          (none): age of the oldest (0
                                                            when none is pending)
flowfleet_registry_webhook_deliveries_pending               (none): webhook deliveries
                                                            neither delivered nor given up
flowfleet_registry_relay_messages_total                     relay, outcome (forwarded,
                                                            failed, parked)
flowfleet_registry_relay_publishes_total                    relay: cloud messages acked
flowfleet_registry_relay_bytes_total                        relay: bytes acknowledged
flowfleet_registry_relay_billing_units_total                relay: the cloud's units
flowfleet_registry_relay_retries_total                      relay: sends tried again
flowfleet_registry_relay_latency_seconds (hist.)            relay: ingest -> cloud ack
flowfleet_registry_relay_circuit_open                       relay: 1 while the breaker is
                                                            open
flowfleet_registry_relay_outbox                             relay, state (queued, parked)
flowfleet_registry_relay_oldest_queued_seconds              relay
==========================================================  ==========================
"""

from __future__ import annotations

import time

import peewee as pw
from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "flowfleet_registry"

UPLOADS = Counter(
    f"{PREFIX}_uploads_total",
    "Model uploads, by outcome and runtime",
    ("result", "runtime"),
)
DEPLOYS = Counter(
    f"{PREFIX}_deploys_total",
    "Deployments to one device camera (desired state queued in the commands outbox)",
    ("result",),
)
ROLLBACKS = Counter(
    f"{PREFIX}_rollbacks_total",
    "Model rollbacks reported by devices (model_rolled_back events stored)",
)
INGEST = Counter(
    f"{PREFIX}_ingest_messages_total",
    "MQTT messages handled by ingest, by kind and outcome",
    ("kind", "outcome"),
)
DEAD_LETTERS = Counter(f"{PREFIX}_dead_letters_total", "Dead letters written")
INGEST_BATCH = Histogram(
    f"{PREFIX}_ingest_batch_size",
    "Messages stored per ingest transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
COMMANDS_PUBLISHED = Counter(
    f"{PREFIX}_commands_published_total",
    "Commands (desired states) the broker acknowledged, marked published by this process",
)
WEBHOOK_ATTEMPTS = Counter(
    f"{PREFIX}_webhook_attempts_total",
    "Webhook POSTs by this process: delivered (2xx), failed (to be retried), given_up",
    ("outcome",),
)
REQUEST_SECONDS = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "HTTP request latency, by method, route and status",
    ("method", "endpoint", "status"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

RELAY_MESSAGES = Counter(
    f"{PREFIX}_relay_messages_total",
    "Device messages by relay and outcome: forwarded (the cloud acknowledged), failed "
    "(a send failed; retried), parked (refused for good)",
    ("relay", "outcome"),
)
RELAY_PUBLISHES = Counter(
    f"{PREFIX}_relay_publishes_total", "Cloud messages acknowledged", ("relay",)
)
RELAY_BYTES = Counter(f"{PREFIX}_relay_bytes_total", "Bytes the cloud acknowledged", ("relay",))
RELAY_UNITS = Counter(
    f"{PREFIX}_relay_billing_units_total",
    "Billing units used (AWS 5 KB, Azure 4 KB, Pub/Sub 1,000 bytes per message at least)",
    ("relay",),
)
RELAY_RETRIES = Counter(f"{PREFIX}_relay_retries_total", "Sends tried again", ("relay",))
RELAY_LATENCY = Histogram(
    f"{PREFIX}_relay_latency_seconds",
    "End to end: ingest received a message -> the cloud acknowledged it",
    ("relay",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
RELAY_CIRCUIT = Gauge(
    f"{PREFIX}_relay_circuit_open", "1 while the relay's circuit breaker is open", ("relay",)
)
RELAY_QUOTA_HELD = Gauge(
    f"{PREFIX}_relay_quota_held",
    "1 while the relay holds messages in its outbox because the cloud's daily quota "
    "(Azure IoT Hub tier x units) is used up; they go at the next UTC day",
    ("relay",),
)
RELAY_QUOTA_LEFT = Gauge(
    f"{PREFIX}_relay_quota_left",
    "Quota blocks the relay may still send today (relays with a daily quota)",
    ("relay",),
)

# Read from the database at scrape time (shared by every worker).
_SCRAPE = CollectorRegistry(auto_describe=True)
DEVICES = Gauge(f"{PREFIX}_devices", "Devices by state", ("state",), registry=_SCRAPE)
VERSIONS = Gauge(f"{PREFIX}_model_versions", "Model versions registered", registry=_SCRAPE)
DEAD_STORED = Gauge(
    f"{PREFIX}_dead_letters_stored", "Dead letters in the database", registry=_SCRAPE
)
COMMANDS_PENDING = Gauge(
    f"{PREFIX}_commands_pending",
    "Commands in the outbox not yet acknowledged by the broker",
    registry=_SCRAPE,
)
COMMANDS_OLDEST = Gauge(
    f"{PREFIX}_commands_oldest_pending_seconds",
    "Age of the oldest pending command (0 when none is pending)",
    registry=_SCRAPE,
)

WEBHOOKS_PENDING = Gauge(
    f"{PREFIX}_webhook_deliveries_pending",
    "Webhook deliveries neither delivered nor given up",
    registry=_SCRAPE,
)


RELAY_OUTBOX = Gauge(
    f"{PREFIX}_relay_outbox",
    "Relay outbox rows by state (queued: to send; parked: refused for good)",
    ("relay", "state"),
    registry=_SCRAPE,
)
RELAY_OLDEST = Gauge(
    f"{PREFIX}_relay_oldest_queued_seconds",
    "Age of the relay's oldest queued message (0 when none)",
    ("relay",),
    registry=_SCRAPE,
)


def _refresh_relay_gauges() -> None:
    from .relays.outbox import depth

    RELAY_OUTBOX.clear()  # a relay whose outbox emptied has no row left to report
    RELAY_OLDEST.clear()
    for relay, d in depth().items():
        RELAY_OUTBOX.labels(relay, "queued").set(d["queued"])
        RELAY_OUTBOX.labels(relay, "parked").set(d["parked"])
        RELAY_OLDEST.labels(relay).set(d["oldest_queued_s"])


def _refresh_fleet_gauges() -> None:
    from .store.db import DEVICE_STATES, DeadLetter, Device, ModelVersion

    # Runs inside a request, which already holds this thread's connection.
    counts = dict(
        Device.select(Device.state, pw.fn.COUNT(Device.id)).group_by(Device.state).tuples()
    )
    for state in DEVICE_STATES:
        DEVICES.labels(state=state).set(counts.get(state, 0))
    VERSIONS.set(ModelVersion.select().count())
    DEAD_STORED.set(DeadLetter.select().count())
    from .fleet.commands import pending_summary

    summary = pending_summary()
    COMMANDS_PENDING.set(summary["pending"])
    COMMANDS_OLDEST.set(summary["oldest_pending_s"] or 0)
    from .store.webhook_tables import WebhookDelivery

    WEBHOOKS_PENDING.set(
        WebhookDelivery.select()
        .where(WebhookDelivery.delivered_at.is_null() & WebhookDelivery.given_up_at.is_null())
        .count()
    )
    _refresh_relay_gauges()


def install_metrics(app: Flask) -> None:
    """Time every request and serve ``GET /metrics`` (access: see registry.api)."""

    @app.before_request
    def _start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        started = g.pop("metrics_started", None)
        if started is not None:
            # The route pattern, not the path: one series per endpoint, not per model.
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            REQUEST_SECONDS.labels(request.method, endpoint, str(resp.status_code)).observe(
                time.perf_counter() - started
            )
        return resp

    @app.get("/metrics", endpoint="metrics")
    def metrics() -> Response:
        _refresh_fleet_gauges()
        body = generate_latest(REGISTRY) + generate_latest(_SCRAPE)
        return Response(body, mimetype=CONTENT_TYPE_LATEST)
