"""The registry's ed25519 signing keys: files on disk, public halves in the database.

Private keys live in ``<key_dir>/<key_id>.key`` (PKCS#8 PEM, file mode 0600, the
directory 0700); the database's ``signing_key`` table lists every key's public half,
when it was created, and for a rotated key when it stops being accepted
(``expires_at``). The current key is the newest one that is not retired.

Rotation (`KeyRing.rotate`) creates a new key, re-signs every existing version with
it, and retires the old key with an overlap period (default 30 days): devices still
holding only the old public key keep verifying until then, and a device that gets
the new bundle can verify everything at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from flowfleet import signing

from ..store.db import ModelVersion, Signature, SigningKey, database_proxy, now
from ..store.locks import exclusive

log = logging.getLogger(__name__)

DEFAULT_OVERLAP_S = 30 * 24 * 3600.0


class SigningKeyError(Exception):
    """A key file is missing, unreadable or has unsafe permissions."""


class KeyRing:
    """Signing keys of one registry.

    Args:
        key_dir: where private keys are kept (created with mode 0700).
    """

    def __init__(self, key_dir: str | Path) -> None:
        self.key_dir = Path(key_dir)
        self._cache: dict[str, Ed25519PrivateKey] = {}

    # -- keys -------------------------------------------------------------------------

    def current(self) -> SigningKey | None:
        return (
            SigningKey.select()
            .where(SigningKey.retired_at.is_null())
            .order_by(SigningKey.created_at.desc())
            .first()
        )

    def ensure_key(self) -> SigningKey:
        """The current key, creating the first one if there is none."""
        key = self.current()
        if key is not None:
            return key
        # Workers starting together on an empty database must create one key, not
        # one each (the loser's would stay "current" for nobody and never expire).
        with exclusive(database_proxy.obj, "signing-key"):
            key = self.current()
            if key is None:
                key = self._create()
                log.info("created signing key %s in %s", key.key_id, self.key_dir)
        return key

    def private_key(self, key_id: str) -> Ed25519PrivateKey:
        if key_id not in self._cache:
            path = self.key_dir / f"{key_id}.key"
            try:
                mode = path.stat().st_mode & 0o777
                if mode & 0o077:
                    raise SigningKeyError(
                        f"{path}: mode {mode:o} lets others read the signing key; chmod 600 it"
                    )
                key = load_pem_private_key(path.read_bytes(), password=None)
            except FileNotFoundError:
                raise SigningKeyError(
                    f"{path}: private signing key {key_id} not found (is --key-dir right?)"
                ) from None
            if not isinstance(key, Ed25519PrivateKey) or signing.key_id(key.public_key()) != key_id:
                raise SigningKeyError(f"{path}: not the ed25519 key {key_id}")
            self._cache[key_id] = key
        return self._cache[key_id]

    def _create(self) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        kid = signing.key_id(private.public_key())
        self.key_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.key_dir, 0o700)
        path = self.key_dir / f"{kid}.key"
        pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._cache[kid] = private
        return SigningKey.create(
            key_id=kid,
            public_key=signing.b64(signing.raw_public_key(private.public_key())),
            created_at=now(),
        )

    def valid_keys(self, at: float | None = None) -> list[SigningKey]:
        """Keys still accepted for verification: current, or retired but not expired."""
        t = now() if at is None else at
        query = SigningKey.select().where(
            SigningKey.expires_at.is_null() | (SigningKey.expires_at > t)
        )
        return list(query.order_by(SigningKey.created_at.desc()))

    def bundle(self) -> dict:
        """The public key bundle for devices (see `flowfleet.signing`)."""
        return {
            "keys": [
                {"key_id": k.key_id, "public_key": k.public_key, "not_after": k.expires_at}
                for k in self.valid_keys()
            ]
        }

    # -- signing ----------------------------------------------------------------------

    def sign_version(self, version: ModelVersion, key: SigningKey | None = None) -> Signature:
        key = key or self.ensure_key()
        sig = signing.sign(self.private_key(key.key_id), version.manifest.encode("utf-8"))
        return Signature.create(version=version, key=key, signature=sig, created_at=now())

    def rotate(self, overlap_s: float = DEFAULT_OVERLAP_S) -> tuple[SigningKey, list[SigningKey]]:
        """Make a new current key, re-sign every version, retire the old key(s).

        Returns (new key, retired keys). Run it inside a transaction.
        """
        old = list(SigningKey.select().where(SigningKey.retired_at.is_null()))
        new = self._create()
        t = now()
        for k in old:
            k.retired_at = t
            k.expires_at = t + overlap_s
            k.save()
        for version in ModelVersion.select():
            self.sign_version(version, new)
        return new, old
