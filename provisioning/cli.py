"""`flowfleet provision ...`: the fleet CA, certificates, bootstrap tokens, device bundles.

Every action prints a human summary, or one JSON document with ``--json``. Exit codes:
0 success, 1 a runtime failure, 2 bad arguments or input (the message names it;
nothing was changed). Actions are listed in `ACTIONS`: each entry adds its parser, so
further areas (cloud registration) add one line there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
from pathlib import Path

from flowfleet.cliutil import EXIT_USAGE, CliError

OFFLINE_ADVICE = (
    "keep ca.key offline: copy the folder to an encrypted USB stick or a machine "
    "without network access, and give the registry only what it needs to enroll "
    "devices (docs/provisioning.md, 'Keeping the CA key')"
)


def _out(args: argparse.Namespace, data, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _authority(path: str):
    from .authority import Authority, AuthorityError

    auth = Authority(path)
    try:
        auth.check()
    except AuthorityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return auth


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- ca -------------------------------------------------------------------------------


def _add_ca(actions) -> None:
    ca = actions.add_parser("ca", help="the fleet certificate authority")
    sub = ca.add_subparsers(dest="ca_action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a CA folder (ca.key mode 0600)")
    create.add_argument("dir", help="folder for ca.crt, ca.key, crl.pem, index.json")
    create.add_argument("--name", default="flowfleet CA", help="the CA's common name")
    create.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_ca_create)


def cmd_ca_create(args: argparse.Namespace) -> int:
    from .authority import Authority, AuthorityError

    try:
        auth = Authority.create(args.dir, name=args.name, days=args.days)
    except AuthorityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    data = {
        "ca_cert": str(auth.ca.cert),
        "ca_key": str(auth.ca.key),
        "crl": str(auth.crl),
        "advice": OFFLINE_ADVICE,
    }
    _out(args, data, f"CA created in {args.dir} (ca.key mode 0600)\n{OFFLINE_ADVICE}")
    return 0


# -- cert ---------------------------------------------------------------------------


def _add_cert(actions) -> None:
    from .authority import DEVICE_DAYS, KINDS, SERVER_DAYS

    cert = actions.add_parser("cert", help="issue, revoke and list certificates")
    sub = cert.add_subparsers(dest="cert_action", metavar="ACTION", required=True)
    issue = sub.add_parser(
        "issue",
        help="issue a key and certificate",
        description=f"Kinds: device (CN = device id, {DEVICE_DAYS} days by default), "
        f"broker and registry (server certificates, {SERVER_DAYS} days, --host "
        "repeatable), registry-client (the registry's broker identity, CN registry).",
    )
    issue.add_argument("kind", choices=KINDS)
    issue.add_argument("cn", help="common name: the device id, or the server's name")
    issue.add_argument("--ca", required=True, help="CA folder")
    issue.add_argument("--out", help="output folder (default: <ca>/issued/<cn>)")
    issue.add_argument("--host", action="append", default=[], help="server DNS name or IP")
    issue.add_argument("--days", type=int, help="validity in days")
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(func=cmd_cert_issue)

    revoke = sub.add_parser(
        "revoke", help="revoke a certificate and rewrite the CRL (then reload the broker)"
    )
    revoke.add_argument("cn", nargs="?", help="revoke every live certificate of this CN")
    revoke.add_argument("--serial", help="revoke this certificate (hex serial)")
    revoke.add_argument("--ca", required=True, help="CA folder")
    revoke.add_argument("--reason", default="")
    revoke.add_argument(
        "--reload-pidfile",
        help="send SIGHUP to the broker whose pid is in this file, so it reloads the CRL",
    )
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=cmd_cert_revoke)

    crl = sub.add_parser("crl", help="re-sign the CRL (it is valid for 365 days)")
    crl.add_argument("--ca", required=True, help="CA folder")
    crl.add_argument("--json", action="store_true")
    crl.set_defaults(func=cmd_cert_crl)

    lst = sub.add_parser("list", help="issued certificates with their expiry")
    lst.add_argument("--ca", required=True, help="CA folder")
    lst.add_argument(
        "--expiring", type=float, metavar="DAYS", help="only those expiring within DAYS"
    )
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_cert_list)


def cmd_cert_issue(args: argparse.Namespace) -> int:
    from flowfleet.contract import ContractError

    from .authority import AuthorityError

    auth = _authority(args.ca)
    out = Path(args.out) if args.out else auth.folder / "issued" / args.cn
    try:
        issued, rec = auth.issue(args.kind, args.cn, out, hosts=tuple(args.host), days=args.days)
    except (AuthorityError, ContractError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    data = {**rec.to_dict(), "cert": str(issued.cert), "key": str(issued.key)}
    _out(
        args,
        data,
        f"{args.kind} certificate for {args.cn}: {issued.cert} (key {issued.key}, 0600), "
        f"serial {rec.serial}, expires {_when(rec.not_after)}",
    )
    return 0


def reload_broker(pidfile: str) -> int:
    """SIGHUP the broker whose pid is in ``pidfile``; returns the pid."""
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError) as exc:
        raise CliError(f"--reload-pidfile {pidfile}: {exc}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise CliError(f"cannot signal the broker (pid {pid}): {exc}") from None
    return pid


def cmd_cert_revoke(args: argparse.Namespace) -> int:
    from .authority import AuthorityError

    auth = _authority(args.ca)
    try:
        hit = auth.revoke(cn=args.cn, serial=args.serial, reason=args.reason)
    except AuthorityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    pid = reload_broker(args.reload_pidfile) if args.reload_pidfile else None
    data = {"revoked": [r.to_dict() for r in hit], "crl": str(auth.crl), "reloaded_pid": pid}
    after = (
        f"broker (pid {pid}) reloaded"
        if pid
        else "reload the broker (SIGHUP, systemctl reload mosquitto) to apply it"
    )
    _out(
        args,
        data,
        f"revoked {', '.join(r.serial for r in hit)}; CRL {auth.crl} rewritten; {after}",
    )
    return 0


def cmd_cert_crl(args: argparse.Namespace) -> int:
    from .authority import CRL_DAYS, AuthorityError

    auth = _authority(args.ca)
    try:
        path = auth.write_crl()
    except AuthorityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _out(
        args,
        {"crl": str(path), "valid_days": CRL_DAYS},
        f"{path} re-signed, valid for {CRL_DAYS} days; copy it to the broker "
        "(provision broker-config) and reload it",
    )
    return 0


def cmd_cert_list(args: argparse.Namespace) -> int:
    auth = _authority(args.ca)
    t = time.time()
    rows = []
    for r in auth.records():
        state = "revoked" if r.revoked_at else ("expired" if r.not_after <= t else "valid")
        if args.expiring is not None and (
            state != "valid" or r.not_after > t + args.expiring * 86400
        ):
            continue
        rows.append({**r.to_dict(), "state": state, "days_left": (r.not_after - t) / 86400})
    lines = [
        f"{r['serial'][:16]:<16}  {r['kind']:<15} {r['cn']:<24} {r['state']:<8} "
        f"expires {_when(r['not_after'])} ({r['days_left']:.0f} days)"
        for r in rows
    ]
    _out(args, {"certificates": rows}, "\n".join(lines) if lines else "no certificates")
    return 0


# -- the action table -------------------------------------------------------------------


def _add_tokens(actions) -> None:
    from .cli_tokens import add_token_actions

    add_token_actions(actions)


def _add_device(actions) -> None:
    from .bundle import add_device_action

    add_device_action(actions)


def _add_broker_config(actions) -> None:
    p = actions.add_parser(
        "broker-config",
        help="write the production Mosquitto files (mTLS, CRL, ACL) and reload on change",
    )
    p.add_argument("--ca", required=True, help="CA folder")
    p.add_argument(
        "--out", required=True, help="the broker's folder, e.g. /etc/mosquitto/flowfleet"
    )
    p.add_argument("--host", action="append", default=[], help="broker DNS name or IP (SAN)")
    p.add_argument("--tls-port", type=int, default=8883, help="mutual-TLS listener (8883)")
    p.add_argument("--password-port", type=int, help="a password-over-TLS listener too")
    p.add_argument("--password-file", help="Mosquitto password file for --password-port")
    p.add_argument("--bind", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--data-dir", default="/var/lib/mosquitto", help="persistence folder")
    p.add_argument(
        "--pid-file",
        default="/run/mosquitto/mosquitto.pid",
        help="where the broker writes its pid (default /run/mosquitto/mosquitto.pid)",
    )
    p.add_argument("--reload-pidfile", help="SIGHUP this broker when a file changed")
    p.add_argument(
        "--registry-auth",
        action="store_true",
        help="the registry generates devices.passwd and devices.acl from its device "
        "records ([enrollment] broker_auth)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_broker_config)


def _add_broker_sync(actions) -> None:
    from flowfleet.registry.cli.main import _shared_options

    p = actions.add_parser(
        "broker-sync",
        help="regenerate the broker's password file and ACL from the registry's devices",
    )
    p.add_argument("--json", action="store_true")
    _shared_options(p, suppress=False)
    p.set_defaults(func=cmd_broker_sync)


def cmd_broker_sync(args: argparse.Namespace) -> int:
    """What the registry does after each change to its devices, on demand (after a
    restore, or to check that the files match the records)."""
    from flowfleet.registry.cli.devices import sync_broker

    if not args.config:
        raise CliError("broker-sync needs --config (the registry's [enrollment])", EXIT_USAGE)
    done = sync_broker(args)
    if done is None:
        raise CliError(f"{args.config}: [enrollment] broker_auth is not set", EXIT_USAGE)
    text = (
        f"{', '.join(done['changed'])} written; broker reloaded: "
        f"{'yes' if done['reloaded'] else 'no'}"
        if done["changed"]
        else "up to date, nothing changed"
    )
    _out(args, done, text)
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from flowfleet.contract import ContractError

    from .authority import AuthorityError
    from .broker_files import write_broker_files

    auth = _authority(args.ca)
    if args.password_file and not args.password_port:
        raise CliError("--password-file needs --password-port", EXIT_USAGE)
    if args.password_port and not (args.password_file or args.registry_auth):
        raise CliError("--password-port needs --password-file or --registry-auth", EXIT_USAGE)
    if not args.host and not (Path(args.out) / "broker.crt").is_file():
        raise CliError("--host is needed to issue the broker's certificate", EXIT_USAGE)
    try:
        files = write_broker_files(
            auth,
            args.out,
            hosts=tuple(args.host),
            tls_port=args.tls_port,
            password_port=args.password_port,
            password_file=args.password_file,
            bind=args.bind,
            data_dir=args.data_dir,
            pid_file=args.pid_file,
            pidfile=args.reload_pidfile,
            registry_auth=args.registry_auth,
        )
    except (AuthorityError, ContractError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"{args.out}: {exc}") from None
    data = {
        "folder": str(files.folder),
        "changed": list(files.changed),
        "reloaded_pid": files.reloaded_pid,
    }
    text = (
        f"{files.folder}: {', '.join(files.changed)} written"
        + (f"; broker (pid {files.reloaded_pid}) reloaded" if files.reloaded_pid else "")
        if files.changed
        else f"{files.folder}: up to date, nothing changed"
    )
    if files.changed:
        text += f"\nit is a complete broker config: mosquitto -c {files.folder / 'flowfleet.conf'}"
    _out(args, data, text)
    return 0


def _add_gcp(actions) -> None:
    from flowfleet.registry.relays.cli import add_provision_gcp

    add_provision_gcp(actions)


def _add_aws(actions) -> None:
    from flowfleet.registry.relays.cli import add_provision_aws

    add_provision_aws(actions)


# One entry per `flowfleet provision` action: (name, function adding its parser).
ACTIONS = (
    ("ca", _add_ca),
    ("cert", _add_cert),
    ("tokens", _add_tokens),
    ("device", _add_device),
    ("broker-config", _add_broker_config),
    ("broker-sync", _add_broker_sync),
    ("gcp", _add_gcp),  # the cloud relays' resources (docs/relays.md)
    ("aws", _add_aws),
)


def register(sub) -> None:
    """Add ``flowfleet provision ...`` to the top-level subcommands."""
    p = sub.add_parser(
        "provision",
        help="fleet CA, certificates, bootstrap tokens, device bundles, cloud relay resources",
        description="Provisioning on the operator's machine (docs/provisioning.md).",
    )
    actions = p.add_subparsers(dest="provision_action", metavar="ACTION", required=True)
    for _, add in ACTIONS:
        add(actions)
