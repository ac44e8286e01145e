"""`flowfleet models`: the model catalog and model tools."""

from __future__ import annotations

import argparse
import json

from flowfleet.cliutil import EXIT_USAGE, CliError


def register(sub) -> None:
    p = sub.add_parser("models", help="the model catalog: list, fetch")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", help="catalog name (for fetch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from flowfleet.models.catalog import CatalogError, find_local, load_catalog, resolve

    if args.action == "list":
        rows = []
        for entry in load_catalog().values():
            local = find_local(entry)
            rows.append(
                {
                    "name": entry.name,
                    "file": entry.file,
                    "runtime": entry.runtime,
                    "default": entry.default,
                    "local": str(local) if local else None,
                    "sha256": entry.sha256,
                    "description": entry.description,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                mark = "*" if r["default"] else " "
                where = r["local"] or "not downloaded"
                print(f"{mark} {r['name']:<24} {r['runtime']:<7} {where}")
        return 0
    if not args.name:
        raise CliError("give a model name (see: flowfleet models list)", EXIT_USAGE)
    try:
        path = resolve(args.name, download=True)
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0
