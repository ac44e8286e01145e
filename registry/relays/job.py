"""The relay job: empties each relay's outbox into its cloud, at least once.

One `RelayRunner` per configured relay, each on its own thread (a slow or failing
cloud never holds up another). A pass of a runner:

1. holds the relay's lease (``relay:<name>``, `flowfleet.registry.store.leases`), so
   one registry process at a time forwards for a relay;
2. takes the oldest ``batch_max`` rows that are not parked and packs them
   (`flowfleet.registry.relays.base.pack`); a row no cloud message can carry is parked;
3. sends the packets and waits for the cloud's acknowledgements;
   with a daily quota (Azure IoT Hub's tier x units, `flowfleet.registry.relays.quota`)
   only the packets that fit in what is left of the UTC day are sent, in queue order;
   the rest stay queued untouched (held, not failed) until the next UTC day;
4. in one transaction: deletes the acknowledged rows, counts a failed send on the
   others (parking those that failed ``max_attempts`` times), parks what the cloud
   refused, and adds the pass to the hour's usage (`flowfleet.registry.relays.usage`).

A row is deleted only after the cloud acknowledged it, so a registry killed at any
point sends again, after its restart, whatever was not acknowledged: the cloud side
deduplicates on the message id. A packed message the cloud refuses is sent again
one message at a time, so only the poison one is parked and the queue moves on.

Failures: a send whose outcome is unknown (`Unavailable`) waits an exponential
backoff with jitter (``backoff_initial_s`` doubling up to ``backoff_max_s``, times a
random 0.5..1); after ``breaker_failures`` such sends in a row the circuit opens: no
send for ``breaker_cooldown_s``, then one trial pass (half open) that closes it again
when it succeeds.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw

from .. import metrics
from ..background import BackgroundLoop, thread_connection
from ..store import leases
from ..store.db import now
from . import outbox, usage
from .base import Item, Packet, Relay, Unavailable, pack
from .settings import RelayCommon

log = logging.getLogger(__name__)

# Hourly usage rows older than this are removed (a pass checks once an hour): the
# report compares at most a year.
USAGE_KEEP_S = 400 * 86400


def lease_name(relay: str) -> str:
    return f"relay:{relay}"


@dataclass
class PassResult:
    """What one pass did (for tests, the benchmark and the loop's pacing)."""

    taken: int = 0
    forwarded: int = 0
    failed: int = 0
    parked: int = 0
    held: int = 0  # rows left queued for the next UTC day by the daily quota
    error: str | None = None


class RelayRunner(BackgroundLoop):
    """Forwards one relay's outbox (see the module docstring)."""

    def __init__(
        self,
        db: pw.Database,
        relay: Relay,
        settings: RelayCommon,
        *,
        tick_s: float = 0.5,
        lease_s: float = 30.0,
        holder: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = now,
    ) -> None:
        super().__init__()
        self.db = db
        self.relay = relay
        self.name = relay.name
        self.thread_name = f"relay-{self.name}"
        self.what = f"relay {self.name}: a pass"
        self.settings = settings
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.rng = rng or random.Random()
        # Epoch seconds for usage hours, latency and the quota's UTC day (tests move it).
        self.clock = clock
        self.quota = relay.quota
        self.quota_status: dict | None = None  # the quota as of the last pass
        self.quota_held = False
        self.failures = 0  # consecutive sends with an unknown outcome
        self.open_until = 0.0  # circuit open until (monotonic); 0: closed
        self.next_try = 0.0  # backoff: no send before (monotonic)
        self.last_error: str | None = None
        self.last_ok_at: float | None = None
        self._pruned_at = 0.0
        self._held_until = 0.0  # monotonic: the lease is ours at least until then
        metrics.RELAY_CIRCUIT.labels(self.name).set(0)
        if self.quota is not None:
            metrics.RELAY_QUOTA_HELD.labels(self.name).set(0)

    # -- state ----------------------------------------------------------------------

    @property
    def circuit(self) -> str:
        if not self.open_until:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half-open"

    def state(self) -> dict:
        """The runner's live state, for the API."""
        return {
            "circuit": self.circuit,
            "consecutive_failures": self.failures,
            "retry_in_s": round(max(0.0, self.next_try - time.monotonic()), 3),
            "last_error": self.last_error,
            "last_ok_at": self.last_ok_at,
            "quota": (
                None
                if self.quota is None
                else {**(self.quota_status or {}), "held": self.quota_held}
            ),
        }

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed sends in a row (jittered)."""
        s = self.settings
        base = min(s.backoff_max_s, s.backoff_initial_s * 2 ** max(0, failures - 1))
        return base * self.rng.uniform(0.5, 1.0)

    # -- one pass -------------------------------------------------------------------

    def _hold_lease(self) -> bool:
        """Take or renew the relay's lease; renewed only in its second half, so an
        idle relay does not write to the database on every pass."""
        t = time.monotonic()
        if t < self._held_until - self.lease_s / 2:
            return True
        if leases.acquire(self.db, lease_name(self.name), self.holder, self.lease_s):
            self._held_until = t + self.lease_s
            return True
        self._held_until = 0.0
        return False

    def run_once(self) -> PassResult:
        """One pass (the lease held or taken first). Never raises for a cloud failure."""
        if time.monotonic() < self.next_try:
            return PassResult()
        left: int | None = None
        with thread_connection(self.db):
            if not self._hold_lease():
                return PassResult()
            if self.quota is not None:
                left = self._check_quota()
                if left == 0:
                    queued = outbox.queued(self.name)
                    self._hold(bool(queued))
                    return PassResult(held=queued)
            rows = outbox.due(self.name, self.settings.batch_max)
            if time.monotonic() - self._pruned_at > 3600:
                self._pruned_at = time.monotonic()
                usage.delete_before(self.clock() - USAGE_KEEP_S, relay=self.name)
        if not rows:
            self._hold(False)
            return PassResult()
        keys = {r.id: outbox.split_id(r.msg_id) for r in rows}
        stored: dict = {}
        if any(r.payload is None for r in rows):
            with thread_connection(self.db):
                stored = outbox.load_payloads(
                    self.db, [keys[r.id] for r in rows if r.payload is None]
                )
        items, gone = [], []
        for r in rows:
            payload = r.payload if r.payload is not None else stored.get(keys[r.id])
            item = Item(r.id, r.msg_id, *keys[r.id], payload or "", r.received_at)
            (items if payload is not None else gone).append(item)
        attempts = {r.id: r.attempts for r in rows}
        result = PassResult(taken=len(rows))
        packing = pack(items, self.relay, self.settings.pack, self.settings.pack_units)
        tally = usage.Tally()
        acked: list[Packet] = []
        refused: list[tuple[Item, str]] = [(r.item, r.reason) for r in packing.refused]
        refused += [(it, "the stored message is gone (removed by retention)") for it in gone]
        unknown: list[Packet] = []
        error: str | None = None
        held = 0
        if left is not None:
            packing.packets, held, left = self._fit(packing.packets, left)
        try:
            answers = self.relay.send(packing.packets) if packing.packets else []
        except Unavailable as exc:
            error = str(exc) or type(exc).__name__
            acked = [packing.packets[i] for i in exc.acked]
            unknown = [p for i, p in enumerate(packing.packets) if i not in set(exc.acked)]
        else:
            retry_alone: list[Packet] = []
            for packet, answer in zip(packing.packets, answers, strict=True):
                if answer is None:
                    acked.append(packet)
                elif len(packet.items) > 1:
                    retry_alone.extend(pack(packet.items, self.relay, False, 1).packets)
                else:
                    refused.append((packet.items[0], answer))
            if retry_alone and left is not None:
                retry_alone, more, left = self._fit(retry_alone, left)
                held += more
            if retry_alone:
                # A packed message was refused: find the poison one by sending alone.
                try:
                    answers = self.relay.send(retry_alone)
                except Unavailable as exc:
                    error = str(exc) or type(exc).__name__
                    acked.extend(retry_alone[i] for i in exc.acked)
                    unknown = [p for i, p in enumerate(retry_alone) if i not in set(exc.acked)]
                else:
                    for packet, answer in zip(retry_alone, answers, strict=True):
                        if answer is None:
                            acked.append(packet)
                        else:
                            refused.append((packet.items[0], answer))
        t = self.clock()
        for packet in acked:
            tally.publishes += 1
            tally.bytes += packet.size
            tally.units += self.relay.units(packet.size)
            for it in packet.items:
                tally.messages += 1
                tally.retries += 1 if attempts[it.row_id] else 0
                tally.observe_ms(max(0.0, (t - it.received_at) * 1000.0))
        failed_ids = [it.row_id for p in unknown for it in p.items]
        # Failed sends count towards parking only while the circuit is closed: an
        # outage opens it after breaker_failures sends, and a cloud that is down for
        # days must not park what it will take once it is back.
        counting = self.failures < self.settings.breaker_failures
        exhausted = [
            i for i in failed_ids if counting and attempts[i] + 1 >= self.settings.max_attempts
        ]
        tally.failures = len(failed_ids)
        tally.parked = len(refused) + len(exhausted)
        with thread_connection(self.db), self.db.atomic():
            outbox.acknowledge([it.row_id for p in acked for it in p.items])
            if failed_ids:
                outbox.failed(failed_ids, error or "unavailable", count=counting)
            for i in exhausted:
                outbox.park(i, f"gave up after {self.settings.max_attempts} failed sends: {error}")
            for item, reason in refused:
                outbox.park(item.row_id, f"refused by {self.name}: {reason}")
            usage.record(self.name, t, tally)
        self._account(tally, acked, refused, exhausted, failed_ids, error, t)
        result.forwarded = tally.messages
        result.failed = len(failed_ids)
        result.parked = tally.parked
        result.held = held
        result.error = error
        if self.quota is not None:
            self.quota_status = {**(self.quota_status or {}), "left_today": left}
            self._hold(held > 0)
        return result

    # -- daily quota ----------------------------------------------------------------

    def _check_quota(self) -> int:
        """Blocks left today (inside a connection); refreshes the status and gauge."""
        self.quota_status = self.quota.status(self.name, self.clock())
        left = self.quota_status["left_today"]
        metrics.RELAY_QUOTA_LEFT.labels(self.name).set(left)
        return left

    def _fit(self, packets: list[Packet], left: int) -> tuple[list[Packet], int, int]:
        """The leading ``packets`` that fit in ``left`` quota blocks (queue order: the
        first that does not fit holds back everything after it), the rows held, and
        the blocks left after them."""
        for k, p in enumerate(packets):
            need = self.quota.blocks(p.size)
            if need > left:
                return packets[:k], sum(len(q.items) for q in packets[k:]), left
            left -= need
        return packets, 0, left

    def _hold(self, held: bool) -> None:
        if self.quota is None:
            return
        if held and not self.quota_held:
            log.warning(
                "relay %s: the daily quota (%s x%d, %d blocks) is used up: messages wait in "
                "the outbox until 00:00 UTC",
                self.name,
                self.quota.tier,
                self.quota.units,
                self.quota.limit,
            )
        elif self.quota_held and not held:
            log.info("relay %s: quota available again, sending", self.name)
        self.quota_held = held
        metrics.RELAY_QUOTA_HELD.labels(self.name).set(1 if held else 0)
        if self.quota_status is not None:
            metrics.RELAY_QUOTA_LEFT.labels(self.name).set(self.quota_status["left_today"])

    def _account(self, tally, acked, refused, exhausted, failed_ids, error, t) -> None:
        m = metrics
        name = self.name
        if tally.messages:
            m.RELAY_MESSAGES.labels(name, "forwarded").inc(tally.messages)
            m.RELAY_PUBLISHES.labels(name).inc(tally.publishes)
            m.RELAY_BYTES.labels(name).inc(tally.bytes)
            m.RELAY_UNITS.labels(name).inc(tally.units)
            if tally.retries:
                m.RELAY_RETRIES.labels(name).inc(tally.retries)
            hist = m.RELAY_LATENCY.labels(name)
            for p in acked:
                for it in p.items:
                    hist.observe(max(0.0, t - it.received_at))
        if refused or exhausted:
            m.RELAY_MESSAGES.labels(name, "parked").inc(len(refused) + len(exhausted))
            for item, reason in refused:
                log.warning("relay %s: parked %s: %s", name, item.msg_id, reason)
        if failed_ids:
            m.RELAY_MESSAGES.labels(name, "failed").inc(len(failed_ids))
            self.failures += 1
            self.last_error = error
            delay = self.backoff(self.failures)
            if self.failures >= self.settings.breaker_failures:
                delay = max(delay, self.settings.breaker_cooldown_s)
                if self.circuit == "closed":
                    log.error(
                        "relay %s: %d failed sends in a row, circuit open for %.0fs: %s",
                        name,
                        self.failures,
                        delay,
                        error,
                    )
                self.open_until = time.monotonic() + delay
                m.RELAY_CIRCUIT.labels(name).set(1)
            else:
                log.warning("relay %s: send failed, retrying in %.2fs: %s", name, delay, error)
            self.next_try = time.monotonic() + delay
            self.relay.close()  # the next send starts from a fresh connection
        elif acked:
            if self.open_until:
                log.info("relay %s: circuit closed, the cloud acknowledges again", name)
            self.failures = 0
            self.open_until = 0.0
            self.next_try = 0.0
            self.last_ok_at = t
            m.RELAY_CIRCUIT.labels(name).set(0)

    # -- thread ---------------------------------------------------------------------

    def join_s(self) -> float:
        return self.settings.timeout_s + 10

    def stop(self) -> None:
        self.stop_thread()
        self.relay.close()
        self._held_until = 0.0
        try:
            with thread_connection(self.db):
                leases.release(self.db, lease_name(self.name), self.holder)
        except Exception:
            log.debug("relay %s: could not release the lease", self.name, exc_info=True)

    def run_pass(self) -> bool:
        result = self.run_once()
        return result.taken >= self.settings.batch_max and not (result.error or result.held)

    def wait_s(self) -> float:
        if self.next_try:
            return max(0.0, min(self.next_try - time.monotonic(), 60.0)) or self.tick_s
        if self.quota_held:
            # Until the next UTC day, looking again each minute (the clock, or the
            # quota's usage, may change meanwhile).
            resets = self.quota.resets_at(self.clock()) - self.clock()
            return max(self.tick_s, min(resets, 60.0))
        return self.tick_s


class RelayJob:
    """Every configured relay's runner, started and stopped together."""

    def __init__(self, runners: list[RelayRunner]) -> None:
        self.runners = {r.name: r for r in runners}

    def start(self) -> None:
        for r in self.runners.values():
            r.start()

    def stop(self) -> None:
        for r in self.runners.values():
            r.stop()

    def wake(self) -> None:
        for r in self.runners.values():
            r.wake()

    def state(self) -> dict[str, dict]:
        return {name: r.state() for name, r in self.runners.items()}


def build_job(
    db: pw.Database,
    section,
    *,
    factory: Callable[[str, RelayCommon], Relay] | None = None,
) -> RelayJob | None:
    """The relay job of a ``[relays]`` section (None when no relay is enabled)."""
    from .clouds import make_relay

    make = factory or make_relay
    runners = [
        RelayRunner(db, make(name, s), s, tick_s=section.tick_s, lease_s=section.lease_s)
        for name, s in section.configured().items()
    ]
    return RelayJob(runners) if runners else None
