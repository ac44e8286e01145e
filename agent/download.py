"""Getting a signed model artifact onto the device: signature, download, checksum.

`verify_manifest` checks the registry's ed25519 signature over the manifest a
`ModelRef` carries (before anything is downloaded); `Downloader` fetches the
artifact: the file grows in ``<models_dir>/<name>-v<version>-<sha12>.<ext>.part``,
a broken transfer resumes with ``Range``/``If-Range`` (``download_attempts`` tries
with backoff), a response whose headers already show another artifact is refused at
once, and only a file whose size and sha256 match the signed manifest is renamed
into place (read-only).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from flowfleet.contract import ModelRef

from .config import read_token

log = logging.getLogger("flowfleet.agent.updater")  # one logger for the whole update path

EXTENSIONS = {"tflite": ".tflite", "onnx": ".onnx", "eim": ".eim"}
BLOCK = 256 * 1024


class UpdateRefused(Exception):
    """An update that must not go ahead; ``reason`` is a short code for events."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient  # worth trying again later (the network, not the bytes)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class Downloader:
    """Downloads artifacts into ``models_dir``; ``stop`` interrupts a transfer."""

    def __init__(self, models_dir: Path, stop: threading.Event) -> None:
        self.models_dir = models_dir
        self._stop = stop

    def _url(self, ref: ModelRef, cfg) -> tuple[str, dict[str, str]]:
        base = cfg.url.rstrip("/") + "/"
        url = urllib.parse.urljoin(base, ref.url)
        a, b = urllib.parse.urlsplit(base), urllib.parse.urlsplit(url)
        if b.scheme not in ("http", "https"):
            raise UpdateRefused("download", f"refusing a {b.scheme or 'relative'} URL: {url}")
        headers = {"User-Agent": "flowfleet-agent"}
        token = read_token(cfg)
        # The token goes only to the registry itself, never to another host.
        if token and (a.scheme, a.netloc) == (b.scheme, b.netloc):
            headers["Authorization"] = f"Bearer {token}"
        return url, headers

    def download(self, ref: ModelRef, doc: dict[str, Any], cfg) -> Path:
        """The verified artifact of ``ref`` in the models folder (downloaded if needed)."""
        from flowfleet import signing

        final = self.models_dir / (
            f"{ref.name}-v{ref.version}-{ref.sha256[:12]}{EXTENSIONS[doc['runtime']]}"
        )
        if final.exists():
            try:
                signing.verify_artifact(final, doc)
                return final
            except signing.VerificationError:
                final.chmod(0o644)
                final.unlink()
        part = final.with_name(final.name + ".part")
        size = doc["size"]
        url, headers = self._url(ref, cfg)
        last_error = "no attempt"
        for attempt in range(1, cfg.download_attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            try:
                self._fetch(url, headers, part, have, size, ref, cfg.timeout_s)
            except UpdateRefused:
                raise
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                got = part.stat().st_size if part.exists() else 0
                delay = min(2.0 ** (attempt - 1), 30.0)
                log.warning(
                    "download of %s v%d broke at %d/%d bytes (%s); resuming in %.0fs",
                    ref.name,
                    ref.version,
                    got,
                    size,
                    last_error,
                    delay,
                )
                if self._stop.wait(delay):
                    raise UpdateRefused("download", "agent stopping") from None
        have = part.stat().st_size if part.exists() else 0
        if have != size:
            raise UpdateRefused(
                "download",
                f"gave up after {cfg.download_attempts} attempts at "
                f"{have}/{size} bytes: {last_error}",
                transient=True,
            )
        try:
            signing.verify_artifact(part, doc)
        except signing.VerificationError as exc:
            part.unlink(missing_ok=True)
            raise UpdateRefused("checksum", f"downloaded artifact refused: {exc}") from None
        part.chmod(0o555 if doc["runtime"] == "eim" else 0o444)
        os.replace(part, final)
        return final

    def _fetch(
        self, url, headers, part: Path, have: int, size: int, ref: ModelRef, timeout: float
    ) -> None:
        req = urllib.request.Request(url, headers=headers)
        if have:
            req.add_header("Range", f"bytes={have}-")
            req.add_header("If-Range", f'"{ref.sha256}"')
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                part.unlink(missing_ok=True)
                raise OSError("416 range not satisfiable; starting over") from None
            if exc.code in (400, 401, 403, 404, 410):
                raise UpdateRefused(
                    "download", f"HTTP {exc.code} {exc.reason} from {url}"
                ) from None
            raise
        with resp:
            self._check_headers(resp, part, size, ref)
            if resp.status == 206:
                if not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
                    raise OSError(f"unexpected Content-Range {resp.headers.get('Content-Range')}")
                mode = "ab"
            else:
                mode, have = "wb", 0
            if have:
                log.info("resuming %s v%d at byte %d of %d", ref.name, ref.version, have, size)
            next_log = 0.0
            with part.open(mode) as fh:
                while block := resp.read(BLOCK):
                    fh.write(block)
                    have += len(block)
                    if have > size:
                        part.unlink(missing_ok=True)
                        raise UpdateRefused(
                            "checksum",
                            f"the server sent more than the signed manifest's {size} bytes",
                        )
                    now = time.monotonic()
                    if now >= next_log or have == size:
                        next_log = now + 1.0
                        log.info(
                            "downloading %s v%d: %d/%d bytes (%.0f%%)",
                            ref.name,
                            ref.version,
                            have,
                            size,
                            100.0 * have / max(size, 1),
                        )
                    if self._stop.is_set():
                        raise UpdateRefused("download", "agent stopping")
                fh.flush()
                os.fsync(fh.fileno())

    def _check_headers(self, resp, part: Path, size: int, ref: ModelRef) -> None:
        """Refuse at once what the response headers already show is another artifact."""
        problem = None
        digest = resp.headers.get("X-Checksum-Sha256")
        if digest and digest.strip().lower() != ref.sha256:
            problem = f"the server's artifact has sha256 {digest.strip()}"
        total = None
        if resp.status == 206:
            crange = resp.headers.get("Content-Range") or ""
            total = crange.rpartition("/")[2]
        elif resp.status == 200:
            total = resp.headers.get("Content-Length")
        if problem is None and total and total.isdigit() and int(total) != size:
            problem = f"the server's artifact is {total} bytes"
        if problem:
            part.unlink(missing_ok=True)
            raise UpdateRefused(
                "checksum", f"{problem}; the signed manifest says {size} bytes, sha256 {ref.sha256}"
            )


def verify_manifest(ref: ModelRef, keys_file: str | None) -> dict[str, Any]:
    """The signed manifest of ``ref`` (a dict), after checking its signature with the
    key bundle and that the reference's name, version and sha256 are the manifest's."""
    if not (ref.manifest and ref.signature and ref.key_id):
        raise UpdateRefused(
            "unsigned",
            f"{ref.name} v{ref.version} has no signed manifest "
            "(manifest, signature, key_id); an unsigned model is never run",
        )
    try:
        from flowfleet import signing
    except ImportError as exc:  # cryptography missing on this device
        raise UpdateRefused("signature", f"cannot verify signatures: {exc}") from None
    try:
        manifest = base64.b64decode(ref.manifest, validate=True)
    except ValueError:
        raise UpdateRefused("manifest", "the manifest is not valid base64") from None
    try:
        keys = signing.load_bundle(Path(keys_file))
        doc = signing.verify_manifest(manifest, ref.signature, ref.key_id, keys)
    except (signing.VerificationError, OSError, ValueError, KeyError) as exc:
        raise UpdateRefused("signature", f"{ref.name} v{ref.version}: {exc}") from None
    for field in ("name", "version", "sha256"):
        if doc.get(field) != getattr(ref, field):
            raise UpdateRefused(
                "manifest",
                f"the desired {field} {getattr(ref, field)!r} is not the "
                f"signed manifest's {doc.get(field)!r}",
            )
    if doc.get("runtime") not in EXTENSIONS or not isinstance(doc.get("size"), int):
        raise UpdateRefused("manifest", f"unsupported runtime {doc.get('runtime')!r}")
    return doc


def write_labels_file(path: Path, doc: dict[str, Any]) -> str | None:
    """Write the manifest's label list beside the model; its path (None: no labels)."""
    labels = (doc.get("metadata") or {}).get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x and "\n" not in x for x in labels)
    ):
        return None
    out = path.with_name(path.name + ".labels.txt")
    out.write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
    return str(out)
