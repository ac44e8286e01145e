"""Broker identities: which names a device id or an MQTT username may take.

A device's identity on the broker is its MQTT username (password file) or its client
certificate's common name (mutual TLS with ``use_identity_as_username``). The
generated ACL puts that name into topics (``%u``) and the generated listeners make it
the client id too (``use_username_as_clientid``), so it must be a valid contract name
(`flowfleet.contract.NAME_PATTERN`: no ``+``, ``#``, ``/`` or ``:``).

The registry's own identities are reserved: ``registry`` and ``registry-<n>``
(``registry_<n>``, ``registry.<n>``; one per ingest worker), and
``flowfleet-registry`` (the ingest session's default client id), in any letter case.
No device may be provisioned or configured under one of them: the ACL grants these
names every device's telemetry, and a session under the same name would be the
registry's.

Both the agent (its config) and provisioning (password file, ACL, certificates) check
names here, so this module imports nothing beyond the contract.
"""

from __future__ import annotations

import re

from flowfleet.contract import ContractError, check_name

REGISTRY_USERNAME = "registry"
RESERVED_DESCRIPTION = "registry, registry-<n>, flowfleet-registry"
_RESERVED = re.compile(r"^(flowfleet-)?registry([-_.].*)?$", re.IGNORECASE)


def is_reserved(name: str) -> bool:
    """Whether ``name`` is one of the registry's own identities."""
    return bool(_RESERVED.match(name))


def check_username(name: str, what: str = "MQTT username") -> str:
    """Return ``name`` if it is a valid broker identity, else raise ContractError."""
    if not isinstance(name, str):
        raise ContractError(f"{what} must be a string, got {type(name).__name__}")
    return check_name(name, what)


def check_device_id(name: str, what: str = "device id") -> str:
    """Like `check_username`, and refuses the registry's reserved identities."""
    check_username(name, what)
    if is_reserved(name):
        raise ContractError(
            f"{what} {name!r} is reserved for the registry's own identities "
            f"({RESERVED_DESCRIPTION}); choose another name for a device"
        )
    return name


def check_registry_identity(name: str, what: str = "registry identity") -> str:
    """Like `check_username`, and requires one of the reserved registry names."""
    check_username(name, what)
    if not is_reserved(name):
        raise ContractError(
            f"{what} {name!r} is not one of the registry's reserved identities "
            f"({RESERVED_DESCRIPTION}): a device could be provisioned under it"
        )
    return name
