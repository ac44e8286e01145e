"""The registry's TOML config file, validated at load.

``flowfleet registry --config registry.toml`` (default ``/etc/flowfleet/registry.toml``
when that file exists). Unknown keys are rejected and every error names the file and
the key, for example::

    registry.toml: broker.port: Input should be less than or equal to 65535

Relative paths resolve against the file's folder. Command-line flags override the
file (`with_overrides`). The broker password never sits in the file: ``password_file``
(mode 0600) or ``password_env`` name where it is, and it is never logged.
docs/registry.md ("Config file") has the reference and an example.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from flowfleet.configfile import (
    ENV_NAME,
    ConfigError,
    Strict,
    check_broker_login,
    describe,
    read_secret,
    read_toml,
    unreadable,
    unset_env,
)
from flowfleet.contract import DEFAULT_ROOT
from flowfleet.identity import check_registry_identity
from flowfleet.mqtt import BrokerAddress

from .relays.settings import RelaysSection

DEFAULT_CONFIG = Path("/etc/flowfleet/registry.toml")
DEFAULT_CLIENT_ID = "flowfleet-registry"

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "RegistrySettings",
    "broker_address",
    "check_files",
    "load_registry_config",
    "with_overrides",
]


class DatabaseSection(Strict):
    url: str | None = Field(
        None,
        description="SQLite path, sqlite:///path or postgresql://user@host/db; default "
        "$FLOWFLEET_DATABASE_URL, else flowfleet-registry.sqlite",
    )


class StorageSection(Strict):
    state_dir: str | None = Field(None, description="holds artifacts/ and keys/")
    artifacts: str | None = Field(None, description="a directory or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, pattern=r"^https?://\S+$")
    key_dir: str | None = Field(None, description="private signing keys (0700)")
    max_upload_mib: int = Field(512, ge=1, le=1 << 20)


class BrokerSection(Strict):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_root: str = DEFAULT_ROOT
    username: str | None = Field(None, description="registry or registry-<n>")
    # Refused with a message saying where the password goes instead.
    password: Any = Field(None, exclude=True, repr=False)
    password_file: str | None = None
    password_env: str | None = Field(None, pattern=ENV_NAME)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str = DEFAULT_CLIENT_ID

    @field_validator("password", mode="before")
    @classmethod
    def _no_password(cls, v):
        if v is not None:
            raise ValueError(
                "the password never goes in the config file: put it in a file (mode 0600) "
                "named by password_file, or in the environment variable named by password_env"
            )
        return v

    @field_validator("username", "client_id")
    @classmethod
    def _reserved(cls, v, info):
        # The generated ACL grants every device's telemetry to these names only, and
        # no device can be provisioned under them.
        return None if v is None else check_registry_identity(v, info.field_name)

    @model_validator(mode="after")
    def _consistent(self):
        check_broker_login(self, "the registry's certificate")
        return self


class HttpSection(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0: a free port")
    threads: int = Field(8, ge=1, le=64, description="requests served at once")
    anonymous_read: Literal["local", "none", "all"] = "local"
    proxy_hops: int = Field(
        0, ge=0, le=10, description="reverse proxies in front that set X-Forwarded-*; 0: off"
    )
    proxy_headers: tuple[Literal["for", "proto", "host", "port", "prefix"], ...] = (
        "for",
        "proto",
    )
    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(("127.0.0.1/32", "::1/128"), min_length=1)
    live_streams: int | None = Field(
        None,
        ge=0,
        le=63,
        description="Server-Sent Events streams open at once (each holds a thread); 0: pages "
        "poll; default: half the threads, at most 4",
    )
    live_stream_s: float = Field(
        60.0, ge=5, le=3600, description="a live stream ends after this; the browser reconnects"
    )

    @model_validator(mode="after")
    def _streams_leave_threads(self):
        if self.live_streams is not None and self.live_streams >= self.threads:
            raise ValueError(
                f"live_streams ({self.live_streams}) must be below threads ({self.threads}): "
                "each open stream holds a thread"
            )
        return self


class MapSection(Strict):
    """The web UI's fleet map. Without ``tiles`` the map draws its markers on a plain
    background with a scale bar (air-gapped sites); with it, the browser loads tiles
    from that URL (the registry never fetches them)."""

    tiles: str | None = Field(
        None,
        description="tile URL template with {z}, {x} and {y}, e.g. "
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png; none: no tiles",
    )
    attribution: str = Field("", max_length=500, description="credit the tile provider asks for")

    @field_validator("tiles")
    @classmethod
    def _tile_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not (
            value.startswith("https://") or value.startswith("http://") or value.startswith("/")
        ):
            raise ValueError("must be an http(s) URL or a path on the registry's host")
        missing = [p for p in ("{z}", "{x}", "{y}") if p not in value]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)} (a tile URL template)")
        if any(c in value for c in ' "<>'):
            raise ValueError("must not contain spaces, quotes or angle brackets")
        return value


class WatchSection(Strict):
    dir: str | None = Field(None, description="register model files dropped here")


class CountsSection(Strict):
    """Counts over time: the site's timezone (day rollups start at its midnight) and
    how long raw count bins are kept (the rollups keep every count)."""

    timezone: str = Field("UTC", description="IANA name, e.g. Europe/Paris")
    raw_retention_days: float = Field(
        90.0, ge=0, description="raw bins, health beats and shadow windows; 0 keeps them"
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(
                f"unknown timezone {value!r} (an IANA name such as Europe/Paris)"
            ) from None
        return value


class IngestSection(Strict):
    """How device messages are stored: worker sessions on a shared subscription, and
    the batches each stores per transaction (docs/registry.md, "Ingest workers")."""

    workers: int = Field(
        1,
        ge=1,
        le=32,
        description="ingest sessions; more than 1 share a subscription, each in its own "
        "process with the client id and username <name>-<n>",
    )
    batch_max: int = Field(1000, ge=1, le=5000, description="most messages per transaction")
    batch_wait_ms: float = Field(
        50.0, ge=0, le=1000, description="how long a batch waits for more after its first"
    )
    store: Literal["process", "thread"] = Field(
        "thread",
        description="where each worker stores its batches: a child process of its own "
        "(receiving and storing on two cores) or a thread beside paho's (one core)",
    )


class DevicesSection(Strict):
    """Device presence: a device silent for longer than this is shown "stale"."""

    stale_after_s: float = Field(
        180.0,
        gt=0,
        le=30 * 86_400,
        description="seconds; 6 of the agent's default 30 s health beats",
    )


class WebhooksSection(Strict):
    """Webhooks fed from the audit trail (docs/webhooks.md): how often new entries are
    dispatched and due deliveries sent, and how a failing receiver is retried."""

    enabled: bool = Field(True, description="false: nothing is dispatched or sent")
    interval_s: float = Field(2.0, gt=0, le=3600, description="seconds between passes")
    timeout_s: float = Field(
        10.0, gt=0, le=300, description="seconds to connect and for each read of an answer"
    )
    max_attempts: int = Field(8, ge=1, le=100, description="attempts before giving up")
    max_age_s: float = Field(
        86_400.0, gt=0, le=30 * 86_400, description="give up on a delivery older than this"
    )
    backoff_initial_s: float = Field(
        10.0, gt=0, le=86_400, description="wait after the first failure; doubles per failure"
    )
    backoff_max_s: float = Field(3600.0, gt=0, le=86_400, description="longest wait")
    concurrency: int = Field(4, ge=1, le=64, description="deliveries sent at once")
    log_retention_days: float = Field(
        30.0,
        ge=0,
        le=36_500,
        description="deliveries delivered or given up longer ago leave the delivery log "
        "(with their attempts); 0 keeps them",
    )

    @model_validator(mode="after")
    def _backoff_order(self):
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                "backoff_max_s must be at least backoff_initial_s "
                f"({self.backoff_max_s:g} < {self.backoff_initial_s:g})"
            )
        return self

    def job_settings(self):
        """The `WebhookSettings` the registry's webhook job runs with."""
        from .fleet.webhooks import WebhookSettings

        return WebhookSettings(
            interval_s=self.interval_s,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            max_age_s=self.max_age_s,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            concurrency=self.concurrency,
        )


class DriftSection(Strict):
    """The drift judge (docs/drift.md): how often it runs, the sample sizing of its
    thresholds, k of n confirmation and which policies can raise a breach."""

    enabled: bool = True
    interval_s: float = Field(60.0, gt=0, le=86_400, description="seconds between passes")
    min_detections: int = Field(50, ge=1, description="fewer in a window: not judged")
    min_frames: int = Field(10, ge=1)
    alpha: float = Field(0.001, gt=0, lt=0.5, description="per statistic and window")
    dispersion_psi: float = Field(
        5.2, gt=0, le=1000, description="variance inflation of PSI (calibrated, docs/drift.md)"
    )
    dispersion_ks: float = Field(4.0, gt=0, le=1000, description="... of KS")
    dispersion_js: float = Field(8.0, gt=0, le=1000, description="... of Jensen-Shannon")
    dispersion_dpf: float = Field(4.0, gt=0, le=1000, description="... of detections per frame")
    dpf_floor: float = Field(1.0, ge=0, description="relative change in detections per frame")
    latency_ratio_max: float = Field(2.0, gt=1)
    confidence_variance_max: float = Field(0.15, gt=0, le=0.25)
    agreement_min: float = Field(0.7, ge=0, le=1)
    brightness_shift_max: float = Field(0.25, gt=0, le=10)
    blur_ratio_max: float = Field(2.0, gt=1)
    k: int = Field(3, ge=1, le=100, description="breaches among the last n judged windows")
    n: int = Field(4, ge=1, le=100)
    policies: tuple[Literal["distribution", "latency", "confidence_variance", "agreement"], ...] = (
        Field(("distribution", "latency", "confidence_variance", "agreement"), min_length=1)
    )
    baseline_windows: int = Field(10, ge=1, le=1000, description="previous model's windows pooled")
    judge_windows: int = Field(
        60, ge=1, le=100_000, description="windows judged before a new model is accepted"
    )
    settle_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="windows younger than this wait for the next pass (an ingest "
        "transaction still in flight on PostgreSQL)",
    )
    watch: bool = Field(
        True, description="judge cameras whose model did not change for scene changes"
    )

    @model_validator(mode="after")
    def _k_of_n(self):
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self

    def stats_settings(self):
        """The thresholds as `flowfleet.registry.fleet.drift_stats.Settings`."""
        from .fleet.drift_stats import Settings

        names = Settings.__dataclass_fields__
        return Settings(**{k: v for k, v in self.model_dump().items() if k in names})

    def judge_options(self):
        from .fleet.drift import JudgeOptions

        return JudgeOptions(
            baseline_windows=self.baseline_windows,
            judge_windows=self.judge_windows,
            settle_s=self.settle_s,
            watch=self.watch,
        )


class RolloutsSection(Strict):
    """Staged rollouts (docs/registry.md, "Staged rollouts"): the job that steps them,
    and plan defaults for rollouts that do not set them."""

    enabled: bool = Field(True, description="run the rollout job in this registry")
    tick_s: float = Field(5.0, gt=0, le=600, description="seconds between steps")
    lease_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="how long another registry waits for a silent job before taking "
        "over; default 3 x tick_s (at least 1 s)",
    )
    waves: int | None = Field(None, ge=1, le=100, description="plan default: waves")
    soak_s: float | None = Field(None, ge=0, le=7 * 86_400, description="plan default")
    timeout_s: float | None = Field(None, gt=0, le=7 * 86_400, description="plan default")
    beat_timeout_s: float | None = Field(None, gt=0, le=86_400, description="plan default")
    rate_per_minute: float | None = Field(None, gt=0, le=1_000_000, description="plan default")

    @model_validator(mode="after")
    def _lease_outlasts_a_tick(self):
        if self.lease_s is not None and self.lease_s <= self.tick_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be longer than tick_s ({self.tick_s:g}), "
                "or the lease expires between two steps"
            )
        return self

    def plan_defaults(self) -> dict[str, Any]:
        """The plan keys this section sets (a rollout's own plan wins)."""
        keys = ("waves", "soak_s", "timeout_s", "beat_timeout_s", "rate_per_minute")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class EnrollmentSection(Strict):
    """Enrollment by claim (docs/provisioning.md): off unless ``ca_dir`` is set."""

    ca_dir: str | None = Field(
        None, description="fleet CA folder with its key (flowfleet provision ca create)"
    )
    broker_host: str | None = Field(None, description="the mTLS listener as devices reach it")
    broker_port: int = Field(8883, ge=1, le=65535)
    cert_days: int = Field(30, ge=1, le=825, description="validity of enrolled certificates")
    broker_dir: str | None = Field(
        None, description="the broker's folder (provision broker-config): revocations copy the CRL"
    )
    broker_pidfile: str | None = Field(None, description="SIGHUP this broker after a revocation")
    broker_auth: bool = Field(
        False,
        description="generate broker_dir/devices.passwd and devices.acl from the device records",
    )
    broker_acl: Literal["known", "accepted"] = Field(
        "known", description="which devices the generated ACL grants"
    )
    broker_admins: list[str] = Field(
        ["registry"], min_length=1, description="the registry's broker identities (ACL admins)"
    )
    broker_password_base: str | None = Field(
        None, description="password-file lines for the registry's own identities"
    )
    broker_reload_command: str | None = Field(
        None, description="reloads the broker instead of broker_pidfile (systemctl reload ...)"
    )
    broker_password_port: int | None = Field(
        None, ge=1, le=65535, description="the password listener, for devices without mTLS"
    )
    rate_limit_window_s: float = Field(
        60.0, gt=0, le=86400, description="window of the enroll/renew rate limits"
    )
    rate_limit_per_address: int = Field(
        30, ge=0, description="enroll/renew attempts per source address per window; 0: off"
    )
    rate_limit_per_token: int = Field(
        10, ge=0, description="attempts per bootstrap token (or certificate) per window; 0: off"
    )

    @model_validator(mode="after")
    def _complete(self):
        if self.ca_dir and not self.broker_host:
            raise ValueError("ca_dir needs broker_host (where enrolled devices connect)")
        if self.broker_auth and not self.broker_dir:
            raise ValueError("broker_auth needs broker_dir (where the generated files go)")
        if self.broker_password_port and not self.broker_auth:
            raise ValueError("broker_password_port needs broker_auth (the registry's passwords)")
        for name in self.broker_admins:
            check_registry_identity(name, "enrollment.broker_admins")
        return self


class RegistrySettings(Strict):
    database: DatabaseSection = DatabaseSection()
    counts: CountsSection = CountsSection()
    ingest: IngestSection = IngestSection()
    devices: DevicesSection = DevicesSection()
    storage: StorageSection = StorageSection()
    broker: BrokerSection = BrokerSection()
    http: HttpSection = HttpSection()
    watch: WatchSection = WatchSection()
    webhooks: WebhooksSection = WebhooksSection()
    drift: DriftSection = DriftSection()
    rollouts: RolloutsSection = RolloutsSection()
    relays: RelaysSection = RelaysSection()
    map: MapSection = MapSection()
    enrollment: EnrollmentSection = EnrollmentSection()


_BROKER_FILES = ("password_file", "ca_file", "cert_file", "key_file")
_STORAGE_PATHS = ("state_dir", "artifacts", "key_dir")
# Files a relay sub-table may name, resolved against the config's folder.
_RELAY_FILES = ("ca_file", "cert_file", "key_file", "credentials_file", "connection_string_file")


def _is_plain_path(value: str) -> bool:
    return "://" not in value and not value.startswith("sqlite:")


def load_registry_config(path: str | Path, *, check: bool = True) -> RegistrySettings:
    """Read and validate a registry TOML file; relative paths resolve against its
    folder. With ``check``, files it names must be readable and ``password_env`` set
    (the management commands, which never connect to the broker, skip that)."""
    path = Path(path)
    data = read_toml(path)
    try:
        settings = RegistrySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, str(path))) from None
    base = path.resolve().parent

    def rel(p: str | None) -> str | None:
        # URLs (postgresql://, s3://, sqlite:...) stay as they are; plain paths are
        # relative to the config file.
        if p is None or not _is_plain_path(p):
            return p
        return str(base / Path(p).expanduser())

    s = settings
    settings = s.model_copy(
        update={
            "database": s.database.model_copy(update={"url": rel(s.database.url)}),
            "storage": s.storage.model_copy(
                update={k: rel(getattr(s.storage, k)) for k in _STORAGE_PATHS}
            ),
            "broker": s.broker.model_copy(
                update={k: rel(getattr(s.broker, k)) for k in _BROKER_FILES}
            ),
            "watch": s.watch.model_copy(update={"dir": rel(s.watch.dir)}),
            "relays": s.relays.model_copy(
                update={
                    name: relay.model_copy(
                        update={
                            k: rel(getattr(relay, k)) for k in _RELAY_FILES if hasattr(relay, k)
                        }
                    )
                    for name in ("aws", "azure", "gcp")
                    if (relay := getattr(s.relays, name)) is not None
                }
            ),
            "enrollment": s.enrollment.model_copy(
                update={
                    k: rel(getattr(s.enrollment, k))
                    for k in ("ca_dir", "broker_dir", "broker_pidfile", "broker_password_base")
                }
            ),
        }
    )
    if check:
        check_files(settings, str(path))
    return settings


def check_files(settings: RegistrySettings, source: str) -> None:
    """ConfigError naming ``source`` and the keys whose files cannot be read."""
    b = settings.broker
    problems = [unreadable(f"broker.{k}", getattr(b, k)) for k in _BROKER_FILES]
    problems.append(unset_env("broker.password_env", b.password_env))
    for name, relay in settings.relays.configured().items():
        for key in _RELAY_FILES:
            if hasattr(relay, key):
                problems.append(unreadable(f"relays.{name}.{key}", getattr(relay, key)))
        if hasattr(relay, "connection_string_env"):
            env = relay.connection_string_env
            problems.append(unset_env(f"relays.{name}.connection_string_env", env))
    ca_dir = settings.enrollment.ca_dir
    if ca_dir:  # enrolling signs with the CA's key
        problems += [
            unreadable("enrollment.ca_dir", str(Path(ca_dir) / name))
            for name in ("ca.crt", "ca.key", "index.json")
        ]
    e = settings.enrollment
    problems.append(unreadable("enrollment.broker_password_base", e.broker_password_base))
    if e.broker_auth and e.broker_dir and not os.access(e.broker_dir, os.W_OK | os.X_OK):
        # The registry rewrites devices.passwd and devices.acl there.
        problems.append(f"enrollment.broker_dir: folder not writable: {e.broker_dir}")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def with_overrides(
    settings: RegistrySettings, overrides: dict[str, dict[str, Any]], source: str
) -> RegistrySettings:
    """``settings`` with the non-None values of ``{section: {key: value}}`` (the
    command line) put over it, validated again; errors name ``source``."""
    data = settings.model_dump()
    changed = False
    for section, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                data[section][key] = value
                changed = True
    if not changed:
        return settings
    try:
        return RegistrySettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, source)) from None


def broker_address(settings: RegistrySettings) -> BrokerAddress:
    """The broker address with the registry's credentials (the password read now)."""
    b = settings.broker
    password = read_secret("broker.password", b.password_file, b.password_env, strip_env=False)
    return BrokerAddress(
        b.host,
        b.port,
        username=b.username,
        password=password,
        ca_file=b.ca_file,
        cert_file=b.cert_file,
        key_file=b.key_file,
    )
