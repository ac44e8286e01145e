"""`flowfleet registry`: run the registry, and manage its models, keys, users and tokens.

``flowfleet registry [--db ...] [--broker-port ...]`` runs the service (ingest and
web) as before; ``flowfleet registry models|keys|users|tokens ...`` work on the same
database, artifact store and key directory directly (no running service needed).
The shared options (``--db``, ``--state-dir``, ``--artifacts``, ``--key-dir``, ...)
may be given before or after the action.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from pathlib import Path

from flowfleet.cliutil import EXIT_USAGE, CliError, setup_logging, stop_on_signals

from .access import add_access_actions
from .cameras import add_camera_actions
from .common import (
    DEFAULT_DB,
    _actor,
    _config,
    _db_url,
    _open,
    _print_json,
    _run,
    config_path,
    settings,
)
from .deadletters import add_dead_letter_actions
from .devices import add_device_actions
from .drift import add_drift_actions
from .groups import add_group_actions
from .rollouts import add_rollout_actions
from .series import add_series_actions
from .shadow import add_shadow_actions
from .webhooks import add_webhook_actions

DAY = 86400.0


def _shared_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options every registry action understands; sub-actions repeat them with
    SUPPRESS defaults so they may come after the action without resetting them."""

    def d(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--config",
        default=d(None),
        metavar="FILE",
        help="registry TOML file (default: /etc/flowfleet/registry.toml if it exists); "
        "the flags override it",
    )
    p.add_argument(
        "--db",
        default=d(None),
        help=f"SQLite file, sqlite:///path or postgresql://user@host/db "
        f"(default: $FLOWFLEET_DATABASE_URL, else {DEFAULT_DB})",
    )
    p.add_argument(
        "--state-dir",
        default=d(None),
        help="artifacts and keys live under it (default: <db name>-data beside a SQLite "
        "file, ./flowfleet-registry-data for PostgreSQL)",
    )
    p.add_argument(
        "--artifacts", default=d(None), help="artifact store: a directory or s3://bucket/prefix"
    )
    p.add_argument("--s3-endpoint-url", default=d(None), help="S3-compatible endpoint (MinIO, ...)")
    p.add_argument(
        "--key-dir", default=d(None), help="directory of the private signing keys (0700)"
    )
    p.add_argument(
        "--max-upload-mib",
        type=int,
        default=d(None),
        help="largest model accepted (default 512)",
    )
    p.add_argument("-v", "--verbose", action="store_true", default=d(False))


def _run_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options of the service (and of check-config). Their defaults live in the config
    model (flowfleet.registry.config): a flag left out is None here, and the file's
    value (or the model's default) applies."""

    def d(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--broker-host", default=d(None), help="default 127.0.0.1")
    p.add_argument("--broker-port", default=d(None), type=int, help="default 1883")
    p.add_argument(
        "--broker-username", default=d(None), help="the registry's broker identity: registry"
    )
    p.add_argument(
        "--broker-password-file",
        default=d(None),
        help="file holding the broker password (mode 0600)",
    )
    p.add_argument(
        "--broker-ca-file", default=d(None), help="CA certificate of the broker's TLS listener"
    )
    p.add_argument("--broker-cert-file", default=d(None), help="the registry's client certificate")
    p.add_argument("--broker-key-file", default=d(None), help="the key of --broker-cert-file")
    p.add_argument(
        "--client-id", default=d(None), help="MQTT client id (default flowfleet-registry)"
    )
    p.add_argument("--topic-root", default=d(None), help="default flowfleet/v1")
    p.add_argument("--http-host", default=d(None), help="default 127.0.0.1")
    p.add_argument(
        "--http-port", default=d(None), type=int, help="default 8080; 0 picks a free port"
    )
    p.add_argument(
        "--http-threads", default=d(None), type=int, help="requests served at once (default 8)"
    )
    p.add_argument(
        "--proxy-hops",
        default=d(None),
        type=int,
        help="reverse proxies in front that set X-Forwarded-For/-Proto (default 0: "
        "ignore those headers); see docs/registry.md",
    )
    p.add_argument(
        "--anonymous-read",
        default=d(None),
        choices=("local", "none", "all"),
        help="dashboard pages and /api/totals|devices|dead-letters without a token: "
        "from localhost only (default), never, or from anyone",
    )
    p.add_argument(
        "--watch",
        default=d(None),
        metavar="DIR",
        help="register model files dropped into DIR (see docs/registry.md)",
    )
    p.add_argument(
        "--ingest-workers",
        default=d(None),
        type=int,
        metavar="N",
        help="ingest sessions sharing the device subscription, one process each "
        "(default 1); see docs/operations.md",
    )
    p.add_argument(
        "--timezone",
        default=d(None),
        help="the site's IANA timezone (e.g. Europe/Paris): day buckets of the counts "
        "over time run from its midnight (default UTC)",
    )
    p.add_argument(
        "--raw-retention-days",
        default=d(None),
        type=float,
        metavar="DAYS",
        help="remove raw count bins and health beats older than this, once an hour; the "
        "minute/hour/day rollups keep every count (default 90; 0 keeps them)",
    )
    p.add_argument(
        "--stale-after",
        dest="stale_after_s",
        default=d(None),
        type=float,
        metavar="SECONDS",
        help="show a device that sent nothing for this long as stale (default 180)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "registry",
        help="run the registry (MQTT ingest and web UI), or manage models, keys, users, tokens",
        description="Without an action, runs the registry. Actions: models, keys, users, "
        "tokens, groups, rollouts, dead-letters, series, rollups, webhooks, drift, shadow.",
    )
    _shared_options(p, suppress=False)
    _run_options(p, suppress=False)
    p.set_defaults(func=cmd_registry)
    actions = p.add_subparsers(dest="registry_action", metavar="ACTION")

    check = actions.add_parser(
        "check-config", help="validate the config file (and the flags) and exit"
    )
    _shared_options(check, suppress=True)
    _run_options(check, suppress=True)
    check.set_defaults(func=cmd_check_config)

    # models
    models = actions.add_parser("models", help="model versions, aliases")
    msub = models.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    add = msub.add_parser("add", help="register a model file as a new version")
    add.add_argument("file", type=Path)
    add.add_argument("--name", help="model name (default: the file name without suffix)")
    add.add_argument("--notes", default="")
    add.add_argument("--tag", action="append", default=[], help="repeatable")
    add.add_argument("--alias", help="point this alias (e.g. staging) at the new version")
    add.add_argument("--labels", type=Path, help="labels file, one per line")
    add.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="HARDWARE",
        help="hardware the model is built for, e.g. rpi5 or jetson-orin (repeatable)",
    )
    add.add_argument("--reason", default="")
    add.set_defaults(func=cmd_models_add)
    ls = msub.add_parser("list", help="models, or the versions of one model")
    ls.add_argument("name", nargs="?")
    ls.set_defaults(func=cmd_models_list)
    show = msub.add_parser("show", help="one version as JSON (number or alias)")
    show.add_argument("name")
    show.add_argument("version")
    show.set_defaults(func=cmd_models_show)
    alias = msub.add_parser("alias", help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    alias.add_argument("--reason", default="")
    alias.set_defaults(func=cmd_models_alias)
    unalias = msub.add_parser("unalias", help="remove an alias")
    unalias.add_argument("name")
    unalias.add_argument("alias")
    unalias.add_argument("--reason", default="")
    unalias.set_defaults(func=cmd_models_unalias)
    delete = msub.add_parser("delete", help="delete a version (refused while aliased)")
    delete.add_argument("name")
    delete.add_argument("version", type=int)
    delete.add_argument("--reason", default="")
    delete.set_defaults(func=cmd_models_delete)
    audit = msub.add_parser("audit", help="the audit trail, newest first")
    audit.add_argument("--target", help="e.g. model:yolo")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(func=cmd_audit)

    # keys
    keys = actions.add_parser("keys", help="signing keys")
    ksub = keys.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    rotate = ksub.add_parser(
        "rotate", help="new signing key; the old one stays valid for the overlap"
    )
    rotate.add_argument("--overlap-days", type=float, default=30.0)
    rotate.add_argument("--reason", default="")
    rotate.set_defaults(func=cmd_keys_rotate)
    export = ksub.add_parser("export", help="the public key bundle for devices (JSON)")
    export.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    export.set_defaults(func=cmd_keys_export)
    klist = ksub.add_parser("list", help="keys and their validity")
    klist.set_defaults(func=cmd_keys_list)

    for parser in (add, ls, show, alias, unalias, delete, audit, rotate, export, klist):
        _shared_options(parser, suppress=True)

    def shared(parser: argparse.ArgumentParser) -> None:
        _shared_options(parser, suppress=True)

    add_access_actions(actions, shared)
    add_group_actions(actions, shared)
    add_rollout_actions(actions, shared)
    add_device_actions(actions, shared)
    add_camera_actions(actions, shared)
    add_dead_letter_actions(actions, shared)
    add_series_actions(actions, shared)
    add_webhook_actions(actions, shared)
    add_drift_actions(actions, shared)
    add_shadow_actions(actions, shared)


# -- run --------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    s = settings(args, check=True)
    from flowfleet.registry.config import broker_address

    try:
        broker = broker_address(s)  # reads the password, as the service will
    except ValueError as exc:
        raise CliError(f"{config_path(args) or 'command line'}: {exc}", EXIT_USAGE) from None
    who = f"user {broker.username!r}" if broker.username else "no username"
    if broker.cert_file:
        who += f", certificate {broker.cert_file}"
    print(
        f"{config_path(args) or 'command line'}: ok (database {_db_url(args)}, broker {broker} "
        f"as {who}, http {s.http.host}:{s.http.port} with {s.http.threads} threads)"
    )
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    try:
        from flowfleet.registry.errors import BrokerRefused
        from flowfleet.registry.http.server import ProxyTrust
        from flowfleet.registry.service import run_registry
    except ImportError as exc:
        raise CliError(
            f"the registry needs its extras: pip install 'flowfleet[registry]' ({exc})"
        ) from None
    from flowfleet.registry.config import broker_address

    s = settings(args, check=True)
    try:
        broker = broker_address(s)
    except ValueError as exc:
        raise CliError(f"{config_path(args) or 'command line'}: {exc}", EXIT_USAGE) from None
    setup_logging(args.verbose)
    stop = threading.Event()
    stop_on_signals(stop)
    h = s.http
    try:
        run_registry(
            _db_url(args),
            broker,
            h.host,
            h.port,
            s.broker.topic_root,
            stop,
            client_id=s.broker.client_id,
            registry_config=_config(args),
            anonymous_read=h.anonymous_read,
            watch_dir=s.watch.dir,
            http_threads=h.threads,
            live_streams=h.live_streams,
            live_stream_s=h.live_stream_s,
            site_timezone=s.counts.timezone,
            raw_retention_days=s.counts.raw_retention_days or None,
            ingest=s.ingest,
            stale_after_s=s.devices.stale_after_s,
            webhooks=s.webhooks,
            drift=s.drift,
            rollouts=s.rollouts,
            relays=s.relays,
            map_section=s.map,
            enrollment=s.enrollment,
            proxy=ProxyTrust(
                hops=h.proxy_hops,
                headers=tuple(h.proxy_headers),
                trusted=tuple(str(n) for n in h.trusted_proxies),
            ),
        )
    except BrokerRefused as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # the HTTP port is taken, most likely
        raise CliError(f"cannot start the registry: {exc}") from None
    return 0


# -- models -----------------------------------------------------------------------------


def _default_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip("._-")[:64]
    return name or "model"


def cmd_models_add(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file", EXIT_USAGE)
    labels = None
    if args.labels is not None:
        from flowfleet.registry.catalog.formats import FormatError, read_labels

        try:
            labels = read_labels(args.labels)
        except (OSError, FormatError) as exc:
            raise CliError(f"--labels: {exc}", EXIT_USAGE) from None
    db, reg = _open(args)
    with db.connection_context():
        reg.start()

        def add():
            return reg.add_version(
                args.file,
                name=args.name or _default_name(args.file),
                filename=args.file.name,
                actor=_actor(),
                notes=args.notes,
                tags=args.tag,
                alias=args.alias,
                labels=labels,
                target=args.target,
                reason=args.reason,
            )

        version, created = _run(add)
        name = version.model.name
        if created:
            meta = json.loads(version.metadata)
            print(
                f"registered {name} version {version.version}: {version.runtime}, "
                f"{version.size} bytes, sha256 {version.sha256}"
            )
            if meta.get("inputs"):
                i = meta["inputs"][0]
                print(
                    f"  input {i['name']} {i['shape']} {i['dtype']}; "
                    f"quantization: {meta.get('quantization')}"
                )
            if args.alias:
                print(f"  alias {args.alias} -> version {version.version}")
        else:
            print(
                f"already registered as {name} version {version.version} "
                f"(sha256 {version.sha256}); nothing changed"
            )
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        if args.name is None:
            models, _ = _run(lambda: reg.list_models(limit=1000))
            if not models:
                print("no models yet")
            for m in models:
                aliases = ", ".join(f"{a}->{v}" for a, v in m["aliases"].items()) or "-"
                print(
                    f"{m['name']:<32} versions {m['versions']:>4}  "
                    f"latest {m['latest_version']}  aliases {aliases}"
                )
        else:
            versions, _ = _run(lambda: reg.list_versions(args.name, limit=1000))
            for v in versions:
                aliases = ",".join(v["aliases"]) or "-"
                print(
                    f"v{v['version']:<4} {v['runtime']:<7} {v['size']:>11} {v['sha256'][:16]}  "
                    f"aliases {aliases}  tags {','.join(v['tags']) or '-'}  {v['filename']}"
                )
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        _print_json(_run(lambda: reg.version_dict(reg.version(args.name, args.version))))
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        _run(
            lambda: reg.set_alias(
                args.name, args.alias, args.version, actor=_actor(), reason=args.reason
            )
        )
    print(f"{args.name}: alias {args.alias} -> version {args.version}")
    return 0


def cmd_models_unalias(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        _run(lambda: reg.delete_alias(args.name, args.alias, actor=_actor(), reason=args.reason))
    print(f"{args.name}: alias {args.alias} removed")
    return 0


def cmd_models_delete(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        _run(
            lambda: reg.delete_version(args.name, args.version, actor=_actor(), reason=args.reason)
        )
    print(f"{args.name}: version {args.version} deleted")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    db, reg = _open(args)
    with db.connection_context():
        entries, _ = reg.audit_log(limit=args.limit, target=args.target)
    for e in entries:
        ts = datetime.fromtimestamp(e["ts"], timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        why = f"  ({e['reason']})" if e["reason"] else ""
        print(f"{ts}  {e['actor']:<20} {e['action']:<16} {e['target']}{why}")
    return 0


# -- keys ---------------------------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    if args.overlap_days < 0:
        raise CliError("--overlap-days must not be negative", EXIT_USAGE)
    db, reg = _open(args)
    with db.connection_context():
        reg.start()
        new, old = _run(
            lambda: reg.rotate_keys(
                actor=_actor(), overlap_s=args.overlap_days * DAY, reason=args.reason
            )
        )
    retired = ", ".join(k.key_id for k in old) or "none"
    print(
        f"new signing key {new.key_id}; retired {retired} "
        f"(still accepted for {args.overlap_days:g} days)"
    )
    print("export the new bundle to devices: flowfleet registry keys export")
    return 0


def cmd_keys_export(args: argparse.Namespace) -> int:
    db, reg = _open(args)
    with db.connection_context():
        reg.start()
        bundle = reg.keys.bundle()
    text = json.dumps(bundle, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
        print(f"wrote {len(bundle['keys'])} key(s) to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from flowfleet.registry.store.db import SigningKey

    db, _ = _open(args)
    with db.connection_context():
        for k in SigningKey.select().order_by(SigningKey.created_at):
            state = (
                "current" if k.retired_at is None else f"retired, valid until {k.expires_at:.0f}"
            )
            print(f"{k.key_id}  {state}")
    return 0
