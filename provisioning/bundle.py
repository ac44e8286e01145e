"""Device bundles for manual installs, and installing one on a device.

``flowfleet provision device NAME`` (operator's machine) issues the device's key and
certificate from the fleet CA and writes one ``.tar.gz``: ``agent.toml``,
``device.crt``, ``device.key``, ``ca.crt``, ``keys.json`` (the registry's public
signing keys, when given) and ``bundle.json`` (device, group, location). With a
registry database (``--db``/``--config``) the device is also registered there, with
its location and group. The bundle holds a private key: hand it over like one.

``flowfleet agent install BUNDLE`` (on the device, as root) creates the ``flowfleet``
system user, installs the files under ``/etc/flowfleet`` (key 0600, owned by that
user), the state folder and the systemd unit, and enables the unit. ``--root DIR``
installs under a prefix (no user is created and systemd is not touched there: those
steps are listed as skipped); ``--dry-run`` lists what would change and changes
nothing. Installing the same bundle twice changes nothing the second time.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

BUNDLE_FILES = ("agent.toml", "device.crt", "device.key", "ca.crt", "keys.json", "bundle.json")
SECRET_FILES = ("device.key",)
UNIT_NAME = "flowfleet-agent.service"
MAX_MEMBER_BYTES = 1024 * 1024


class BundleError(ValueError):
    """A bundle that cannot be made or installed; the message names the problem."""


# -- making a bundle ----------------------------------------------------------------------


def agent_toml(device: str, broker_host: str, broker_port: int, template: str | None) -> str:
    return "\n".join(
        [
            "# written by flowfleet provision device",
            f"device_id = {json.dumps(device)}",
            "",
            (template or "").rstrip(),
            "",
            "[broker]",
            f"host = {json.dumps(broker_host)}",
            f"port = {int(broker_port)}",
            'ca_file = "ca.crt"',
            'cert_file = "device.crt"',
            'key_file = "device.key"',
            "",
        ]
    )


def check_template(template: str | None) -> None:
    """BundleError unless ``template`` is TOML that leaves device_id and [broker] out."""
    from flowfleet.configfile import tomllib

    if template is None:
        return
    try:
        data = tomllib.loads(template)
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"--template is not TOML: {exc}") from None
    for key in ("device_id", "broker"):
        if key in data:
            raise BundleError(f"--template must not set {key!r}: the bundle writes it")


def make_bundle(
    authority,
    device: str,
    out: str | Path,
    *,
    broker_host: str,
    broker_port: int,
    group: str | None = None,
    location: tuple[float, float] | None = None,
    template: str | None = None,
    keys: dict | None = None,
    days: int | None = None,
) -> Path:
    """Issue ``device``'s certificate and write the bundle archive ``out`` (0600)."""
    import tempfile

    check_template(template)
    with tempfile.TemporaryDirectory() as tmp:
        issued, rec = authority.issue("device", device, tmp, days=days)
        files = {
            "agent.toml": agent_toml(device, broker_host, broker_port, template).encode(),
            "device.crt": issued.cert.read_bytes(),
            "device.key": issued.key.read_bytes(),
            "ca.crt": authority.ca.cert.read_bytes(),
            "bundle.json": json.dumps(
                {
                    "device": device,
                    "group": group,
                    "location": list(location) if location else None,
                    "serial": rec.serial,
                    "not_after": rec.not_after,
                },
                indent=1,
            ).encode(),
        }
        if keys is not None:
            files["keys.json"] = (json.dumps(keys, indent=2) + "\n").encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600 if name in SECRET_FILES else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def read_bundle(path: str | Path) -> dict[str, bytes]:
    """The files of a bundle; only the known names, only regular files (no paths,
    links or devices), each at most 1 MiB. BundleError names what is wrong."""
    try:
        tar = tarfile.open(path, mode="r:gz")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{path}: not a bundle archive ({exc})") from None
    out: dict[str, bytes] = {}
    with tar:
        for member in tar.getmembers():
            if member.name not in BUNDLE_FILES or not member.isfile():
                raise BundleError(f"{path}: unexpected member {member.name!r}")
            if member.size > MAX_MEMBER_BYTES:
                raise BundleError(f"{path}: {member.name} is too large")
            fh = tar.extractfile(member)
            out[member.name] = fh.read() if fh else b""
    for name in ("agent.toml", "device.crt", "device.key", "ca.crt"):
        if name not in out:
            raise BundleError(f"{path}: {name} is missing")
    return out


# -- installing -------------------------------------------------------------------------


@dataclass
class Step:
    what: str
    state: str  # "done", "unchanged", "would", "skipped"
    detail: str = ""


@dataclass
class InstallPlan:
    steps: list[Step] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(s.state in ("done", "would") for s in self.steps)

    def to_dict(self) -> dict:
        return {"changed": self.changed, "steps": [s.__dict__ for s in self.steps]}


def unit_text(config_dir: str = "/etc/flowfleet") -> str:
    return (
        resources.files("flowfleet.provisioning.templates").joinpath(UNIT_NAME).read_text()
    ).replace("/etc/flowfleet/agent.toml", f"{config_dir}/agent.toml")


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def install_bundle(
    bundle: str | Path,
    *,
    root: str | Path = "/",
    user: str = "flowfleet",
    dry_run: bool = False,
    enable: bool = True,
) -> InstallPlan:
    """Install ``bundle`` under ``root`` (see the module docstring)."""
    from pydantic import ValidationError

    from flowfleet.agent.config import AgentConfig
    from flowfleet.configfile import tomllib

    files = read_bundle(bundle)
    try:
        AgentConfig.model_validate(tomllib.loads(files["agent.toml"].decode()))
    except (ValidationError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle}: agent.toml is not a valid agent config: {exc}") from None
    root = Path(root)
    system = root.resolve() == Path("/")
    plan = InstallPlan()
    # The system user first: the files below are handed to it.
    if not system:
        plan.steps.append(Step(f"system user {user}", "skipped", f"--root {root}"))
    elif _user_exists(user):
        plan.steps.append(Step(f"system user {user}", "unchanged"))
    elif dry_run:
        plan.steps.append(Step(f"system user {user}", "would", "useradd --system"))
    else:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--groups",
                "video",
                user,
            ],
            check=True,
        )
        plan.steps.append(Step(f"system user {user}", "done", "useradd --system"))
    owner = pwd.getpwnam(user) if system and not dry_run else None
    config_dir = root / "etc" / "flowfleet"
    state_dir = root / "var" / "lib" / "flowfleet"
    for folder, mode in ((config_dir, 0o750), (state_dir, 0o750)):
        _ensure_dir(plan, folder, mode, owner, dry_run)
    for name, data in files.items():
        if name == "bundle.json":
            continue
        mode = 0o600 if name in SECRET_FILES else 0o640
        _ensure_file(plan, config_dir / name, data, mode, owner, dry_run)
    unit = root / "etc" / "systemd" / "system" / UNIT_NAME
    _ensure_dir(plan, unit.parent, 0o755, None, dry_run)
    _ensure_file(plan, unit, unit_text().encode(), 0o644, None, dry_run)
    if not enable:
        return plan
    if not system:
        plan.steps.append(Step(f"systemctl enable --now {UNIT_NAME}", "skipped", f"--root {root}"))
    elif dry_run:
        plan.steps.append(Step(f"systemctl enable --now {UNIT_NAME}", "would"))
    elif shutil.which("systemctl") is None:
        plan.steps.append(Step(f"systemctl enable --now {UNIT_NAME}", "skipped", "no systemd"))
    else:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", "--now", UNIT_NAME], check=True)
        plan.steps.append(Step(f"systemctl enable --now {UNIT_NAME}", "done"))
    return plan


def _ensure_dir(plan: InstallPlan, folder: Path, mode: int, owner, dry_run: bool) -> None:
    if folder.is_dir():
        if (folder.stat().st_mode & 0o777) == mode:
            plan.steps.append(Step(f"folder {folder}", "unchanged"))
            return
        if dry_run:
            plan.steps.append(Step(f"folder {folder}", "would", f"chmod {mode:o}"))
            return
        os.chmod(folder, mode)
        plan.steps.append(Step(f"folder {folder}", "done", f"chmod {mode:o}"))
        return
    if dry_run:
        plan.steps.append(Step(f"folder {folder}", "would", f"mkdir, mode {mode:o}"))
        return
    folder.mkdir(parents=True, mode=mode)
    os.chmod(folder, mode)
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    plan.steps.append(Step(f"folder {folder}", "done", f"mkdir, mode {mode:o}"))


def _ensure_file(plan: InstallPlan, path: Path, data: bytes, mode: int, owner, dry_run) -> None:
    same = path.is_file() and path.read_bytes() == data
    if same and (path.stat().st_mode & 0o777) == mode:
        plan.steps.append(Step(f"file {path}", "unchanged"))
        return
    detail = f"mode {mode:o}" + (", replaces a different file" if path.exists() else "")
    if dry_run:
        plan.steps.append(Step(f"file {path}", "would", detail))
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, path)
    plan.steps.append(Step(f"file {path}", "done", detail))


# -- `flowfleet provision device` ---------------------------------------------------------


def add_device_action(actions) -> None:
    from flowfleet.registry.cli.main import _shared_options

    p = actions.add_parser(
        "device",
        help="issue a device identity and write its install bundle (.tar.gz)",
        description="For manual installs; enrollment by claim (provision tokens) needs no "
        "bundle. With --db/--config the device is registered in the registry too.",
    )
    p.add_argument("name", help="the device id")
    p.add_argument("--ca", required=True, help="CA folder")
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="mTLS listener")
    p.add_argument("--group", help="device group")
    p.add_argument("--location", metavar="LAT,LON", help="WGS 84 degrees")
    p.add_argument("--template", metavar="FILE", help="agent.toml template (cameras, ...)")
    p.add_argument("--keys", metavar="FILE", help="registry key bundle (registry keys export)")
    p.add_argument("--days", type=int, help="certificate validity (default 30)")
    p.add_argument("--out", help="archive path (default ./NAME.tar.gz)")
    p.add_argument("--json", action="store_true")
    _shared_options(p, suppress=False)
    p.set_defaults(func=cmd_provision_device)


def _location(text: str | None) -> tuple[float, float] | None:
    from flowfleet.cliutil import EXIT_USAGE, CliError

    if text is None:
        return None
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--location {text!r}: expected LAT,LON", EXIT_USAGE) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise CliError(f"--location {text!r}: latitude ±90, longitude ±180", EXIT_USAGE)
    return lat, lon


def cmd_provision_device(args) -> int:
    from flowfleet.cliutil import EXIT_USAGE, CliError
    from flowfleet.contract import ContractError

    from .authority import Authority, AuthorityError
    from .cli import _out

    host, sep, port = args.broker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--broker {args.broker!r}: expected HOST:PORT", EXIT_USAGE)
    location = _location(args.location)
    template = keys = None
    try:
        if args.template:
            template = Path(args.template).read_text()
        if args.keys:
            keys = json.loads(Path(args.keys).read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"--template/--keys: {exc}", EXIT_USAGE) from None
    registering = bool(args.db or args.config or os.environ.get("FLOWFLEET_DATABASE_URL"))
    try:  # before anything is registered or issued
        check_template(template)
    except BundleError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if registering:
        _register(args, location)
    auth = Authority(args.ca)
    out = Path(args.out or f"{args.name}.tar.gz")
    try:
        auth.check()
        make_bundle(
            auth,
            args.name,
            out,
            broker_host=host,
            broker_port=int(port),
            group=args.group,
            location=location,
            template=template,
            keys=keys,
            days=args.days,
        )
    except (AuthorityError, BundleError, ContractError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    data = {"device": args.name, "bundle": str(out), "registered": registering}
    _out(
        args,
        data,
        f"wrote {out} (mode 0600: it holds the device's private key); on the device: "
        f"sudo flowfleet agent install {out.name}",
    )
    return 0


def _register(args, location) -> None:
    """Create the device record (with its location) and its group membership."""
    from flowfleet.registry.cli.common import _actor, run_in_db
    from flowfleet.registry.fleet import devices
    from flowfleet.registry.fleet.enrollment import _add_to_group

    fields = {"location": {"latitude": location[0], "longitude": location[1]}} if location else {}

    def go(db):
        devices.create_device(db, args.name, fields, actor=_actor())
        if args.group:
            _add_to_group(args.group, args.name, _actor())

    run_in_db(args, go, atomic=True)
