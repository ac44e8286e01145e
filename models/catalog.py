"""The model catalog: default models by name, pinned by sha256, downloadable.

`resolve` finds a catalog model locally ($FLOWFLEET_DATA/models, then the cache) or
downloads it with a progress bar; every file is checksum-verified before use and a
download is written to a temporary file and renamed into place only once verified.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flowfleet.data import models_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class CatalogError(Exception):
    pass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: str
    url: str
    sha256: str
    runtime: str
    description: str
    licence: str
    default: bool = False


def load_catalog() -> dict[str, CatalogEntry]:
    text = resources.files("flowfleet.models").joinpath("catalog.toml").read_text()
    data = tomllib.loads(text)
    return {name: CatalogEntry(name=name, **entry) for name, entry in data["models"].items()}


def default_entry() -> CatalogEntry:
    return next(e for e in load_catalog().values() if e.default)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowfleet" / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_local(entry: CatalogEntry) -> Path | None:
    """A local copy whose checksum matches, if there is one."""
    for folder in (models_dir(), cache_dir()):
        path = folder / entry.file
        if path.is_file() and sha256_file(path) == entry.sha256:
            return path
    return None


def resolve(name: str, *, download: bool = True, progress: bool | None = None) -> Path:
    """Path of a verified copy of catalog model ``name``, downloading it if allowed."""
    catalog = load_catalog()
    if name not in catalog:
        raise CatalogError(f"unknown model {name!r}; known: {', '.join(sorted(catalog))}")
    entry = catalog[name]
    local = find_local(entry)
    if local is not None:
        return local
    if not download:
        raise CatalogError(
            f"model {name!r} ({entry.file}) not found in {models_dir()} or {cache_dir()}; "
            f"run: flowfleet models fetch {name}"
        )
    return fetch(entry, cache_dir(), progress=progress)


def fetch(entry: CatalogEntry, dest_dir: Path, *, progress: bool | None = None) -> Path:
    """Download ``entry`` into dest_dir, verify its sha256, then rename into place."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / entry.file
    tmp = final.with_suffix(final.suffix + ".part")
    if progress is None:
        progress = sys.stderr.isatty()
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=entry.file)
            while block := resp.read(1 << 16):
                out.write(block)
                h.update(block)
                if bar:
                    bar.update(len(block))
            if bar:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CatalogError(f"download of {entry.name} from {entry.url} failed: {exc}") from None
    if h.hexdigest() != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise CatalogError(
            f"download of {entry.name} from {entry.url} has sha256 {h.hexdigest()}, "
            f"expected {entry.sha256}; refused"
        )
    os.replace(tmp, final)
    return final
