"""The ``[relays]`` section of the registry config: which clouds, what, how.

One optional sub-table per cloud (``[relays.aws]``, ``[relays.azure]``,
``[relays.gcp]``); a cloud without one is not relayed to. Every relay has the common
keys of `RelayCommon` (what to forward, packing, retries, the circuit breaker) and
its cloud's connection keys. Secrets (the Azure device key) never sit in the file:
``*_file`` or ``*_env`` name where they are, as for the broker password.
docs/relays.md has the reference.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flowfleet.configfile import ENV_NAME, Strict

# The device message kinds that carry a per-device seq (the stable id's last part).
RELAYABLE_KINDS = ("counts", "health", "events", "drift", "shadow")
Kind = Literal["counts", "health", "events", "drift", "shadow"]


class RelayCommon(Strict):
    """What every relay has: the route (devices, groups, kinds), packing, retries."""

    enabled: bool = Field(True, description="false: nothing is queued or sent")
    kinds: tuple[Kind, ...] = Field(("counts",), min_length=1, description="message kinds")
    devices: tuple[str, ...] = Field(
        ("*",), description="shell patterns of device ids; a device matching one is relayed"
    )
    groups: tuple[str, ...] = Field(
        (), description="device groups whose members are relayed too (besides `devices`)"
    )
    pack: bool = Field(
        True,
        description="pack several messages of one device and kind into one cloud message, "
        "up to pack_units billing units",
    )
    pack_units: int = Field(1, ge=1, le=64, description="billing units a packed message fills")
    batch_max: int = Field(500, ge=1, le=10_000, description="outbox rows taken per pass")
    max_attempts: int = Field(
        50, ge=1, le=100_000, description="failed sends of one message before it is parked"
    )
    backoff_initial_s: float = Field(0.5, gt=0, le=3600)
    backoff_max_s: float = Field(60.0, gt=0, le=86_400)
    breaker_failures: int = Field(
        5, ge=1, le=1000, description="consecutive failed sends that open the circuit"
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, le=86_400, description="open circuit: wait this long, then try one send"
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="wait for the cloud's ack")

    @model_validator(mode="after")
    def _backoff_order(self):
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s must be at least backoff_initial_s "
                f"({self.backoff_max_s:g} < {self.backoff_initial_s:g})"
            )
        return self


class GcpRelay(RelayCommon):
    """Google Cloud Pub/Sub (Cloud IoT Core was retired on 2023-08-16)."""

    project: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    topic: str = Field("flowfleet", min_length=3, max_length=255)
    credentials_file: str | None = Field(
        None, description="service account JSON; default: Application Default Credentials"
    )
    emulator_host: str | None = Field(
        None, description="host:port of a Pub/Sub emulator (tests); default $PUBSUB_EMULATOR_HOST"
    )


class AzureRelay(RelayCommon):
    """Azure IoT Hub device-to-cloud messages over its MQTT protocol (paho 2, SAS)."""

    connection_string_file: str | None = Field(
        None, description="a file holding HostName=..;DeviceId=..;SharedAccessKey=.."
    )
    connection_string_env: str | None = Field(None, pattern=ENV_NAME)
    port: int = Field(8883, ge=1, le=65535)
    ca_file: str | None = Field(None, description="default: the system's trust store")
    token_ttl_s: int = Field(3600, ge=60, le=365 * 86_400, description="SAS token lifetime")
    tier: Literal["F1", "B1", "B2", "B3", "S1", "S2", "S3"] | None = Field(
        None,
        description="the hub's tier: its daily message quota (times `units`) is enforced, "
        "messages past it wait in the outbox for the next UTC day; unset: not enforced",
    )
    units: int = Field(1, ge=1, le=200, description="the hub's units of `tier`")

    @model_validator(mode="after")
    def _one_secret(self):
        if bool(self.connection_string_file) == bool(self.connection_string_env):
            raise ValueError("give exactly one of connection_string_file and connection_string_env")
        return self

    @model_validator(mode="after")
    def _quota(self):
        if self.tier is None:
            if "units" in self.model_fields_set:
                raise ValueError("units needs tier (the hub's tier and units set its quota)")
            return self
        from .quota import DailyQuota

        DailyQuota.azure(self.tier, self.units)  # F1 has 1 unit, B3 and S3 up to 10
        return self


class AwsRelay(RelayCommon):
    """AWS IoT Core over MQTT 5 with mutual TLS (the relay thing's certificate)."""

    endpoint: str = Field(min_length=1, description="the account's ...-ats.iot.<region> host")
    port: int = Field(8883, ge=1, le=65535)
    client_id: str = Field("flowfleet-relay", min_length=1, max_length=128)
    cert_file: str
    key_file: str
    ca_file: str | None = Field(None, description="Amazon Root CA 1; default: system store")
    topic_prefix: str = Field("flowfleet", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    publishes_per_s: float = Field(
        90.0, gt=0, le=100, description="pacing under IoT Core's 100 publishes/s per connection"
    )
    connections: int = Field(
        1,
        ge=1,
        le=32,
        description="MQTT connections sharing the outbox, each its own client id "
        "(<client_id>, <client_id>-2, ..) and under IoT Core's per-connection limits",
    )

    @model_validator(mode="after")
    def _client_ids_fit(self):
        if self.connections > 1 and len(f"{self.client_id}-{self.connections}") > 128:
            raise ValueError(
                f"client_id is too long for {self.connections} connections "
                "(IoT Core allows 128 bytes, <client_id>-<n> included)"
            )
        return self


class RelaysSection(Strict):
    """``[relays]``: the relay job and one sub-table per cloud."""

    tick_s: float = Field(0.5, gt=0, le=60, description="seconds between passes when idle")
    lease_s: float = Field(
        30.0, gt=0, le=3600, description="how long another registry waits for a silent relay"
    )
    aws: AwsRelay | None = None
    azure: AzureRelay | None = None
    gcp: GcpRelay | None = None

    def configured(self) -> dict[str, RelayCommon]:
        """The enabled relays by cloud name."""
        out: dict[str, RelayCommon] = {}
        for name in ("aws", "azure", "gcp"):
            section = getattr(self, name)
            if section is not None and section.enabled:
                out[name] = section
        return out

    def routes(self):
        """What ingest queues for each enabled relay (`flowfleet.registry.relays.outbox`)."""
        from .outbox import Route

        return tuple(
            Route(name, tuple(s.kinds), tuple(s.devices), tuple(s.groups))
            for name, s in self.configured().items()
        )
