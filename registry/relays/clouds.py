"""Which module speaks to which cloud (imported only when that relay is configured, so
a registry without relays never loads the cloud SDKs)."""

from __future__ import annotations

from .base import Relay
from .settings import RelayCommon

CLOUDS = ("aws", "azure", "gcp")


def make_relay(name: str, settings: RelayCommon) -> Relay:
    """The relay for config sub-table ``[relays.<name>]``."""
    if name == "gcp":
        from .gcp import PubSubRelay

        return PubSubRelay(settings)
    if name == "azure":
        from .azure import IotHubRelay

        return IotHubRelay(settings)
    if name == "aws":
        from .aws import IotCoreRelay

        return IotCoreRelay(settings)
    raise ValueError(f"unknown relay {name!r} (one of {', '.join(CLOUDS)})")
