"""Model signatures: the signed manifest and how to verify it (no Flask, no peewee).

This module depends only on the standard library and ``cryptography`` so agents can
import it (or copy it) to verify a model before activating it.

What is signed
--------------
Each model version has a **manifest**: a JSON object serialised canonically
(`canonical_json`: keys sorted, no insignificant whitespace, UTF-8, ``ensure_ascii``
off). The manifest's bytes are what the registry signs with ed25519, as they are,
with no prefix. It holds:

* ``type``: ``"flowfleet.model-manifest/1"`` (domain separation and format version),
* ``name``, ``version``: the model name and version number,
* ``sha256``, ``size``: hex digest and length in bytes of the artifact,
* ``runtime``: ``tflite`` | ``onnx`` | ``eim``,
* ``filename``: the uploaded file name,
* ``metadata``: what the registry read from the file (inputs, outputs, labels, ...),
* ``created_at``: upload time, seconds since the Unix epoch.

The registry hands out the manifest bytes together with the signature (base64) and
the signing key's id, so a verifier never re-serialises anything: it checks the
signature over the bytes it received, then parses them and compares ``sha256`` and
``size`` with the artifact it downloaded (`verify_artifact`).

Public keys are raw 32-byte ed25519 keys, base64-encoded, identified by ``key_id``:
the first 16 hex digits of sha256 over the raw public key. A key bundle (what
`flowfleet registry keys export` writes for devices) is a JSON object
``{"keys": [{"key_id", "public_key", "not_after"}]}``; ``not_after`` is null for the
current key and the end of the overlap period for a rotated one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MANIFEST_TYPE = "flowfleet.model-manifest/1"


class VerificationError(Exception):
    """A signature, key or artifact does not check out; the message says which."""


def canonical_json(value: Any) -> bytes:
    """The canonical serialisation used for manifests (stable for equal values)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def build_manifest(
    *,
    name: str,
    version: int,
    sha256: str,
    size: int,
    runtime: str,
    filename: str,
    metadata: Mapping[str, Any],
    created_at: float,
) -> bytes:
    """The manifest bytes for one model version (see the module docstring)."""
    return canonical_json(
        {
            "type": MANIFEST_TYPE,
            "name": name,
            "version": version,
            "sha256": sha256,
            "size": size,
            "runtime": runtime,
            "filename": filename,
            "metadata": dict(metadata),
            "created_at": created_at,
        }
    )


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    raw = public_key if isinstance(public_key, bytes) else raw_public_key(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"{what} is not valid base64") from None


def sign(private_key: Ed25519PrivateKey, manifest: bytes) -> str:
    """The base64 ed25519 signature of ``manifest``."""
    return b64(private_key.sign(manifest))


def load_bundle(bundle: Mapping[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    """Keys from a key bundle (a dict, JSON text or a file path), by key id."""
    if isinstance(bundle, Path) or (
        isinstance(bundle, str) and not bundle.lstrip().startswith("{")
    ):
        bundle = Path(bundle).read_text(encoding="utf-8")
    if isinstance(bundle, str):
        bundle = json.loads(bundle)
    keys = {}
    for entry in bundle.get("keys", []):
        raw = _unb64(entry["public_key"], "public key")
        if key_id(raw) != entry["key_id"]:
            raise VerificationError(f"key {entry['key_id']}: id does not match the key")
        keys[entry["key_id"]] = dict(entry)
    return keys


def verify_manifest(
    manifest: bytes,
    signature: str,
    signer: str,
    keys: Mapping[str, Mapping[str, Any]],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """Check ``signature`` (base64) by key ``signer`` over ``manifest``; return it parsed.

    ``keys`` maps key ids to bundle entries (`load_bundle`). A key whose
    ``not_after`` has passed is refused. Raises VerificationError.
    """
    entry = keys.get(signer)
    if entry is None:
        raise VerificationError(f"unknown signing key {signer!r}")
    not_after = entry.get("not_after")
    if not_after is not None and (time.time() if now is None else now) > float(not_after):
        raise VerificationError(f"signing key {signer} expired at {not_after}")
    public = Ed25519PublicKey.from_public_bytes(_unb64(entry["public_key"], "public key"))
    try:
        public.verify(_unb64(signature, "signature"), manifest)
    except InvalidSignature:
        raise VerificationError(f"bad signature by key {signer}") from None
    try:
        doc = json.loads(manifest)
    except ValueError:
        raise VerificationError("the signed manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("type") != MANIFEST_TYPE:
        raise VerificationError(f"not a {MANIFEST_TYPE} manifest")
    return doc


def verify_artifact(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Check that the file at ``path`` is the artifact ``manifest`` describes."""
    p = Path(path)
    size = p.stat().st_size
    if size != manifest["size"]:
        raise VerificationError(f"{p}: {size} bytes, the manifest says {manifest['size']}")
    h = hashlib.sha256()
    with p.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    if h.hexdigest() != manifest["sha256"]:
        raise VerificationError(f"{p}: sha256 {h.hexdigest()} does not match the manifest")


def verify_model(
    path: str | Path,
    manifest: bytes,
    signature: str,
    signer: str,
    keys: Mapping[str, Mapping[str, Any]],
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """`verify_manifest` then `verify_artifact`: everything a device checks before use."""
    doc = verify_manifest(manifest, signature, signer, keys, now=now)
    verify_artifact(path, doc)
    return doc
