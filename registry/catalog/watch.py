"""The watch folder: model files dropped into a directory are registered by themselves.

A file is taken once it is **complete**: its size and modification time have not
changed for ``settle_s`` seconds (default 3; so a slow copy, or one over the network,
is never taken half-way), or the writer closed it (inotify close-after-write, seen
through watchdog) and it then stayed unchanged for ``closed_settle_s`` (default 1). A
writer that closes and re-opens the file between chunks slower than that must write
under a temporary name and rename it into place. Names starting with ``.``
or ending in ``.part``, ``.tmp``, ``.partial``, ``.crdownload`` or ``.filepart`` are
ignored until renamed into place, which is how rsync, scp clients and browsers write.

A **sidecar manifest** ``<file>.json`` (for ``yolo.tflite``: ``yolo.tflite.json``),
written before the model or within the settle time, may give ``name``, ``notes``,
``tags`` (list), ``target`` (list of hardware names), ``alias``, ``reason``, and a
deployment target: ``group`` (a device group) with ``camera`` (the camera name on
each device). Unknown keys are an error. Without one the model name is the file name
without its suffix. With ``group``, the version (new, or the existing one for bytes
already registered) is deployed to that camera on every device of the group; the
group must exist and have devices before anything is registered, and a deployment
that fails part-way moves the file to ``failed/`` with the devices that did not get
it (the version stays registered; drop the file again to retry).

A **rollout sidecar** ``<file>.rollout.toml`` asks for a staged rollout of the
version instead of a deployment at once (docs/registry.md, "Staged rollouts"):

```toml
camera = "door"               # required: the camera to move on each target
reason = "new night model"    # optional
[targets]                     # required: devices, groups, tags, or all = true
groups = ["lobby"]
[plan]                        # optional: the rollout plan (defaults otherwise)
waves = 2
soak_s = 600
canary = { count = 1 }
```

It is validated before anything is registered (unknown keys, a bad plan or
targets, targets naming no device, and a JSON sidecar that also names a ``group``
are refused, the error naming the file and the key, for example
``door.tflite.rollout.toml: plan.soak_s: ...``); then the version is registered and
the rollout created (audited as ``rollout.create`` by ``watch-folder``); the
registry's rollout job moves it on. A rollout refused at creation (a camera already
in an active rollout) moves the file to ``failed/`` with the reason; the version
stays registered.

Then the file (and its sidecars) moves to ``processed/``, or to ``failed/`` next to
``<file>.error.txt`` saying why. Bytes already registered count as processed (the
registry keeps one version). State lives only in the folder, so a registry restart
mid-copy simply sees the file again and waits for it to settle; the same file dropped
twice registers once; concurrent drops are all taken, one after the other.

On PostgreSQL only one registry worker scans at a time (an advisory lock), so several
workers can share a folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee as pw
import tomllib

from flowfleet.contract import Topics

from ..errors import RegistryError, check_name
from ..fleet import groups, rollout_plan, rollouts
from ..fleet.commands import CommandPublisher
from .modelreg import ModelRegistry

log = logging.getLogger(__name__)

ACTOR = "watch-folder"
PG_WATCH_LOCK = 0x666C6F78
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".error.txt")
SIDECAR_KEYS = {"name", "notes", "tags", "target", "alias", "reason", "group", "camera"}
ROLLOUT_SIDECAR = ".rollout.toml"
ROLLOUT_KEYS = {"camera", "reason", "targets", "plan"}


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time this (size, mtime) was first seen
    closed: bool = False


class WatchFolder:
    """Registers model files dropped into ``folder``.

    Args:
        registry: where to register them.
        folder: the watched directory (created if missing) with ``processed/`` and
            ``failed/`` inside.
        settle_s: how long a file must stay unchanged to count as complete.
        closed_settle_s: the same, once its writer closed it.
        poll_s: how often the folder is scanned (watchdog events wake it sooner).
        commands: the registry's command publisher, for sidecars that name a
            ``group`` (without one such files fail with a clear reason); the desired
            states are queued in the commands outbox and it publishes them.
        topics: the topic layout of the desired states.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        folder: str | Path,
        *,
        settle_s: float = 3.0,
        poll_s: float = 1.0,
        closed_settle_s: float = 1.0,
        commands: CommandPublisher | None = None,
        topics: Topics | None = None,
    ) -> None:
        self.registry = registry
        self.commands = commands
        self.topics = topics
        self.folder = Path(folder)
        self.processed = self.folder / "processed"
        self.failed = self.folder / "failed"
        for d in (self.folder, self.processed, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.closed_settle_s = closed_settle_s
        self._seen: dict[str, _Seen] = {}
        self._closed: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._start_observer()
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        log.info("watching %s for models", self.folder)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> WatchFolder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # polling alone still works
            log.info("watchdog not installed; polling %s every %.1f s", self.folder, self.poll_s)
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type == "closed" and not event.is_directory:
                    with watcher._lock:
                        watcher._closed.add(os.path.basename(event.src_path))
                watcher._wake.set()

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("watch folder scan failed; retrying")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # -- scanning ------------------------------------------------------------------------

    def scan(self) -> list[tuple[str, str]]:
        """Take every complete file once; returns (file name, outcome) for each taken."""
        ready = self._ready_files()
        if not ready:
            return []
        db = self.registry.db
        results = []
        with db.connection_context():
            if isinstance(db, pw.PostgresqlDatabase):
                got = db.execute_sql("SELECT pg_try_advisory_lock(%s)", (PG_WATCH_LOCK,))
                if not got.fetchone()[0]:
                    return []  # another worker is scanning
            try:
                for path in ready:
                    if path.exists():
                        results.append((path.name, self._take(path)))
            finally:
                if isinstance(db, pw.PostgresqlDatabase):
                    db.execute_sql("SELECT pg_advisory_unlock(%s)", (PG_WATCH_LOCK,))
        return results

    def _candidates(self) -> list[Path]:
        out = []
        for entry in os.scandir(self.folder):
            name = entry.name
            if not entry.is_file(follow_symlinks=False):
                continue
            if (
                name.startswith(".")
                or name.endswith(IGNORED_SUFFIXES)
                or name.endswith((".json", ROLLOUT_SIDECAR))
            ):
                continue
            out.append(Path(entry.path))
        return sorted(out)

    def _ready_files(self) -> list[Path]:
        now = time.monotonic()
        ready = []
        with self._lock:
            closed, self._closed = self._closed, set()
            present = set()
            for path in self._candidates():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                name = path.name
                present.add(name)
                seen = self._seen.get(name)
                if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    seen = self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, now)
                if name in closed:
                    seen.closed = True
                settle = self.closed_settle_s if seen.closed else self.settle_s
                if now - seen.since >= settle:
                    ready.append(path)
            for name in list(self._seen):
                if name not in present:
                    del self._seen[name]
        return ready

    # -- taking one file -----------------------------------------------------------------

    def _take(self, path: Path) -> str:
        sidecar = path.with_name(path.name + ".json")
        rollout_file = path.with_name(path.name + ROLLOUT_SIDECAR)
        try:
            options = self._read_sidecar(sidecar)
            rollout = read_rollout_sidecar(rollout_file)
            if rollout is not None and "group" in options:
                raise ValueError(
                    f"{sidecar.name} names a group (deploy at once) and {rollout_file.name} "
                    "asks for a rollout: give one of them"
                )
            reason = options.get("reason") or f"dropped into {self.folder}"
            if "group" in options:
                self._check_group(options)
            version, created = self.registry.add_version(
                path,
                name=options.get("name") or _name_from(path),
                filename=path.name,
                actor=ACTOR,
                notes=options.get("notes", ""),
                tags=options.get("tags", []),
                target=options.get("target"),
                alias=options.get("alias"),
                reason=reason,
            )
            if "group" in options:
                self._deploy(version, options, reason)
            if rollout is not None:
                self._start_rollout(version, rollout, rollout_file.name, reason)
        except (RegistryError, ValueError, OSError) as exc:
            message = exc.message if isinstance(exc, RegistryError) else str(exc)
            log.warning("watch folder: %s refused: %s", path.name, message)
            target = self._move(path, sidecar, self.failed)
            target.with_name(target.name + ".error.txt").write_text(
                f"{path.name}: {message}\n", encoding="utf-8"
            )
            return "failed"
        self._move(path, sidecar, self.processed)
        outcome = "registered" if created else "duplicate"
        log.info(
            "watch folder: %s %s as %s version %d",
            path.name,
            outcome,
            version.model.name,
            version.version,
        )
        return outcome

    def _check_group(self, options: dict[str, Any]) -> None:
        if "camera" not in options:
            raise ValueError("the sidecar names a 'group' but no 'camera' to deploy to")
        if self.commands is None:
            raise ValueError(
                "the sidecar names a group, but this watch folder has no command publisher "
                "to deploy with (run it inside 'flowfleet registry --watch')"
            )
        check_name(options["camera"], "camera", "camera name")
        if not groups.members(options["group"]):
            raise ValueError(f"device group {options['group']!r} has no devices")

    def _deploy(self, version, options: dict[str, Any], reason: str) -> None:
        result = groups.deploy_to_group(
            self.registry,
            options["group"],
            options["camera"],
            version.model.name,
            version.version,
            actor=ACTOR,
            reason=reason,
            commands=self.commands,
            topics=self.topics,
        )
        if result["failed"]:
            failed = "; ".join(f"{f['device']}: {f['error']}" for f in result["failed"])
            raise ValueError(
                f"registered as {version.model.name} version {version.version}, but deploying "
                f"to group {options['group']!r} failed for {failed}; drop the file again "
                "to retry"
            )
        log.info(
            "watch folder: deployed %s version %d to camera %s of %d device(s) in group %s",
            version.model.name,
            version.version,
            options["camera"],
            len(result["deployed"]),
            options["group"],
        )

    def _start_rollout(self, version, rollout: dict[str, Any], file: str, reason: str) -> None:
        try:
            r = rollouts.create_rollout(
                self.registry,
                model=version.model.name,
                ref=version.version,
                camera=rollout["camera"],
                targets=rollout["targets"],
                plan=rollout.get("plan"),
                actor=ACTOR,
                reason=rollout.get("reason") or reason,
            )
        except RegistryError as exc:
            raise ValueError(
                f"{file}: registered as {version.model.name} version {version.version}, but "
                f"the rollout was refused: {exc.message}"
            ) from None
        log.info(
            "watch folder: rollout %s of %s version %d to camera %s created",
            r["id"],
            version.model.name,
            version.version,
            rollout["camera"],
        )

    @staticmethod
    def _read_sidecar(sidecar: Path) -> dict[str, Any]:
        if not sidecar.exists():
            return {}
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{sidecar.name}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{sidecar.name}: must be a JSON object")
        unknown = set(data) - SIDECAR_KEYS
        if unknown:
            raise ValueError(
                f"{sidecar.name}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(allowed: {', '.join(sorted(SIDECAR_KEYS))})"
            )
        for key in ("name", "notes", "alias", "reason", "group", "camera"):
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"{sidecar.name}: {key!r} must be a string")
        tags = data.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{sidecar.name}: 'tags' must be a list of strings")
        target = data.get("target", [])
        if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
            raise ValueError(f"{sidecar.name}: 'target' must be a list of strings")
        return data

    def _move(self, path: Path, sidecar: Path, into: Path) -> Path:
        target = into / path.name
        if target.exists() or target.with_name(target.name + ".error.txt").exists():
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            target = into / f"{path.stem}.{stamp}-{os.getpid()}-{time.monotonic_ns()}{path.suffix}"
        shutil.move(str(path), target)
        if sidecar.exists():
            shutil.move(str(sidecar), target.with_name(target.name + ".json"))
        rollout_file = path.with_name(path.name + ROLLOUT_SIDECAR)
        if rollout_file.exists():
            shutil.move(str(rollout_file), target.with_name(target.name + ROLLOUT_SIDECAR))
        with self._lock:
            self._seen.pop(path.name, None)
        return target


def read_rollout_sidecar(path: Path) -> dict[str, Any] | None:
    """The rollout a ``<file>.rollout.toml`` asks for, validated (targets resolved to
    at least one device, the plan parsed), or None without one. ValueError naming
    the file and the key otherwise."""
    if not path.exists():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name}: not valid TOML ({exc})") from None
    unknown = set(data) - ROLLOUT_KEYS
    if unknown:
        raise ValueError(
            f"{path.name}: unknown key(s) {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(ROLLOUT_KEYS))})"
        )
    for key in ("camera", "targets"):
        if key not in data:
            raise ValueError(f"{path.name}: {key!r} is required")
    for key in ("camera", "reason"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{path.name}: {key!r} must be a string")
    for key in ("targets", "plan"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{path.name}: {key!r} must be a table ([{key}])")
    try:
        check_name(data["camera"], "camera", "camera name")
        rollout_plan.parse_plan(data.get("plan"))
        rollout_plan.resolve(rollout_plan.parse_targets(data["targets"]))
    except RegistryError as exc:
        raise ValueError(f"{path.name}: {exc.message}") from None
    return data


def _name_from(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip("._-")[:64]
    return name or "model"
