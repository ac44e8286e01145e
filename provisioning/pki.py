"""A small certificate authority for brokers and devices (``cryptography``).

`make_ca` creates a CA key and self-signed certificate; `issue` signs a server
certificate (with subject alternative names for the broker's host names / IPs) or a
device client certificate whose common name is the device id (Mosquitto's
``use_identity_as_username`` then makes it the MQTT username, so the ACL's ``%u``
pins the device to its own topics). Keys are written with mode 0600.

This runs on the provisioning host, never on a device.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowfleet.identity import check_device_id, check_registry_identity


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key, path: Path) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(folder: str | Path, name: str = "flowfleet CA", days: int = 3650) -> Issued:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    out = Issued(folder / "ca.crt", folder / "ca.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out.key)
    return out


def issue(
    ca: Issued,
    common_name: str,
    folder: str | Path,
    *,
    server: bool = False,
    registry: bool = False,
    hosts: tuple[str, ...] = (),
    days: int = 825,
) -> Issued:
    """Sign a server (``server=True``, SANs from ``hosts``) or client certificate.

    A client certificate's CN is an identity on the broker (the MQTT username with
    ``use_identity_as_username``) and names its files, so it must be a contract
    name. It is a device id unless ``registry=True``: a device certificate under one
    of the registry's reserved names (``registry``, ``registry-<n>``) is refused, and
    ``registry=True`` requires one. Raises ValueError (ContractError).
    """
    if not server:
        check = check_registry_identity if registry else check_device_id
        check(common_name, "registry certificate CN" if registry else "device certificate CN")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for host in hosts or (common_name,):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = "server" if server else common_name
    out = Issued(folder / f"{stem}.crt", folder / f"{stem}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out.key)
    return out
