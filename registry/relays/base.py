"""The one small interface every cloud relay implements, and cost-aware packing.

A relay (`Relay`) sends `Packet` s, each one cloud message made of one or more outbox
rows, and says per packet whether the cloud acknowledged it. The relay job
(`flowfleet.registry.relays.job`) owns everything else: the outbox, retries, the
circuit breaker, parking, usage. A cloud module only maps packets to its protocol:

- `Relay.send` blocks until the cloud acknowledged every packet or refused it,
  returning one entry per packet: None (acknowledged) or the reason it is refused for
  good (the message is poison: too large, invalid for the cloud). It raises
  `Unavailable` when the cloud could not be reached or did not answer in time: nothing
  is known about any packet, so all are sent again later (at least once).
- `units` is the cloud's billing measure of one message of ``size`` bytes.

Packing: the clouds bill per unit of message size (AWS IoT Core per 5 KB, Azure IoT
Hub per 4 KB, Pub/Sub at least 1,000 bytes per message), so with ``pack`` on several
messages of one device and kind go into one cloud message up to ``pack_units`` units
(never over the cloud's payload cap), as a JSON envelope::

    {"schema": "flowfleet.relay/1", "device": "cam-1", "kind": "counts",
     "ids": ["cam-1/counts/41", "cam-1/counts/42"], "messages": [{...}, {...}]}

With ``pack`` off a cloud message is the stored payload itself, its id in the
cloud's message properties.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

ENVELOPE_SCHEMA = "flowfleet.relay/1"


class Unavailable(Exception):
    """The cloud could not be reached or did not acknowledge in time: send again later.

    ``acked``: indices of the packets the cloud did acknowledge before it failed (they
    leave the outbox; the others are sent again)."""

    def __init__(self, message: str, acked: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.acked = list(acked)


@dataclass
class Item:
    """One outbox row as the relay sees it."""

    row_id: int
    msg_id: str
    device: str
    kind: str
    seq: int
    payload: str
    received_at: float


@dataclass
class Packet:
    """One cloud message: ``body`` carries ``items`` (one, unless packed)."""

    device: str
    kind: str
    items: list[Item]
    body: bytes
    packed: bool = False

    @property
    def ids(self) -> list[str]:
        return [it.msg_id for it in self.items]

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass
class Refusal:
    """An item no cloud message can carry (larger than the cloud's payload cap)."""

    item: Item
    reason: str


@dataclass
class Packing:
    packets: list[Packet] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


class Relay(ABC):
    """A connection to one cloud. Not thread-safe: the relay job's thread uses it."""

    #: the config key and metric label: "aws", "azure", "gcp"
    name: str = ""
    #: bytes per billing unit, and the largest message the cloud accepts
    unit_bytes: int = 1
    max_payload: int = 1
    #: the smallest size the cloud bills for one message
    min_billed: int = 0
    #: a daily message quota the job keeps under (`flowfleet.registry.relays.quota`),
    #: or None
    quota = None

    def units(self, size: int) -> int:
        """Billing units of one message of ``size`` bytes."""
        return max(1, math.ceil(max(size, self.min_billed) / self.unit_bytes))

    def billed_bytes(self, size: int) -> int:
        return max(size, self.min_billed)

    @abstractmethod
    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        """Send ``packets``; per packet None (acknowledged) or why it is refused for
        good. Raises `Unavailable` when the outcome is unknown."""

    def close(self) -> None:  # noqa: B027 (optional: not every client holds a connection)
        """Disconnect (the next send connects again)."""


def envelope(device: str, kind: str, items: Sequence[Item]) -> bytes:
    """The packed message of ``items`` (payloads are JSON already: joined, not parsed)."""
    head = json.dumps(
        {
            "schema": ENVELOPE_SCHEMA,
            "device": device,
            "kind": kind,
            "ids": [i.msg_id for i in items],
        },
        separators=(",", ":"),
    )
    return (head[:-1] + ',"messages":[' + ",".join(i.payload for i in items) + "]}").encode()


def _cost(item: Item, size: int | None = None) -> int:
    """What ``item`` adds to an envelope: its quoted id and payload, two commas."""
    return len(item.msg_id) + 3 + (len(item.payload.encode()) if size is None else size) + 1


def pack(items: Sequence[Item], relay: Relay, enabled: bool, pack_units: int) -> Packing:
    """Cut ``items`` (queue order) into packets for ``relay``.

    Packed: consecutive items of one device and kind share a packet while it stays
    within ``pack_units`` billing units (and the payload cap); an item larger than
    that goes alone. Unpacked: one packet per item. An item over the payload cap even
    alone is refused (it is parked, not retried).
    """
    out = Packing()
    limit = min(relay.max_payload, relay.unit_bytes * pack_units)
    groups: dict[tuple[str, str], list[list[Item]]] = {}
    # Per device and kind: the envelope's fixed size and the open chunk's item costs
    # (kept as running sums: packing is linear in the items, not quadratic).
    fixed: dict[tuple[str, str], int] = {}
    filled: dict[tuple[str, str], int] = {}
    order: list[tuple[str, str]] = []
    for it in items:
        size = len(it.payload.encode())
        key = (it.device, it.kind)
        if enabled and key not in fixed:
            fixed[key] = len(envelope(it.device, it.kind, []))
        cost = _cost(it, size)
        single = fixed[key] + cost - 2 if enabled else size
        if single > relay.max_payload:
            out.refused.append(
                Refusal(
                    it,
                    f"{single} bytes is over the {relay.name} payload cap of "
                    f"{relay.max_payload} bytes",
                )
            )
            continue
        if key not in groups:
            groups[key] = [[]]
            filled[key] = 0
            order.append(key)
        current = groups[key][-1]
        if current and (not enabled or fixed[key] + filled[key] + cost - 2 > limit):
            groups[key].append([it])
            filled[key] = cost
        else:
            current.append(it)
            filled[key] += cost
    for key in order:
        for chunk in groups[key]:
            if enabled:
                out.packets.append(Packet(*key, chunk, envelope(*key, chunk), packed=True))
            else:
                out.packets.append(Packet(*key, chunk, chunk[0].payload.encode()))
    return out
