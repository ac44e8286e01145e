"""`flowfleet registry`: run the registry (ingest and web)."""

from __future__ import annotations

import argparse
import threading

from flowfleet.cliutil import CliError, setup_logging, stop_on_signals


def register(sub) -> None:
    p = sub.add_parser("registry", help="run the registry: MQTT ingest and web UI")
    p.add_argument("--db", default="flowfleet-registry.sqlite", help="SQLite database file")
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, default=1883)
    p.add_argument("--topic-root", default="flowfleet/v1")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_registry)


def cmd_registry(args: argparse.Namespace) -> int:
    try:
        from flowfleet.registry.service import run_registry
    except ImportError as exc:
        raise CliError(
            f"the registry needs its extras: pip install 'flowfleet[registry]' ({exc})"
        ) from None
    from flowfleet.mqtt import BrokerAddress

    setup_logging(args.verbose)
    stop = threading.Event()
    stop_on_signals(stop)
    run_registry(
        args.db,
        BrokerAddress(args.broker_host, args.broker_port),
        args.http_host,
        args.http_port,
        args.topic_root,
        stop,
    )
    return 0
