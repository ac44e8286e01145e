"""The install scripts run as root in a Debian chroot the test makes (issue 19).

`debootstrap --variant=minbase bookworm` builds the chroot under the test's tmp dir;
the finished base system, apt's .debs and pip's downloads are cached in pytest's own
cache folder (`.pytest_cache/d/install-chroot`), never on this machine's root, so a
second run skips the download. Every command runs in a private mount namespace
(`unshare --mount`): /proc and pip's cache folder are mounted there only and vanish
with the command, even when it fails or is killed; the test also checks that none
is left mounted. The network settings the chroot needs (DNS, the host's CA bundle
with any extra CAs, proxy variables) are copied from the host; without a proxy
they are just the defaults.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import ssl
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import pytest

# Past the suite's 300 s per test: on a busy 2-core machine an empty cache's first
# install (apt and pip in the chroot) alone took longer (docs/provisioning.md).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CA_IN_CHROOT = "/etc/ssl/flowfleet-test-ca.crt"
SRC = "/src/flowfleet"
# What install-device writes, and the system files its steps change.
INSTALLED = (
    "/opt/flowfleet",
    "/etc/flowfleet",
    "/var/lib/flowfleet",
    "/var/lib/flowfleet-registry",
    "/usr/local/bin/flowfleet",
    "/etc/systemd/system",
    "/etc/udev/rules.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
    "/var/lib/dpkg/status",
)
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def host_ca_bundle() -> Path:
    """The CA bundle this host trusts (with a TLS-inspecting proxy's CA, if any)."""
    for candidate in (
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("PIP_CERT"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail("no CA bundle on this host: pip in the chroot could not verify PyPI")


def chroot_env() -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        # minbase has no ca-certificates; pip and Python read the host's bundle
        "PIP_CERT": CA_IN_CHROOT,
        "SSL_CERT_FILE": CA_IN_CHROOT,
        "REQUESTS_CA_BUNDLE": CA_IN_CHROOT,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "120",
    }
    env.update({k: os.environ[k] for k in PROXY_VARS if k in os.environ})
    return env


def in_chroot(root: Path, cache: Path, *cmd: str, timeout: float = 600) -> str:
    """Runs CMD as root inside ROOT, with /proc and the caches mounted in a private
    mount namespace (gone when the command ends, whatever happens); returns stdout."""
    mounts = f"mount -t proc proc {root}/proc && mount --bind {cache}/pip {root}/root/.cache/pip"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'{mounts} && exec chroot "$0" "$@"', str(root), *cmd],
        capture_output=True, text=True, timeout=timeout, env=chroot_env(),
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} in the chroot exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def mounted_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every installed path's type, mode, owner, size, mtime and content digest."""
    out: dict[str, tuple] = {}

    def add(path: Path) -> None:
        st = path.lstat()
        if path.is_symlink():
            body = os.readlink(path)
        elif path.is_file():
            body = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            body = ""
        rel = "/" + str(path.relative_to(root))
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, body)

    for name in INSTALLED:
        top = root / name.lstrip("/")
        if not top.exists() and not top.is_symlink():
            continue
        add(top)
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirnames, filenames in os.walk(top):
                for entry in (*dirnames, *filenames):
                    add(Path(dirpath) / entry)
    return out


def differences(before: dict, after: dict) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k)][:20]


@pytest.fixture(scope="module")
def cache(request) -> Path:
    """pytest's own cache folder for this test: the base system and downloads."""
    if os.geteuid() != 0:
        pytest.fail("test_install_chroot needs root (debootstrap, chroot, mount)")
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/bootstrap installs debootstrap with apt")
    folder = Path(request.config.cache.mkdir("install-chroot"))
    for sub in ("debs", "pip", "apt"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def build_base(cache: Path, root: Path, base: Path) -> None:
    """debootstrap into ROOT, then keep ROOT as the BASE tarball for later runs."""
    proc = subprocess.run(
        # in a private mount namespace: the /proc and /sys debootstrap mounts in the
        # target go away with it, even if it fails half-way
        ["unshare", "--mount", "--propagation", "private",
         "debootstrap", "--variant=minbase", f"--cache-dir={cache / 'debs'}",
         SUITE, str(root), MIRROR],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"
    assert not mounted_under(root), "debootstrap left mounts behind"
    partial = base.with_suffix(f".{os.getpid()}.partial")
    subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
    partial.rename(base)


def make_chroot(cache: Path, root: Path) -> float:
    """A fresh bookworm minbase in ROOT with this checkout in /src/flowfleet; returns
    the seconds it took (debootstrap on the first run, unpacking the cached base after)."""
    started = time.monotonic()
    base = cache / f"{SUITE}-minbase.tar"
    root.mkdir()
    built = False
    # One xdist worker builds the base system; another one waits for it.
    with open(cache / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not base.is_file():
            build_base(cache, root, base)
            built = True
    if not built:
        subprocess.run(["tar", "-C", str(root), "-xf", str(base)], check=True)
    # apt's .debs from earlier runs, copied rather than shared: two apt runs at once
    # would fight over one archive folder's lock.
    for deb in (cache / "apt").glob("*.deb"):
        shutil.copy2(deb, root / "var/cache/apt/archives" / deb.name)
    # Network settings from the host: DNS and the CA bundle (proxy variables go in
    # the environment of each command, see chroot_env).
    shutil.copyfile(Path("/etc/resolv.conf").resolve(), root / "etc/resolv.conf")
    (root / CA_IN_CHROOT.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(host_ca_bundle(), root / CA_IN_CHROOT.lstrip("/"))
    (root / "root/.cache/pip").mkdir(parents=True, exist_ok=True)
    # The checkout as git knows it (tracked files only: no .venv, no caches).
    files = (
        subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    dest = root / SRC.lstrip("/")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return time.monotonic() - started


def keep_debs(cache: Path, root: Path) -> None:
    """Copies the .debs apt downloaded in the chroot to the cache, for the next run."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        if not (cache / "apt" / deb.name).is_file():
            partial = cache / "apt" / f"{deb.name}.{os.getpid()}.partial"
            shutil.copy2(deb, partial)
            partial.rename(cache / "apt" / deb.name)


def install_twice(cache: Path, root: Path, script: str, *args: str, verify) -> None:
    """--dry-run, install, install again, --dry-run again: asserts that only the first
    install changes anything, then calls VERIFY(snapshot after it) while the chroot
    still exists; the chroot is deleted afterwards."""
    timings = {"chroot": make_chroot(cache, root)}
    command = ("bash", f"{SRC}/provisioning/install/{script}", *args)
    try:
        fresh = snapshot(root)
        out = in_chroot(root, cache, *command, "--dry-run")
        assert "would" in out and "none made" in out, out
        assert differences(fresh, snapshot(root)) == [], "--dry-run changed the chroot"

        started = time.monotonic()
        out = in_chroot(root, cache, *command)
        timings["first run"] = time.monotonic() - started
        assert "change(s) made" in out and "done      system user" in out, out
        first = snapshot(root)

        started = time.monotonic()
        out = in_chroot(root, cache, *command)
        timings["second run"] = time.monotonic() - started
        assert out.strip().endswith("nothing changed") and "done" not in out, out
        assert differences(first, snapshot(root)) == [], "the second run changed files"

        out = in_chroot(root, cache, *command, "--dry-run")
        assert out.strip().endswith("nothing changed") and "would" not in out, out
        assert differences(first, snapshot(root)) == [], "--dry-run changed files"

        # The installed command runs, from the venv, as the link on PATH.
        out = in_chroot(root, cache, "flowfleet", "--version")
        assert out.strip() == f"flowfleet {version('flowfleet')}"
        verify(first)
    finally:
        keep_debs(cache, root)
        left = mounted_under(root)
        if not left:  # never delete through a mount (it would reach the host's /proc)
            shutil.rmtree(root)  # ~700 MB; pytest keeps the last three tmp dirs
        assert not left, f"mounts left under the chroot: {left}"
    print(f"{script} in a chroot: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}")


@pytest.mark.parametrize(
    ("board", "runtime"),
    # The board's runtime: LiteRT on a Pi; ONNX Runtime (the CPU wheel from PyPI here:
    # NVIDIA's onnxruntime-gpu wheel is JetPack's and arm64-only) on a Jetson.
    [("pi", "ai_edge_litert"), ("jetson", "onnxruntime")],
)
def test_install_device_twice_in_a_debian_chroot(
    cache: Path, tmp_path: Path, board: str, runtime: str
):
    root = tmp_path / "chroot"

    def verify(installed: dict[str, tuple]) -> None:
        for path in (
            "/opt/flowfleet/venv/bin/python",
            "/etc/systemd/system/flowfleet-agent.service",
            "/etc/systemd/system/flowfleet-renew.timer",
            "/etc/udev/rules.d/99-flowfleet-camera.rules",
        ):
            assert path in installed, path
        # The board's runtime imports in the venv.
        python = "/opt/flowfleet/venv/bin/python"
        in_chroot(root, cache, python, "-I", "-c", f"import {runtime}")
        # The agent's user is in group video; /etc/flowfleet is root:flowfleet 0750.
        groups = (root / "etc/group").read_text().splitlines()
        video = next(line for line in groups if line.startswith("video:"))
        assert "flowfleet" in video.split(":")[3].split(",")
        st = (root / "etc/flowfleet").stat()
        gid = next(int(g.split(":")[2]) for g in groups if g.startswith("flowfleet:"))
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o750, 0, gid)

    install_twice(cache, root, "install-device", "--board", board, verify=verify)


def test_install_registry_twice_in_a_debian_chroot(cache: Path, tmp_path: Path):
    root = tmp_path / "chroot"

    def verify(installed: dict[str, tuple]) -> None:
        assert "/etc/systemd/system/flowfleet-registry.service" in installed
        assert "/var/lib/flowfleet-registry" in installed
        assert (root / "usr/sbin/mosquitto").is_file()

    install_twice(cache, root, "install-registry", verify=verify)
