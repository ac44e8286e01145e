"""Create what a relay needs in its cloud: `flowfleet provision gcp` / `aws`.

Each function is idempotent: what exists already is kept and reported as such.
"""

from __future__ import annotations

from pathlib import Path

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


def aws_policy(
    thing: str, topic_prefix: str, region: str, account: str = "*", connections: int = 1
) -> dict:
    """The IoT policy of the relay identity: connect with the client ids of its
    ``connections`` connections (``thing``, ``thing-2`` ..; `aws.client_ids`) and
    publish under ``<topic_prefix>/`` only."""
    from .aws import client_ids

    base = f"arn:aws:iot:{region}:{account}"
    clients = [f"{base}:client/{c}" for c in client_ids(thing, connections)]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": clients[0] if len(clients) == 1 else clients,
            },
            {
                "Effect": "Allow",
                "Action": "iot:Publish",
                "Resource": f"{base}:topic/{topic_prefix}/*",
            },
        ],
    }


def provision_aws(
    thing: str,
    out_dir: str | Path,
    *,
    region: str,
    topic_prefix: str = "flowfleet",
    endpoint_url: str | None = None,
    connections: int = 1,
) -> dict:
    """Create the relay's IoT thing, an active certificate with its key (written to
    ``out_dir``: ``<thing>.crt``, ``<thing>.key`` mode 0600) and a policy allowing
    exactly what the relay does with ``connections`` connections, attached to both.
    Idempotent: an existing thing is kept, and so is a certificate already in
    ``out_dir``; an existing policy that allows something else (another number of
    connections) gets a new default version. Returns what was done and the account's
    ATS data endpoint (``[relays.aws] endpoint``)."""
    import json

    import boto3

    iot = boto3.client("iot", region_name=region, endpoint_url=endpoint_url)
    errors = iot.exceptions
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{thing}.crt", out / f"{thing}.key"
    done: dict = {"thing": thing, "cert_file": str(cert_path), "key_file": str(key_path)}
    try:
        iot.describe_thing(thingName=thing)  # create_thing answers 200 for an existing one
        done["thing_created"] = False
    except errors.ResourceNotFoundException:
        iot.create_thing(thingName=thing)
        done["thing_created"] = True
    policy = f"{thing}-policy"
    done["policy"] = policy
    document = aws_policy(thing, topic_prefix, region, connections=connections)
    done["policy_updated"] = False
    try:
        iot.create_policy(policyName=policy, policyDocument=json.dumps(document))
        done["policy_created"] = True
    except errors.ResourceAlreadyExistsException:
        done["policy_created"] = False
        current = json.loads(iot.get_policy(policyName=policy)["policyDocument"])
        if current != document:
            # IoT keeps at most 5 versions of a policy: delete old ones if this fails.
            iot.create_policy_version(
                policyName=policy, policyDocument=json.dumps(document), setAsDefault=True
            )
            done["policy_updated"] = True
    if cert_path.exists() and key_path.exists():
        done["certificate_created"] = False
    else:
        cert = iot.create_keys_and_certificate(setAsActive=True)
        key_path.touch(mode=0o600)
        key_path.write_text(cert["keyPair"]["PrivateKey"])
        cert_path.write_text(cert["certificatePem"])
        arn = cert["certificateArn"]
        iot.attach_policy(policyName=policy, target=arn)
        iot.attach_thing_principal(thingName=thing, principal=arn)
        done["certificate_created"] = True
        done["certificate_arn"] = arn
    done["endpoint"] = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    return done
