"""`flowfleet relays ...` and `flowfleet provision gcp|aws`.

``relays report`` prints the comparison over a period (per cloud: messages, bytes,
billing units, failures, retries, latency percentiles, estimated monthly bill now and
with twice the fleet); ``relays status`` the outboxes (queued, parked, oldest);
``relays parked`` the parked messages with their reasons; ``relays requeue RELAY``
sends a relay's parked messages again. They read the registry database of
``--config`` / ``--db`` like ``flowfleet registry`` does.

``provision gcp`` creates the Pub/Sub topic and a subscription; ``provision aws`` the
IoT thing, certificate and policy of the relay identity. Exit codes: 0 done, 1 the
cloud failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
import time

from flowfleet.cliutil import EXIT_USAGE, CliError


def _db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="registry TOML file")
    p.add_argument("--db", help="database path or URL (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def register(sub) -> None:
    """Add the ``relays`` command to the top-level parser."""
    relays = sub.add_parser("relays", help="cloud relays: report, status, parked messages")
    rsub = relays.add_subparsers(dest="relays_action", metavar="ACTION", required=True)
    rep = rsub.add_parser("report", help="per cloud: volume, quality, latency, monthly bill")
    _db_options(rep)
    rep.add_argument(
        "--hours", type=float, default=24.0, help="the period: the last HOURS (default 24)"
    )
    rep.set_defaults(func=cmd_report)
    st = rsub.add_parser("status", help="each relay's outbox: queued, parked, oldest")
    _db_options(st)
    st.set_defaults(func=cmd_status)
    pk = rsub.add_parser("parked", help="parked messages and why")
    _db_options(pk)
    pk.add_argument("--relay", choices=("aws", "azure", "gcp"))
    pk.add_argument("--limit", type=int, default=100)
    pk.set_defaults(func=cmd_parked)
    rq = rsub.add_parser("requeue", help="send a relay's parked messages again")
    _db_options(rq)
    rq.add_argument("relay", choices=("aws", "azure", "gcp"))
    rq.set_defaults(func=cmd_requeue)


def add_provision_gcp(actions) -> None:
    """Add ``flowfleet provision gcp`` (listed in `flowfleet.provisioning.cli.ACTIONS`)."""
    gcp = actions.add_parser("gcp", help="create the relay's Pub/Sub topic and a subscription")
    gcp.add_argument("--config", metavar="FILE", help="registry TOML file ([relays.gcp])")
    gcp.add_argument("--project", help="overrides [relays.gcp] project")
    gcp.add_argument("--topic", help="overrides [relays.gcp] topic")
    gcp.add_argument("--emulator-host", help="host:port of a Pub/Sub emulator")
    gcp.add_argument("--subscription", required=True, help="the pull subscription to create")
    gcp.add_argument("--no-ordering", action="store_true", help="without message ordering")
    gcp.add_argument("--json", action="store_true", help="print JSON")
    gcp.set_defaults(func=cmd_provision_gcp)


def add_provision_aws(actions) -> None:
    """Add ``flowfleet provision aws`` (listed in `flowfleet.provisioning.cli.ACTIONS`)."""
    aws = actions.add_parser("aws", help="create the relay's IoT thing, certificate and policy")
    aws.add_argument("--thing", default="flowfleet-relay", help="thing name = MQTT client id")
    aws.add_argument("--out", required=True, help="folder for <thing>.crt and <thing>.key")
    aws.add_argument("--region", required=True)
    aws.add_argument("--topic-prefix", default="flowfleet")
    aws.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections the relay holds ([relays.aws] connections): the policy allows "
        "each one's client id",
    )
    aws.add_argument("--endpoint-url", help="another IoT API endpoint (moto in tests)")
    aws.add_argument("--json", action="store_true", help="print JSON")
    aws.set_defaults(func=cmd_provision_aws)


def _open(args: argparse.Namespace):
    from flowfleet.registry.cli.common import _db_url
    from flowfleet.registry.store.db import open_database

    try:
        return open_database(_db_url(args))
    except (ValueError, OSError) as exc:
        raise CliError(f"--db: {exc}", EXIT_USAGE) from None


def _print(args, value, text: str) -> None:
    import json

    if args.json:
        json.dump(value, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, render_text

    if not 0 < args.hours <= 24 * 366:
        raise CliError("--hours: give a number of hours between 0 and 8784", EXIT_USAGE)
    db = _open(args)
    until = time.time()
    with db.connection_context():
        report = build_report(until - args.hours * 3600, until, quotas=_quotas(args, until))
    _print(args, report, render_text(report))
    return 0


def _quotas(args: argparse.Namespace, t: float) -> dict:
    """The configured daily quotas (Azure tier x units) as of ``t``, from --config
    (inside a connection); held: messages are queued and none of today's quota is left."""
    from flowfleet.registry.cli.common import settings

    from .outbox import due
    from .quota import DailyQuota

    if not getattr(args, "config", None):
        return {}
    azure = settings(args).relays.azure
    if azure is None or azure.tier is None:
        return {}
    status = DailyQuota.azure(azure.tier, azure.units).status("azure", t)
    return {"azure": {**status, "held": not status["left_today"] and bool(due("azure", 1))}}


def cmd_status(args: argparse.Namespace) -> int:
    from .outbox import depth

    db = _open(args)
    with db.connection_context():
        d = depth()
    lines = [f"{'relay':6} {'queued':>8} {'parked':>8} {'oldest s':>9}"]
    lines += [
        f"{r:6} {v['queued']:>8} {v['parked']:>8} {v['oldest_queued_s']:>9.1f}"
        for r, v in sorted(d.items())
    ]
    if not d:
        lines.append("every relay outbox is empty")
    _print(args, d, "\n".join(lines))
    return 0


def cmd_parked(args: argparse.Namespace) -> int:
    from .outbox import parked

    if not 1 <= args.limit <= 10_000:
        raise CliError("--limit: between 1 and 10000", EXIT_USAGE)
    db = _open(args)
    with db.connection_context():
        rows = parked(args.relay, args.limit)
    text = "\n".join(f"{r['relay']} {r['msg_id']} ({r['size']} bytes): {r['reason']}" for r in rows)
    _print(args, rows, text or "no parked messages")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from flowfleet.registry.store.audit import audit

    from .outbox import requeue_parked

    db = _open(args)
    with db.connection_context(), db.atomic():
        n = requeue_parked(args.relay)
        audit("cli", "relay.requeue", f"relay:{args.relay}", "", messages=n)
    _print(args, {"relay": args.relay, "requeued": n}, f"{args.relay}: {n} messages requeued")
    return 0


def cmd_provision_gcp(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flowfleet.configfile import ConfigError, describe
    from flowfleet.registry.config import load_registry_config

    from .provision import provision_gcp
    from .settings import GcpRelay

    base: dict = {}
    if args.config:
        try:
            section = load_registry_config(args.config, check=False).relays.gcp
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if section is not None:
            base = section.model_dump()
    for key in ("project", "topic", "emulator_host"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    try:
        settings = GcpRelay.model_validate(base)
    except ValidationError as exc:
        raise CliError(describe(exc, "[relays.gcp] and the options"), EXIT_USAGE) from None
    try:
        done = provision_gcp(settings, args.subscription, ordering=not args.no_ordering)
    except Exception as exc:
        raise CliError(f"Pub/Sub: {type(exc).__name__}: {exc}") from None
    text = "\n".join(
        [
            f"topic {done['topic']}: {'created' if done['topic_created'] else 'exists'}",
            f"subscription {done['subscription']}: "
            f"{'created' if done['subscription_created'] else 'exists'}",
        ]
    )
    _print(args, done, text)
    return 0


def cmd_provision_aws(args: argparse.Namespace) -> int:
    from flowfleet.identity import check_device_id

    from .provision import provision_aws

    try:
        check_device_id(args.thing, "--thing")
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not 1 <= args.connections <= 32:
        raise CliError(f"--connections must be 1 to 32, not {args.connections}", EXIT_USAGE)
    try:
        done = provision_aws(
            args.thing,
            args.out,
            region=args.region,
            topic_prefix=args.topic_prefix,
            endpoint_url=args.endpoint_url,
            connections=args.connections,
        )
    except Exception as exc:
        raise CliError(f"AWS IoT: {type(exc).__name__}: {exc}") from None
    text = "\n".join(
        [
            f"thing {done['thing']}: {'created' if done['thing_created'] else 'exists'}",
            f"policy {done['policy']}: "
            + ("created" if done["policy_created"] else "")
            + ("updated" if done["policy_updated"] else "")
            + ("" if done["policy_created"] or done["policy_updated"] else "exists"),
            f"certificate {done['cert_file']}: "
            f"{'created' if done['certificate_created'] else 'kept'}",
            f"endpoint {done['endpoint']} (put it in [relays.aws] endpoint)",
        ]
    )
    _print(args, done, text)
    return 0
