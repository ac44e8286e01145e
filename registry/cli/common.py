"""Helpers shared by the `flowfleet registry` management actions."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from flowfleet.cliutil import EXIT_USAGE, CliError

DEFAULT_DB = "flowfleet-registry.sqlite"


def _imports():
    try:
        from flowfleet.registry.catalog import modelreg
        from flowfleet.registry.store import db
    except ImportError as exc:
        raise CliError(
            f"the registry needs its extras: pip install 'flowfleet[registry]' ({exc})"
        ) from None
    return db, modelreg


# Command-line flags that override keys of the config file: {section: {key: dest}}.
FLAGS = {
    "storage": {
        "state_dir": "state_dir",
        "artifacts": "artifacts",
        "s3_endpoint_url": "s3_endpoint_url",
        "key_dir": "key_dir",
        "max_upload_mib": "max_upload_mib",
    },
    "broker": {
        "host": "broker_host",
        "port": "broker_port",
        "topic_root": "topic_root",
        "username": "broker_username",
        "password_file": "broker_password_file",
        "ca_file": "broker_ca_file",
        "cert_file": "broker_cert_file",
        "key_file": "broker_key_file",
        "client_id": "client_id",
    },
    "http": {
        "host": "http_host",
        "port": "http_port",
        "threads": "http_threads",
        "anonymous_read": "anonymous_read",
        "proxy_hops": "proxy_hops",
    },
    "watch": {"dir": "watch"},
    "counts": {"timezone": "timezone", "raw_retention_days": "raw_retention_days"},
    "ingest": {"workers": "ingest_workers"},
    "devices": {"stale_after_s": "stale_after_s"},
}


def config_path(args: argparse.Namespace) -> Path | None:
    """``--config``, else the default file when it exists, else None."""
    from flowfleet.registry.config import DEFAULT_CONFIG

    given = getattr(args, "config", None)
    if given:
        return Path(given)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def settings(args: argparse.Namespace, *, check: bool = False):
    """The registry settings: the config file (if any) with the flags over it.

    ``check``: files the broker section names must be readable (running the service,
    check-config); management actions never connect to the broker and skip that.
    Bad config: a one-line CliError naming the file and the key, exit code 2.
    """
    cached = getattr(args, "_settings", None)
    if cached is not None and (cached[1] or not check):
        return cached[0]
    from flowfleet.registry.config import (
        ConfigError,
        RegistrySettings,
        check_files,
        load_registry_config,
        with_overrides,
    )

    path = config_path(args)
    try:
        base = load_registry_config(path, check=False) if path else RegistrySettings()
        overrides = {
            section: {key: getattr(args, dest, None) for key, dest in keys.items()}
            for section, keys in FLAGS.items()
        }
        source = f"{path} with the command-line options" if path else "command line"
        merged = with_overrides(base, overrides, source)
        if check:
            check_files(merged, str(path) if path else "command line")
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    args._settings = (merged, check)
    return merged


def _db_url(args: argparse.Namespace) -> str:
    """--db, else $FLOWFLEET_DATABASE_URL, else the config file's database.url."""
    return (
        args.db
        or os.environ.get("FLOWFLEET_DATABASE_URL")
        or settings(args).database.url
        or DEFAULT_DB
    )


def _config(args: argparse.Namespace):
    _, modelreg = _imports()
    url = _db_url(args)
    storage = settings(args).storage
    overrides = {
        "artifacts": storage.artifacts,
        "key_dir": storage.key_dir,
        "max_upload_bytes": storage.max_upload_mib * modelreg.MIB,
        "s3_endpoint_url": storage.s3_endpoint_url,
    }
    if storage.state_dir:
        state = Path(storage.state_dir)
        overrides["artifacts"] = storage.artifacts or str(state / "artifacts")
        overrides["key_dir"] = storage.key_dir or state / "keys"
    return modelreg.RegistryConfig.beside(url, **overrides)


def _open(args: argparse.Namespace):
    """(database, ModelRegistry) for a management action."""
    import logging

    db_mod, modelreg = _imports()
    # Management actions print their own results; log only problems unless -v.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        db = db_mod.open_database(_db_url(args))
    except (ValueError, OSError) as exc:
        raise CliError(f"--db: {exc}", EXIT_USAGE) from None
    reg = modelreg.ModelRegistry.from_config(db, _config(args))
    return db, reg


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"cli:{user}"


def _run(func):
    """Run ``func`` and turn registry/auth errors into one-line CLI errors."""
    from flowfleet.registry.catalog.keys import SigningKeyError
    from flowfleet.registry.catalog.modelreg import RegistryError
    from flowfleet.registry.http.auth import AuthError

    try:
        return func()
    except RegistryError as exc:
        field = f"{exc.field}: " if exc.field else ""
        code = EXIT_USAGE if exc.status in (400, 413, 415, 422) else 1
        raise CliError(f"{field}{exc.message}", code) from None
    except AuthError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None


def _print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def run_in_db(args: argparse.Namespace, func, *, atomic: bool = False):
    """Open the registry database of ``args`` and return ``func(db)``, in one
    transaction when ``atomic``; registry and auth errors become one-line CLI errors."""
    db, _ = _open(args)
    with db.connection_context():
        if not atomic:
            return _run(lambda: func(db))
        with db.atomic():
            return _run(lambda: func(db))
