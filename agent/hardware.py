"""What this device is: board, CPU architecture, accelerators, OS and the detector
runtimes installed, for the ``hardware`` of the online status (`flowfleet.contract_device`).

Read once at start from files (``/proc/device-tree/model``, ``/sys/class/dmi/id``,
``/etc/os-release``, ``/dev``, ``/sys/bus/usb``) and package metadata; no hardware SDK
or runtime is imported, and anything unreadable is simply left out ("not known"), so
probing can never stop the agent. ``root`` points the probe at another file system
tree (tests).
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import re
from importlib import metadata
from pathlib import Path

from flowfleet.contract_device import MAX_HW_TEXT, Hardware

log = logging.getLogger(__name__)

# platform.machine() spellings -> the names the registry uses (an .eim's ELF header
# gives x86, arm, x86_64, aarch64, riscv; see registry/catalog/formats.py).
ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8l": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
    "armhf": "arm",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "riscv64": "riscv",
}
# Distributions that provide each detector runtime, in the agent's order of preference.
RUNTIME_PACKAGES = {
    "tflite": ("ai-edge-litert", "tflite-runtime"),
    "onnx": ("onnxruntime", "onnxruntime-gpu"),
    "eim": ("edge_impulse_linux",),
}
# (pattern on the board model, board id); first match wins.
BOARDS = (
    (r"Raspberry Pi (\d+)", "rpi{0}"),
    (r"Raspberry Pi Compute Module (\d+)", "rpi-cm{0}"),
    (r"Raspberry Pi Zero 2", "rpi-zero2"),
    (r"Jetson.*AGX Orin", "jetson-orin"),
    (r"Jetson.*Orin", "jetson-orin"),
    (r"Jetson.*Xavier", "jetson-xavier"),
    (r"Jetson Nano", "jetson-nano"),
    (r"Jetson", "jetson"),
)
# Coral Edge TPU on USB (before and after its firmware is loaded).
CORAL_USB = {("1a6e", "089a"), ("18d1", "9302")}


def normalise_arch(machine: str) -> str | None:
    m = machine.strip().lower()
    if not m:
        return None
    return ARCH_ALIASES.get(m, m)


def board_id(board: str | None) -> str | None:
    if not board:
        return None
    for pattern, template in BOARDS:
        match = re.search(pattern, board)
        if match:
            return template.format(*match.groups())
    return None


def _text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()[:4096]
    except OSError:
        return None
    text = raw.replace(b"\x00", b"").decode("utf-8", errors="replace").strip()
    return text[:MAX_HW_TEXT] or None


def _board(root: Path) -> str | None:
    model = _text(root / "proc/device-tree/model")
    if model:
        return model
    vendor = _text(root / "sys/class/dmi/id/sys_vendor")
    product = _text(root / "sys/class/dmi/id/product_name")
    joined = " ".join(p for p in (vendor, product) if p)
    return joined[:MAX_HW_TEXT] or None


def _os_name(root: Path) -> str | None:
    text = _text(root / "etc/os-release")
    if not text:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "PRETTY_NAME":
            return value.strip().strip('"')[:MAX_HW_TEXT] or None
    return None


def accelerators(root: Path, board: str | None = None) -> tuple[str, ...]:
    """Accelerators visible to this system: ``edgetpu`` (Coral, PCIe or USB), ``hailo``,
    ``cuda`` (an NVIDIA GPU, or a Jetson's)."""
    found = []
    usb = set()
    for vendor_file in glob.glob(str(root / "sys/bus/usb/devices/*/idVendor")):
        vendor = _text(Path(vendor_file))
        product = _text(Path(vendor_file).with_name("idProduct"))
        if vendor and product:
            usb.add((vendor.lower(), product.lower()))
    if glob.glob(str(root / "dev/apex_*")) or usb & CORAL_USB:
        found.append("edgetpu")
    if glob.glob(str(root / "dev/hailo*")):
        found.append("hailo")
    if (
        glob.glob(str(root / "dev/nvidia[0-9]*"))
        or (root / "dev/nvhost-ctrl-gpu").exists()
        or (board is not None and "Jetson" in board)
    ):
        found.append("cuda")
    return tuple(found)


def runtimes() -> dict[str, str]:
    """Detector runtime -> ``"package version"`` for those installed (package metadata
    only: nothing is imported)."""
    out = {}
    for runtime, packages in RUNTIME_PACKAGES.items():
        for package in packages:
            try:
                version = metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
            except Exception:  # a broken dist-info must not stop the agent
                log.debug("could not read the version of %s", package, exc_info=True)
                continue
            out[runtime] = f"{package} {version}"[:MAX_HW_TEXT]
            break
    return out


def probe(root: str | Path = "/") -> Hardware | None:
    """This device's `Hardware`, or None if even the probe failed (logged)."""
    root = Path(root)
    try:
        board = _board(root)
        uname = platform.uname()
        return Hardware(
            board=board,
            board_id=board_id(board),
            arch=normalise_arch(uname.machine),
            accelerators=accelerators(root, board) if os.name == "posix" else None,
            os=_os_name(root),
            kernel=(uname.release or None) and uname.release[:MAX_HW_TEXT],
            python=platform.python_version(),
            runtimes=runtimes(),
        )
    except Exception:
        log.warning("could not probe the hardware; the status will not report it", exc_info=True)
        return None
