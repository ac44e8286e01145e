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


def _db_url(args: argparse.Namespace) -> str:
    return args.db or os.environ.get("FLOWFLEET_DATABASE_URL") or DEFAULT_DB


def _config(args: argparse.Namespace):
    _, modelreg = _imports()
    url = _db_url(args)
    overrides = {
        "artifacts": args.artifacts,
        "key_dir": args.key_dir,
        "max_upload_bytes": args.max_upload_mib * modelreg.MIB,
        "s3_endpoint_url": args.s3_endpoint_url,
    }
    if args.state_dir:
        state = Path(args.state_dir)
        overrides["artifacts"] = args.artifacts or str(state / "artifacts")
        overrides["key_dir"] = args.key_dir or state / "keys"
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
