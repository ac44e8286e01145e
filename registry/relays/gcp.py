"""Google Cloud Pub/Sub relay (Cloud IoT Core was retired on 2023-08-16, so device
data reaches Google Cloud through Pub/Sub; `google-cloud-iot` has no service behind it).

Each packet is one Pub/Sub message on the configured topic with the device as its
ordering key (a subscription with message ordering gets each device's messages in
order) and attributes ``device``, ``kind``, ``id`` (the first message id) and
``count``.

Batching: a pass of the relay job is sent as one synchronous Publish request (split
at Pub/Sub's 1,000 messages / 10 MB per request) through the library's publisher API
client (`google.pubsub_v1.PublisherClient`), without retries of its own. The
high-level `pubsub_v1.PublisherClient` batches in background threads and, once
message ordering is on, retries a failed publish for ever (its retry deadline is
forced to infinity) and pauses the ordering key: the outbox already is the durable
retry, in order, so the relay keeps the request synchronous and the outcome known
within ``timeout_s``. (`publisher_client` below is the high-level client, used by
`provision_gcp`.)

Pub/Sub bills delivered bytes with a minimum of 1,000 bytes per message, hence a
billing unit of 1,000 bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .base import Packet, Relay, Unavailable
from .settings import GcpRelay

log = logging.getLogger(__name__)

MAX_PAYLOAD = 10_000_000  # bytes per Pub/Sub message (the request limit is 10 MB)


def topic_path(settings: GcpRelay) -> str:
    return f"projects/{settings.project}/topics/{settings.topic}"


def _emulator(settings: GcpRelay) -> str | None:
    return settings.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")


def gapic_client(settings: GcpRelay):
    """The plain Pub/Sub publisher API client (one synchronous Publish per call)."""
    import grpc
    from google.auth.credentials import AnonymousCredentials
    from google.pubsub_v1 import PublisherClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    host = _emulator(settings)
    if host:
        transport = PublisherGrpcTransport(
            channel=grpc.insecure_channel(host), credentials=AnonymousCredentials()
        )
        return PublisherClient(transport=transport)
    if settings.credentials_file:
        return PublisherClient.from_service_account_file(settings.credentials_file)
    return PublisherClient()


def publisher_client(settings: GcpRelay, *, ordering: bool = True):
    """A PublisherClient for ``settings`` (the emulator's insecure channel when
    ``emulator_host`` is set, else credentials_file or Application Default Credentials)."""
    import grpc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    batch = pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=9_000_000, max_latency=0.01)
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering)
    host = _emulator(settings)
    if host:
        channel = grpc.insecure_channel(host)
        transport = PublisherGrpcTransport(channel=channel, credentials=AnonymousCredentials())
        return pubsub_v1.PublisherClient(batch, options, transport=transport)
    if settings.credentials_file:
        return pubsub_v1.PublisherClient.from_service_account_file(
            settings.credentials_file, batch_settings=batch, publisher_options=options
        )
    return pubsub_v1.PublisherClient(batch, options)


class PubSubRelay(Relay):
    name = "gcp"
    unit_bytes = 1000
    min_billed = 1000
    max_payload = MAX_PAYLOAD

    def __init__(self, settings: GcpRelay) -> None:
        self.settings = settings
        self.topic = topic_path(settings)
        self._client = None

    def _publisher(self):
        if self._client is None:
            self._client = gapic_client(self.settings)
        return self._client

    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        """One synchronous Publish request per chunk (<= 1,000 messages, <= 9 MB): the
        pass is the batch. No retry inside: a failure is the job's to retry, from the
        outbox, in order."""
        from google.api_core import exceptions as gexc
        from google.pubsub_v1 import PubsubMessage

        client = self._publisher()
        answers: list[str | None] = []
        for chunk in _chunks(packets):
            messages = [
                PubsubMessage(
                    data=p.body,
                    ordering_key=p.device,
                    attributes={
                        "device": p.device,
                        "kind": p.kind,
                        "id": p.items[0].msg_id,
                        "count": str(len(p.items)),
                    },
                )
                for p in chunk
            ]
            try:
                client.publish(
                    topic=self.topic,
                    messages=messages,
                    retry=None,
                    timeout=self.settings.timeout_s,
                )
            except (gexc.InvalidArgument, gexc.FailedPrecondition) as exc:
                # The request is refused as a whole: the job sends its messages one at
                # a time next, so only the one at fault is parked.
                answers += [f"{type(exc).__name__}: {exc.message}"] * len(chunk)
                continue
            except Exception as exc:  # unreachable, deadline, topic missing: unknown
                self.close()
                raise Unavailable(
                    f"publish to {self.topic}: {type(exc).__name__}: {exc}",
                    acked=[i for i, a in enumerate(answers) if a is None],
                ) from exc
            answers += [None] * len(chunk)
        return answers

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.transport.close()
            except Exception:
                log.debug("gcp relay: closing the channel failed", exc_info=True)


def _chunks(packets: Sequence[Packet]):
    """Pub/Sub takes at most 1,000 messages and 10 MB per Publish request."""
    chunk: list[Packet] = []
    size = 0
    for p in packets:
        if chunk and (len(chunk) == 1000 or size + p.size > 9_000_000):
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.size
    if chunk:
        yield chunk
