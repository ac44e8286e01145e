"""Create what a relay needs in its cloud: `flowfleet provision gcp` / `aws`.

Each function is idempotent: what exists already is kept and reported as such.
"""

from __future__ import annotations

from .settings import GcpRelay


def provision_gcp(settings: GcpRelay, subscription: str, *, ordering: bool = True) -> dict:
    """Create the Pub/Sub topic of ``settings`` and a pull ``subscription`` on it (with
    message ordering, so each device's messages arrive in order). Returns what was
    created or found."""
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    from .gcp import _emulator, publisher_client, topic_path

    topic = topic_path(settings)
    sub_path = f"projects/{settings.project}/subscriptions/{subscription}"
    out = {"topic": topic, "subscription": sub_path}
    publisher = publisher_client(settings, ordering=False)
    try:
        try:
            publisher.create_topic(name=topic)
            out["topic_created"] = True
        except gexc.AlreadyExists:
            out["topic_created"] = False
    finally:
        publisher._transport.close()
    host = _emulator(settings)
    if host:
        import grpc
        from google.auth.credentials import AnonymousCredentials
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        transport = SubscriberGrpcTransport(
            channel=grpc.insecure_channel(host), credentials=AnonymousCredentials()
        )
        subscriber = pubsub_v1.SubscriberClient(transport=transport)
    elif settings.credentials_file:
        subscriber = pubsub_v1.SubscriberClient.from_service_account_file(settings.credentials_file)
    else:
        subscriber = pubsub_v1.SubscriberClient()
    try:
        try:
            subscriber.create_subscription(
                request={
                    "name": sub_path,
                    "topic": topic,
                    "enable_message_ordering": ordering,
                    "ack_deadline_seconds": 60,
                }
            )
            out["subscription_created"] = True
        except gexc.AlreadyExists:
            out["subscription_created"] = False
    finally:
        subscriber.close()
    return out
