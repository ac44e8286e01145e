"""`flowfleet` command line: count, agent, registry, demo, models.

Exit codes: 0 success, 1 runtime failure (unusable model or video, broker down),
2 bad usage or configuration. Errors are one line on stderr, never a traceback
(set FLOWFLEET_DEBUG=1 to see one). Each area registers its own subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys

from flowfleet import __version__
from flowfleet.cliutil import EXIT_FAILURE, CliError


def build_parser() -> argparse.ArgumentParser:
    from flowfleet import demo
    from flowfleet.agent import cli as agent_cli
    from flowfleet.agent import doctor
    from flowfleet.models import cli as models_cli
    from flowfleet.provisioning import cli as provision_cli
    from flowfleet.registry.cli import main as registry_cli
    from flowfleet.registry.relays import cli as relays_cli

    parser = argparse.ArgumentParser(
        prog="flowfleet",
        description="Count people and vehicles at the edge and run the fleet that does it.",
    )
    parser.add_argument("--version", action="version", version=f"flowfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    agent_cli.register(sub)
    registry_cli.register(sub)
    demo.register(sub)
    models_cli.register(sub)
    relays_cli.register(sub)
    provision_cli.register(sub)
    doctor.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"flowfleet {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("FLOWFLEET_DEBUG"):
            raise
        print(f"flowfleet {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
