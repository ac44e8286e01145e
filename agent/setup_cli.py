"""`flowfleet agent enroll` and `flowfleet agent install`: bringing a device up.

``enroll`` claims an identity from the registry with a bootstrap token
(`flowfleet.agent.enroll`); ``install`` installs a device bundle made by
``flowfleet provision device`` (`flowfleet.provisioning.bundle`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from flowfleet.cliutil import EXIT_FAILURE, EXIT_USAGE, CliError

TOKEN_ENV = "FLOWFLEET_BOOTSTRAP_TOKEN"


def add_setup_actions(actions) -> None:
    e = actions.add_parser(
        "enroll",
        help="claim this device's identity from the registry with a bootstrap token",
        description="Generates the device key here (it never leaves the device), sends a "
        "CSR with the token and writes device.key, device.crt, ca.crt, keys.json and "
        "agent.toml into --dir. The token: --token, --token-file, or $" + TOKEN_ENV + ".",
    )
    e.add_argument("--registry", required=True, metavar="URL", help="the registry's base URL")
    e.add_argument("--token", help="the bootstrap token (visible in ps: prefer --token-file)")
    e.add_argument("--token-file", metavar="FILE", help="file holding the bootstrap token")
    e.add_argument("--device", help="device id (default: this host's name)")
    e.add_argument("--dir", default="/etc/flowfleet", help="config folder (default /etc/flowfleet)")
    e.add_argument("--registry-ca", metavar="FILE", help="CA of the registry's HTTPS certificate")
    e.add_argument("--force", action="store_true", help="replace an existing identity")
    e.add_argument(
        "--password-auth",
        action="store_true",
        help="use the broker's password listener (a device that cannot do client certificates)",
    )
    e.add_argument(
        "--user",
        default="flowfleet",
        help="run as root: hand the files to this user, the agent's (default flowfleet)",
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_enroll)

    r = actions.add_parser(
        "renew",
        help="renew the device certificate before it expires (the key stays the same)",
        description="Sends a CSR signed by the device's key with its current certificate to "
        "the registry (POST /api/renew) and writes the new certificate in place; restart "
        "the agent afterwards (systemctl restart flowfleet-agent). Exit 0 also when "
        "nothing was due. Run it daily (a systemd timer or cron).",
    )
    r.add_argument("--config", default="/etc/flowfleet/agent.toml", help="agent TOML file")
    r.add_argument("--registry", metavar="URL", help="default: the config's registry.url")
    r.add_argument("--registry-ca", metavar="FILE", help="CA of the registry's HTTPS certificate")
    r.add_argument(
        "--days-before", type=float, default=7.0, help="renew when it expires sooner (default 7)"
    )
    r.add_argument(
        "--restart-unit",
        metavar="UNIT",
        help="after a renewal: systemctl try-restart UNIT (the agent's, to use it)",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_renew)

    i = actions.add_parser(
        "install",
        help="install a device bundle: system user, config with 0600 secrets, systemd unit",
    )
    i.add_argument("bundle", help="the .tar.gz from flowfleet provision device")
    i.add_argument("--root", default="/", help="install under this prefix (default /)")
    i.add_argument("--user", default="flowfleet", help="system user (default flowfleet)")
    i.add_argument("--dry-run", action="store_true", help="list what would change; change nothing")
    i.add_argument("--no-enable", action="store_true", help="do not enable the systemd unit")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_install)


def _token(args: argparse.Namespace) -> str:
    given = [x for x in (args.token, args.token_file) if x]
    if len(given) > 1:
        raise CliError("give --token or --token-file, not both", EXIT_USAGE)
    if args.token_file:
        try:
            with open(args.token_file) as fh:
                return fh.read().strip()
        except OSError as exc:
            raise CliError(f"--token-file {args.token_file}: {exc.strerror}", EXIT_USAGE) from None
    token = args.token or os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CliError(f"no bootstrap token: --token, --token-file or ${TOKEN_ENV}", EXIT_USAGE)
    return token


def cmd_enroll(args: argparse.Namespace) -> int:
    from flowfleet.contract import ContractError

    from .enroll import EnrollError, enroll

    token = _token(args)
    device = args.device or socket.gethostname().split(".")[0]
    try:
        done = enroll(
            args.registry,
            token,
            device,
            args.dir,
            registry_ca=args.registry_ca,
            force=args.force,
            owner=args.user,
            auth="password" if args.password_auth else "mtls",
        )
    except (ContractError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except EnrollError as exc:
        raise CliError(str(exc), EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILURE) from None
    data = {
        "device": done.device,
        "config": str(done.config),
        "registration": done.registration,
        "serial": done.serial,
        "not_after": done.not_after,
    }
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"enrolled {done.device}: {done.config} written ({done.registration})")
        problem = _config_problem(done.config)
        if problem:
            print(
                f"the config is not complete yet: {problem}; add it, then run "
                f"flowfleet agent check-config --config {done.config}"
            )
        if done.registration == "unregistered":
            print("an operator accepts it with: flowfleet registry devices accept " + done.device)
        print(f"start counting: flowfleet agent --config {done.config}")
    return 0


def _config_problem(path) -> str | None:
    """Why the written agent.toml does not validate (a token without an agent
    template leaves out the cameras), or None."""
    from flowfleet.agent.config import ConfigError, load_agent_config

    try:
        load_agent_config(path)
    except ConfigError as exc:
        return str(exc)
    return None


def cmd_renew(args: argparse.Namespace) -> int:
    from flowfleet.configfile import ConfigError, read_toml

    from .enroll import EnrollError, renew

    # Only the files and the URL are needed: a config still missing its cameras can
    # renew (read leniently, paths relative to the file as the agent reads them).
    try:
        data = read_toml(Path(args.config))
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    broker = data.get("broker") or {}
    base = Path(args.config).resolve().parent
    cert, key = broker.get("cert_file"), broker.get("key_file")
    url = args.registry or (data.get("registry") or {}).get("url")
    if not url:
        raise CliError("no registry URL: --registry URL or registry.url", EXIT_USAGE)
    if not (isinstance(cert, str) and isinstance(key, str)):
        raise CliError(f"{args.config}: no broker.cert_file/key_file to renew", EXIT_USAGE)
    cert, key = base / cert, base / key
    try:
        renewed, not_after = renew(
            url, cert, key, days_before=args.days_before, registry_ca=args.registry_ca
        )
    except EnrollError as exc:
        raise CliError(str(exc), EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILURE) from None
    if renewed and args.restart_unit:
        import subprocess

        subprocess.run(["systemctl", "try-restart", args.restart_unit], check=False)
    if args.json:
        json.dump({"renewed": renewed, "not_after": not_after}, sys.stdout)
        sys.stdout.write("\n")
    else:
        days = (not_after - time.time()) / 86400
        state = "renewed" if renewed else "not due"
        print(f"{cert}: {state}, valid for {days:.1f} more days")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from flowfleet.provisioning.bundle import BundleError, install_bundle

    try:
        plan = install_bundle(
            args.bundle,
            root=args.root,
            user=args.user,
            dry_run=args.dry_run,
            enable=not args.no_enable,
        )
    except BundleError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except PermissionError as exc:
        raise CliError(f"{exc} (run it as root, or with --root DIR)") from None
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for s in plan.steps:
            print(f"{s.state:<9} {s.what}" + (f" ({s.detail})" if s.detail else ""))
        print("nothing changed" if not plan.changed else ("dry run" if args.dry_run else "done"))
    return 0
