"""The agent's delivery bookkeeping around its outbox and publisher.

- the registry's end-to-end acknowledgement: confirmed count bins leave the outbox,
  bins the registry lacks below a later one it has are sent again at once;
- publishes the broker refuses: one error per refusal streak naming the topic and
  the agent's identity, kept for the health beat, and a ``publish_refused`` event;
- the outbox cap: applied once a second, every drop logged and reported as an
  ``outbox_dropped`` event (aggregated, at most one every 30 s), and an
  ``outbox_over_cap`` event when count bins keep the outbox over its cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flowfleet.contract import ContractError, parse_payload

from .config import AgentConfig
from .outbox import Dropped, Outbox
from .publisher import Publisher

log = logging.getLogger(__name__)

DROP_REPORT_EVERY_S = 30.0  # at most one outbox_dropped event per this long
# A registry ack that lacks a bin the broker took at least this long ago means the
# bin was lost on the way (a later one arrived); younger ones may still be in transit.
RESEND_GRACE_S = 5.0


class Delivery:
    """Acks, refusals and the outbox cap for one agent.

    Args:
        config: the agent's config (device id, broker identity, outbox settings).
        outbox, publisher: the agent's.
        event: the agent's `AgentService.event` (log and enqueue an event).
    """

    def __init__(
        self, config: AgentConfig, outbox: Outbox, publisher: Publisher, event: Callable[..., int]
    ) -> None:
        self.config = config
        self.device = config.device_id
        self.outbox = outbox
        self.publisher = publisher
        self.event = event
        self.last_error: str | None = None  # for the health beat
        self._refusal_reported = False  # one error and event per refusal streak
        self._pending_drops: dict[str, list[int]] = {}  # stream -> [n, first, last]
        self._last_drop_event = 0.0
        self._over_cap_reported = False

    def on_connect(self) -> None:
        self._refusal_reported = False  # a new session: report a refusal again

    def on_registry_ack(self, topic: str, payload: bytes) -> None:
        """The registry's end-to-end acknowledgement: settle what it confirmed, and send
        again at once the bins it lacks below a later bin it has (lost on the way)."""
        try:
            ack = parse_payload("ack", payload, device=self.device)
        except ContractError as exc:
            log.warning("ignoring an invalid registry ack on %s: %s", topic, exc)
            return
        confirmed = self.outbox.confirm_counts(ack.counts)
        resend = 0
        if ack.counts_max > ack.counts:
            resend = self.outbox.resend_counts(
                ack.counts, ack.counts_max, sent_before=time.time() - RESEND_GRACE_S
            )
        if confirmed or resend:
            log.debug(
                "registry ack: stored through seq %d (max %d); %d confirmed, %d to resend",
                ack.counts,
                ack.counts_max,
                confirmed,
                resend,
            )
        if resend:
            log.warning(
                "registry lacks count bins between seq %d and %d; sending %d again",
                ack.counts,
                ack.counts_max,
                resend,
            )
            self.publisher.notify()

    def on_publish_refused(self, topic: str, reason: str) -> None:
        """The broker refused a publish: say who we are and where we tried to publish."""
        b = self.config.broker
        who = b.username or (f"certificate {b.cert_file}" if b.cert_file else "anonymous")
        self.last_error = (
            f"broker refused publish to {topic} by device {self.device} "
            f"(broker identity {who}): {reason}"
        )
        if self._refusal_reported:
            log.debug("%s", self.last_error)
            return
        self._refusal_reported = True
        hint = ""
        if b.username and b.username != self.device:
            hint = (
                f"; device_id {self.device!r} differs from broker.username {b.username!r}, "
                "and the broker's ACL lets a device publish only under its own identity"
            )
        retry = self.publisher.refused_retry_s
        log.error("%s%s; retrying every %.0fs", self.last_error, hint, retry)
        try:  # queued like any event: it reaches the registry once publishing works
            self.event(
                "publish_refused",
                f"broker refused publishes to {topic}: {reason}",
                severity="error",
                topic=topic,
                reason=reason,
                username=b.username,
            )
        except Exception:
            log.exception("could not record the publish_refused event")

    def enforce_limits(self) -> list[Dropped]:
        ob = self.config.outbox
        dropped = self.outbox.enforce_limits(
            ob.max_messages, ob.max_age_s, ob.policy, exclude=self.publisher.busy_rows()
        )
        for d in dropped:
            log.warning(
                "outbox %s: dropped %d %s message(s), seq %d..%d (policy %s)",
                d.reason,
                d.n,
                d.stream,
                d.first_seq,
                d.last_seq,
                ob.policy,
            )
            agg = self._pending_drops.setdefault(d.stream, [0, d.first_seq, d.last_seq])
            agg[0] += d.n
            agg[1], agg[2] = min(agg[1], d.first_seq), max(agg[2], d.last_seq)
        depth = self.outbox.depth()
        if depth > ob.max_messages and not self._over_cap_reported:
            self._over_cap_reported = True
            self.event(
                "outbox_over_cap",
                f"outbox holds {depth} messages, over max_messages={ob.max_messages}; "
                f"policy {ob.policy} keeps count bins",
                severity="warning",
                depth=depth,
                max_messages=ob.max_messages,
            )
        elif depth <= ob.max_messages:
            self._over_cap_reported = False
        self.report_drops()
        return dropped

    def report_drops(self, force: bool = False) -> None:
        if not self._pending_drops:
            return
        now = time.monotonic()
        if not force and now - self._last_drop_event < DROP_REPORT_EVERY_S:
            return
        drops, self._pending_drops = self._pending_drops, {}
        self._last_drop_event = now
        for stream, (n, first, last) in sorted(drops.items()):
            self.event(
                "outbox_dropped",
                f"outbox cap dropped {n} {stream} message(s), seq {first}..{last} "
                f"(policy {self.config.outbox.policy})",
                severity="warning",
                stream=stream,
                n=n,
                first_seq=first,
                last_seq=last,
                policy=self.config.outbox.policy,
            )
