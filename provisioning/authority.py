"""The fleet CA as a folder: issue, sign CSRs, revoke (a CRL the broker reloads), list.

Layout of a CA folder (``flowfleet provision ca create DIR``)::

    ca.crt        the CA certificate (public: devices and the broker trust it)
    ca.key        its private key, mode 0600 (keep the folder offline, see below)
    crl.pem       the certificate revocation list, re-signed on every revocation
    index.json    every certificate issued: serial, CN, kind, expiry, revocation

Every certificate this CA signs is recorded in ``index.json`` (under an exclusive
``flock`` so the registry's enrollment and an operator's CLI never lose a record), so
``cert list`` shows expiry and ``cert revoke`` can revoke by CN. Mosquitto reads the
CRL (``crlfile``) on start and on SIGHUP: revoke, then reload the broker
(`flowfleet.provisioning.mosquitto.Broker.reload`).

A device certificate's CN is its device id (the broker's MQTT username with
``use_identity_as_username``); device certificates are short-lived by default
(`DEVICE_DAYS`) and renewed by enrolling again. Private keys written here are 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowfleet.identity import check_device_id

from .pki import Issued, issue, make_ca

KINDS = ("device", "broker", "registry", "registry-client")
DEVICE_DAYS = 30
SERVER_DAYS = 397
# How long a CRL stays valid. OpenSSL refuses every client once the broker's CRL has
# expired, so it is long and re-signed on every revocation (`write_crl`).
CRL_DAYS = 365


class AuthorityError(ValueError):
    """Bad input to a CA operation (no CA, bad CSR, unknown certificate, ...)."""


@dataclass(frozen=True)
class Record:
    """One issued certificate as ``index.json`` keeps it."""

    serial: str  # hex
    cn: str
    kind: str
    not_after: float
    issued_at: float
    revoked_at: float | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Authority:
    """A CA folder (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def ca(self) -> Issued:
        return Issued(self.folder / "ca.crt", self.folder / "ca.key")

    @property
    def crl(self) -> Path:
        return self.folder / "crl.pem"

    @property
    def index(self) -> Path:
        return self.folder / "index.json"

    # -- creation ----------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | Path, name: str = "flowfleet CA", days: int = 3650):
        """A new CA in ``folder`` (AuthorityError if one is there already)."""
        folder = Path(folder)
        if (folder / "ca.key").exists() or (folder / "ca.crt").exists():
            raise AuthorityError(f"{folder} already holds a CA (ca.crt/ca.key); nothing changed")
        if days < 1:
            raise AuthorityError("--days must be at least 1")
        make_ca(folder, name=name, days=days)
        os.chmod(folder, 0o700)
        auth = cls(folder)
        auth.index.write_text("[]\n")
        auth.write_crl()
        return auth

    def check(self) -> None:
        if not self.ca.cert.is_file():
            raise AuthorityError(f"no CA in {self.folder}: create one with 'provision ca create'")

    # -- the index ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        self.check()
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[Record]:
        """Every issued certificate, oldest first."""
        self.check()
        if not self.index.is_file():
            return []
        return [Record(**r) for r in json.loads(self.index.read_text())]

    def _save(self, records: list[Record]) -> None:
        tmp = self.index.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.to_dict() for r in records], indent=1) + "\n")
        os.replace(tmp, self.index)

    def _record(self, cert: x509.Certificate, cn: str, kind: str) -> Record:
        rec = Record(
            serial=format(cert.serial_number, "x"),
            cn=cn,
            kind=kind,
            not_after=cert.not_valid_after_utc.timestamp(),
            issued_at=_now().timestamp(),
        )
        with self._locked():
            self._save([*self.records(), rec])
        return rec

    # -- issuing -----------------------------------------------------------------------

    def issue(
        self,
        kind: str,
        cn: str,
        out: str | Path,
        *,
        hosts: tuple[str, ...] = (),
        days: int | None = None,
    ) -> tuple[Issued, Record]:
        """Issue a key and certificate into ``out`` (key 0600).

        ``kind``: ``device`` (client, CN = device id), ``broker`` / ``registry``
        (servers, SANs from ``hosts``), ``registry-client`` (the registry's own broker
        identity, CN ``registry`` or ``registry-<n>``).
        """
        self.check()
        if kind not in KINDS:
            raise AuthorityError(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
        server = kind in ("broker", "registry")
        days = days if days is not None else (SERVER_DAYS if server else DEVICE_DAYS)
        if days < 1:
            raise AuthorityError("--days must be at least 1")
        out = Path(out)
        if server and not hosts:
            raise AuthorityError(f"a {kind} certificate needs --host (its DNS names or IPs)")
        issued = issue(
            self.ca,
            cn,
            out,
            server=server,
            registry=kind == "registry-client",
            hosts=hosts,
            days=days,
        )
        if server:  # pki names server files "server.*"; name them after the kind
            target = Issued(out / f"{kind}.crt", out / f"{kind}.key")
            os.replace(issued.cert, target.cert)
            os.replace(issued.key, target.key)
            issued = target
        cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
        return issued, self._record(cert, cn, kind)

    def sign_csr(self, csr_pem: bytes, device_id: str, days: int = DEVICE_DAYS) -> bytes:
        """Sign a device's CSR (its key never leaves it); the CN must be ``device_id``.

        Returns the certificate (PEM). AuthorityError names what is wrong with the CSR.
        """
        self.check()
        check_device_id(device_id, "device id")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise AuthorityError("csr is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise AuthorityError("csr signature does not verify")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            raise AuthorityError(f"csr common name must be the device id {device_id!r}")
        key = csr.public_key()
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
            raise AuthorityError("csr RSA key is shorter than 2048 bits")
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise AuthorityError("csr key must be EC (P-256) or RSA")
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        ca_key = self._ca_key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowfleet"),
                        x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
        )
        self._record(cert, device_id, "device")
        return cert.public_bytes(serialization.Encoding.PEM)

    def check_current(self, cert_pem: bytes) -> str:
        """The CN of ``cert_pem`` if this CA issued it and it is neither revoked nor
        expired (a device renewing its certificate); AuthorityError otherwise."""
        self.check()
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise AuthorityError("certificate is not a PEM certificate") from None
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        try:
            cert.verify_directly_issued_by(ca_cert)
        except Exception:
            raise AuthorityError("certificate was not issued by this fleet CA") from None
        if cert.not_valid_after_utc <= _now():
            raise AuthorityError("certificate has expired: enroll again with a token")
        serial = format(cert.serial_number, "x")
        if any(r.serial == serial and r.revoked_at for r in self.records()):
            raise AuthorityError("certificate is revoked")
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cns[0].value) if cns else ""

    def _ca_key(self):
        if not self.ca.key.is_file():
            raise AuthorityError(
                f"{self.ca.key} is missing: this copy of the CA cannot sign (keep ca.key "
                "where certificates are issued)"
            )
        return serialization.load_pem_private_key(self.ca.key.read_bytes(), password=None)

    # -- revocation --------------------------------------------------------------------

    def revoke(self, *, cn: str | None = None, serial: str | None = None, reason: str = ""):
        """Revoke every live certificate of ``cn``, or the one with ``serial``; rewrite
        the CRL. Returns the records revoked (AuthorityError when none matched)."""
        if (cn is None) == (serial is None):
            raise AuthorityError("give a CN or --serial")
        with self._locked():
            records = self.records()
            t = _now().timestamp()
            hit = []
            out = []
            want = None if serial is None else _serial(serial)
            for r in records:
                match = r.cn == cn if cn is not None else r.serial == want
                if match and r.revoked_at is None:
                    r = Record(**{**r.to_dict(), "revoked_at": t, "reason": reason})
                    hit.append(r)
                out.append(r)
            if not hit:
                what = f"CN {cn!r}" if cn is not None else f"serial {serial}"
                raise AuthorityError(f"no unrevoked certificate with {what}; nothing changed")
            self._save(out)
            self._write_crl(out)
        return hit

    def write_crl(self) -> Path:
        """(Re)sign the CRL from the index."""
        with self._locked():
            return self._write_crl(self.records())

    def _write_crl(self, records: list[Record]) -> Path:
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=CRL_DAYS))
        )
        for r in records:
            if r.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(r.serial, 16))
                    .revocation_date(dt.datetime.fromtimestamp(r.revoked_at, dt.timezone.utc))
                    .build()
                )
        crl = builder.sign(self._ca_key(), hashes.SHA256())
        tmp = self.crl.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.crl)
        return self.crl


def _serial(text: str) -> str:
    """A serial as ``index.json`` writes it: lower-case hex, no 0x, no leading zeros."""
    s = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return format(int(s, 16), "x")
    except ValueError:
        raise AuthorityError(f"--serial {text!r} is not a hexadecimal serial") from None


def revoked_serials(crl_file: str | Path) -> set[int]:
    """The serial numbers a CRL file revokes."""
    crl = x509.load_pem_x509_crl(Path(crl_file).read_bytes())
    return {r.serial_number for r in crl}


def make_device_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A new P-256 key written to ``path`` with mode 0600 (on the device itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return key


def make_csr(key, device_id: str) -> bytes:
    """A CSR (PEM) for ``device_id`` signed by ``key``."""
    check_device_id(device_id, "device id")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowfleet"),
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def certificate_info(source: str | Path | bytes) -> dict:
    """CN, serial (hex), not_after (epoch s) and issuer of a PEM certificate (a file
    path, or the PEM bytes themselves)."""
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "cn": cns[0].value if cns else None,
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "issuer": cert.issuer.rfc4514_string(),
    }


__all__ = [
    "CRL_DAYS",
    "DEVICE_DAYS",
    "KINDS",
    "SERVER_DAYS",
    "Authority",
    "AuthorityError",
    "Record",
    "certificate_info",
    "make_csr",
    "make_device_key",
    "revoked_serials",
]
