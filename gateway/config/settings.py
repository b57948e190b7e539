"""The typed, frozen settings: one object built once at start-up and passed in (PRODUCT.md §2).

`gateway.config.parse` builds it from YAML plus the environment and validates every value, the
metering policy (meters, plans, alerts, metrics options, Stripe settings) included; `gateway.config.effective`
shows it with secrets masked (`check-config`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from billing_sync.settings import StripeSettings
from metering.meters import DEFAULT_METERS, Meter, MeterMatcher
from quota.alerts import AlertSettings
from quota.plans import DEFAULT_CATALOG, Plan

# Secrets come only from the environment (PRODUCT.md §1): variable -> (section, config key).
SECRET_ENV = {
    "REDIS_URL": ("redis", "url"),
    "DATABASE_URL": ("database", "url"),
    "GATEWAY_JWT_HS256_SECRET": ("auth", "hs256_secret"),
    "STRIPE_API_KEY": ("billing", "stripe_api_key"),
    "STRIPE_WEBHOOK_SECRET": ("billing", "stripe_webhook_secret"),
    "GATEWAY_ADMIN_TOKENS": ("admin", "tokens"),
}


# The most worker processes `server.workers` (or `auto`) may ask for.
MAX_WORKERS = 256


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenSettings:
    proxy: HostPort = HostPort("0.0.0.0", 8080)
    admin: HostPort = HostPort("127.0.0.1", 8081)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Slowloris guard: a connection must complete its request head within this time.
    header_timeout: float = 15.0
    # Slow-body guard: the longest gap allowed between two pieces of a request body.
    body_timeout: float = 30.0
    max_connections: int = 10_000
    max_header_size: int = 8190


@dataclass(frozen=True)
class UpstreamSettings:
    url: str | None = "http://127.0.0.1:9000"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 512
    # How long a request may wait for a free upstream connection before 503 upstream-busy.
    pool_timeout: float = 5.0


@dataclass(frozen=True)
class WebSocketSettings:
    max_connections: int = 1000  # relayed WebSockets per worker; beyond it an upgrade gets 503
    idle_timeout: float = 300.0  # a relay with no message either way for this long is closed


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None  # None: `make run` starts a private redis-server
    on_error: str = "fail_open"
    spool_dir: str = "./var/spool"  # fail_open: usage waits here (one file per worker) while Redis is down
    spool_max_bytes: int = 1 << 30  # all spool files of this spool_dir together; when full, 503


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite+aiosqlite:///./var/gateway.db"


@dataclass(frozen=True)
class AuthSettings:
    issuer: str | None = None
    audience: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_url: str | None = None
    public_key_file: str | None = None
    hs256_secret: str | None = field(default=None, repr=False)
    tenant_claim: str = "org_id"
    plan_claim: str | None = None
    leeway_seconds: float = 30.0
    public_paths: tuple[str, ...] = ()
    jwks_cache_seconds: float = 300.0
    jwks_min_refetch_seconds: float = 30.0
    # An http:// jwks_url to a host that is not loopback is refused unless this is set.
    allow_insecure_jwks_url: bool = False


@dataclass(frozen=True)
class AdminSettings:
    scope: str = "gateway:admin"
    tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ServerSettings:
    # Worker processes; "auto": one per CPU core the process may use (gateway.server.worker_count).
    workers: int | Literal["auto"] = 1
    shutdown_grace_seconds: float = 30.0
    access_log: bool = True
    problem_type_base: str = "https://docs.cosmosbuilder.io/gateway/problems/"


@dataclass(frozen=True)
class BillingSettings:
    period: str = "calendar_month"
    bucket_seconds: int = 300
    grace_seconds: int = 10
    # `billing.stripe` is typed in Settings.policy.stripe (it is checked against the plans).
    stripe_api_key: str | None = field(default=None, repr=False)
    # `billing.stripe_webhook_secret` (STRIPE_WEBHOOK_SECRET): one secret, or two separated by a comma while
    # Stripe rolls the endpoint's secret (it signs with both until the old one expires); either verifies.
    stripe_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    # `billing.stripe.portal_return_url`: where Stripe's billing portal sends the customer back (None: the
    # portal configuration's default). Kept here, not in StripeSettings: only the gateway opens the portal.
    portal_return_url: str | None = None


@dataclass(frozen=True)
class MetricsOptions:
    tenant_usage: bool = True
    max_tenants: int = 10_000


@dataclass(frozen=True)
class Policy:
    """What is metered and limited: `meters:`, `plans:`, `alerts:`, `metrics:` and `billing.stripe`, typed."""

    meters: tuple[Meter, ...] = DEFAULT_METERS
    plans: Mapping[str, Plan] = field(default_factory=lambda: dict(DEFAULT_CATALOG))
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics: MetricsOptions = MetricsOptions()
    stripe: StripeSettings = field(default_factory=StripeSettings)
    # Derived from `meters`, so the two never disagree; it caches answers, hence not compared.
    matcher: MeterMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", MeterMatcher(self.meters))


@dataclass(frozen=True)
class Settings:
    listen: ListenSettings = ListenSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    websocket: WebSocketSettings = WebSocketSettings()
    redis: RedisSettings = RedisSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    admin: AdminSettings = AdminSettings()
    server: ServerSettings = ServerSettings()
    billing: BillingSettings = BillingSettings()
    default_plan: str | None = "starter"
    # Built once at load (gateway.config.parse); the default is the policy of a config without those keys.
    policy: Policy = field(default_factory=Policy)
    source: str | None = None  # the file the settings came from, for messages

