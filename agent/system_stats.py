"""Device figures for the health beat, read from /proc and /sys (no psutil needed).

CPU load and utilisation, memory, the agent's RSS, free disk under the state folder,
SoC temperature (``/sys/class/thermal``), Raspberry Pi throttling flags
(``vcgencmd get_throttled`` when present) and Jetson GPU load / temperature. Anything
a platform does not expose is left out (None), never guessed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from flowfleet.contract import MAX_TEMP_C, MIN_TEMP_C, SystemHealth

# vcgencmd get_throttled bits (Raspberry Pi firmware documentation).
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}
_GPU_LOAD_FILES = ("devices/gpu.0/load", "devices/platform/gpu.0/load")


def throttle_flags(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_BITS.items() if mask & (1 << bit))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _celsius(raw: str | None) -> float | None:
    """A thermal zone's millidegrees as °C; None when unreadable or outside the range
    the wire contract takes (a broken sensor must not cost the beat its figures)."""
    if not raw or not raw.lstrip("-").isdigit():
        return None
    value = round(int(raw) / 1000.0, 1)
    return value if MIN_TEMP_C <= value <= MAX_TEMP_C else None


class SystemStats:
    """Call `sample()` for a `SystemHealth`; CPU % is over the time since the last call."""

    def __init__(
        self,
        disk_path: str | Path = "/",
        proc: str | Path = "/proc",
        sys: str | Path = "/sys",
        vcgencmd: str | None = "auto",
    ) -> None:
        self.disk_path = str(disk_path)
        self.proc = Path(proc)
        self.sys = Path(sys)
        self.vcgencmd = shutil.which("vcgencmd") if vcgencmd == "auto" else vcgencmd
        self._last_cpu: tuple[int, int] | None = self._cpu_times()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._vc_next = 0.0
        self._vc_value: int | None = None

    def _cpu_times(self) -> tuple[int, int] | None:
        text = _read(self.proc / "stat")
        if not text or not text.startswith("cpu "):
            return None
        values = [int(v) for v in text.splitlines()[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    def cpu_percent(self) -> float | None:
        now = self._cpu_times()
        last, self._last_cpu = self._last_cpu, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        # Clamped: an idle counter that steps back must not make a beat invalid.
        return round(min(100.0, max(0.0, 100.0 * (total - idle) / total)), 1)

    def memory(self) -> tuple[int | None, int | None]:
        text = _read(self.proc / "meminfo") or ""
        info = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * 1024
        return info.get("MemTotal"), info.get("MemAvailable")

    def rss(self) -> int | None:
        text = _read(self.proc / "self" / "statm")
        return int(text.split()[1]) * self._page if text else None

    def soc_temp_c(self) -> tuple[float | None, float | None]:
        """(SoC/CPU temperature, GPU temperature) from thermal zones, in °C."""
        soc = gpu = None
        for zone in sorted((self.sys / "class" / "thermal").glob("thermal_zone*")):
            value = _celsius(_read(zone / "temp"))
            kind = (_read(zone / "type") or "").lower()
            if value is None:
                continue
            if "gpu" in kind and gpu is None:
                gpu = value
            elif soc is None and ("cpu" in kind or "soc" in kind or "x86_pkg" in kind):
                soc = value
        if soc is None:  # Pi: thermal_zone0 is "cpu-thermal"; otherwise take the first
            soc = _celsius(_read(self.sys / "class" / "thermal" / "thermal_zone0" / "temp"))
        return soc, gpu

    def throttled(self) -> int | None:
        """The Pi's throttling mask, at most once a minute (vcgencmd is slow-ish)."""
        if not self.vcgencmd:
            return None
        now = time.monotonic()
        if now < self._vc_next:
            return self._vc_value
        self._vc_next = now + 60.0
        try:
            out = subprocess.run(
                [self.vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2
            ).stdout
            self._vc_value = int(out.strip().partition("=")[2], 16)
        except (OSError, ValueError, subprocess.SubprocessError):
            self._vc_value = None
        return self._vc_value

    def gpu_percent(self) -> float | None:
        for rel in _GPU_LOAD_FILES:  # Jetson: 0..1000
            raw = _read(self.sys / rel)
            if raw and raw.isdigit():
                return round(int(raw) / 10.0, 1)
        return None

    def sample(self) -> SystemHealth:
        total, available = self.memory()
        try:
            disk = shutil.disk_usage(self.disk_path)
            free, disk_total = disk.free, disk.total
        except OSError:
            free = disk_total = None
        try:
            load = round(os.getloadavg()[0], 2)
        except OSError:
            load = None
        soc, gpu_temp = self.soc_temp_c()
        mask = self.throttled()
        return SystemHealth(
            load_1m=load,
            cpu_percent=self.cpu_percent(),
            cpu_count=os.cpu_count(),
            mem_total_bytes=total,
            mem_available_bytes=available,
            process_rss_bytes=self.rss(),
            disk_free_bytes=free,
            disk_total_bytes=disk_total,
            soc_temp_c=soc,
            throttled=mask,
            throttled_flags=None if mask is None else throttle_flags(mask),
            gpu_percent=self.gpu_percent(),
            gpu_temp_c=gpu_temp,
        )
