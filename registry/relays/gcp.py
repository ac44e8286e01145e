"""Google Cloud Pub/Sub relay (Cloud IoT Core was retired on 2023-08-16, so device
data reaches Google Cloud through Pub/Sub; `google-cloud-iot` has no service behind it).

Each packet is one Pub/Sub message on the configured topic with the device as its
ordering key (a subscription with message ordering gets each device's messages in
order) and attributes ``device``, ``kind``, ``id`` (the first message id), ``count``
and, for a packet of one message, nothing else: its id is ``id``. The client's own
batching (`BatchSettings`) groups the packets of a pass into few publish requests.

Pub/Sub bills delivered bytes with a minimum of 1,000 bytes per message, hence a
billing unit of 1,000 bytes. Its publish retries for ever once ordering is on, so
`send` waits ``timeout_s`` for the acknowledgements and otherwise raises
`Unavailable`, closing the gRPC channel (the abandoned publishes fail; the rows are
sent again on the next pass, a fresh client).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from .base import Packet, Relay, Unavailable
from .settings import GcpRelay

log = logging.getLogger(__name__)

MAX_PAYLOAD = 10_000_000  # bytes per Pub/Sub message (the request limit is 10 MB)


def topic_path(settings: GcpRelay) -> str:
    return f"projects/{settings.project}/topics/{settings.topic}"


def _emulator(settings: GcpRelay) -> str | None:
    return settings.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")


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
            self._client = publisher_client(self.settings)
        return self._client

    def send(self, packets: Sequence[Packet]) -> list[str | None]:
        from google.api_core import exceptions as gexc

        client = self._publisher()
        futures = []
        try:
            for p in packets:
                attrs = {
                    "device": p.device,
                    "kind": p.kind,
                    "id": p.items[0].msg_id,
                    "count": str(len(p.items)),
                }
                futures.append(client.publish(self.topic, p.body, ordering_key=p.device, **attrs))
        except Exception as exc:  # a stopped or broken client: nothing is known
            self.close()
            raise Unavailable(f"publish to {self.topic}: {exc}") from exc
        answers: list[str | None] = []
        failed = None
        for p, f in zip(packets, futures, strict=True):
            try:
                f.result(timeout=self.settings.timeout_s)
                answers.append(None)
            except FutureTimeout:
                failed = f"no acknowledgement from {self.topic} in {self.settings.timeout_s:g}s"
                break
            except (gexc.InvalidArgument, gexc.FailedPrecondition) as exc:
                answers.append(f"{type(exc).__name__}: {exc.message}")
                client.resume_publish(self.topic, p.device)
            except gexc.NotFound as exc:  # the topic is gone: not the message's fault
                failed = f"{self.topic} not found: {exc.message}"
                break
            except Exception as exc:
                failed = f"{type(exc).__name__}: {exc}"
                break
        if failed is not None:
            self.close()
            raise Unavailable(failed, acked=[i for i, a in enumerate(answers) if a is None])
        return answers

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            # Closing the channel ends the publishes still retrying in the background.
            client._transport.close()
        except Exception:
            log.debug("gcp relay: closing the publisher failed", exc_info=True)
