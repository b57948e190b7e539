"""One typed, frozen settings object, built once at start-up from YAML plus the environment.

Order of precedence: built-in defaults < YAML file < environment. Secrets come only from the
environment (PRODUCT.md §1); any other key can be overridden with `GATEWAY__SECTION__KEY=value`
(value parsed as YAML, e.g. `GATEWAY__UPSTREAM__READ_TIMEOUT=10`). Every error names the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from metering.errors import ConfigurationError
from metering.meters import check_path

SECRET_ENV = {
    "REDIS_URL": ("redis", "url"),
    "DATABASE_URL": ("database", "url"),
    "GATEWAY_JWT_HS256_SECRET": ("auth", "hs256_secret"),
    "STRIPE_API_KEY": ("billing", "stripe_api_key"),
    "STRIPE_WEBHOOK_SECRET": ("billing", "stripe_webhook_secret"),
    "GATEWAY_ADMIN_TOKENS": ("admin", "tokens"),
}
OVERRIDE_PREFIX = "GATEWAY__"
ALLOWED_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES384", "ES512", "EdDSA"}
)
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]+$")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


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
    workers: int = 1
    shutdown_grace_seconds: float = 30.0
    access_log: bool = True
    problem_type_base: str = "https://docs.cosmosbuilder.io/gateway/problems/"


@dataclass(frozen=True)
class BillingSettings:
    period: str = "calendar_month"
    bucket_seconds: int = 300
    grace_seconds: int = 10
    stripe: Mapping[str, Any] = field(default_factory=dict)
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret: str | None = field(default=None, repr=False)


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
    billing: BillingSettings = field(default_factory=BillingSettings)
    # Validated in depth by the metering/quota layer; kept as plain data here.
    meters: Mapping[str, Any] | None = None
    plans: Mapping[str, Any] = field(default_factory=dict)
    default_plan: str | None = "starter"
    alerts: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file the settings came from, for messages


# --------------------------------------------------------------------------- loading


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply the environment, validate; raise ConfigError."""
    env = os.environ if env is None else env
    path = path or env.get("GATEWAY_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw = loaded
    _apply_env(raw, env)
    settings = parse_settings(raw)
    return _replace_source(settings, str(path) if path else None)


def _replace_source(settings: Settings, source: str | None) -> Settings:
    from dataclasses import replace

    return replace(settings, source=source)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, (section, key) in SECRET_ENV.items():
        value = env.get(name)
        if value:
            _section(raw, section)[key] = value
    for name, value in env.items():
        if not name.startswith(OVERRIDE_PREFIX):
            continue
        parts = [p.lower() for p in name[len(OVERRIDE_PREFIX):].split("__") if p]
        if len(parts) < 2:
            raise ConfigError(f"{name}: expected {OVERRIDE_PREFIX}SECTION__KEY")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not a valid value") from exc
        target = raw
        for i, part in enumerate(parts[:-1]):
            target = _section(target, part, ".".join(parts[: i + 1]))
        target[parts[-1]] = parsed


def _section(raw: dict[str, Any], key: str, where: str | None = None) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        value = raw[key] = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or key}: expected a mapping")
    return value


# --------------------------------------------------------------------------- validation


class _Section:
    """Reads one mapping, tracking the dotted key path for error messages."""

    def __init__(self, raw: Any, path: str, allowed: set[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_kind(raw)}")
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
        self.raw = raw
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def string(self, name: str, default: str | None, *, nullable: bool = False) -> str | None:
        value = self.raw.get(name, default)
        if value is None:
            if nullable or (default is None and name not in self.raw):
                return None
            raise ConfigError(f"{self.key(name)}: must not be null")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)}: expected a non-empty string, got {_kind(value)}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0, maximum: float | None = None,
               exclusive_min: bool = False) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{self.key(name)}: expected a number, got {_kind(value)}")
        if value < minimum or (exclusive_min and value == minimum):
            op = ">" if exclusive_min else ">="
            raise ConfigError(f"{self.key(name)}: must be {op} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.key(name)}: must be <= {maximum}, got {value}")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {_kind(value)}")
        if value < minimum:
            raise ConfigError(f"{self.key(name)}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.key(name)}: must be <= {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_kind(value)}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw.get(name, default)
        if value not in choices:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw.get(name, list(default))
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{self.key(name)}: expected a list of strings, got {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.key(name)}[{i}]: expected a non-empty string, got {_kind(item)}")
        return tuple(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: expected a mapping, got {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def parse_host_port(value: Any, key: str) -> HostPort:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected \"host:port\", got {_kind(value)}")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    # Port 0 asks the kernel for a free port (tests, ad-hoc runs).
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected \"host:port\" with a port 0-65535, got {value!r}")
    return HostPort(host, int(port))


def _url(section: _Section, name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
    value = section.string(name, default, nullable=True)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ConfigError(
            f"{section.key(name)}: expected a URL with scheme {' or '.join(schemes)}, got {_mask_url(value)!r}"
        )
    return value


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    top = _Section(dict(raw), "", {
        "listen", "upstream", "websocket", "redis", "database", "auth", "admin", "server", "meters", "plans",
        "default_plan", "billing", "alerts", "metrics",
    })
    settings = Settings(
        listen=_listen(_Section(top.raw.get("listen"), "listen", {
            "proxy", "admin", "trusted_proxies", "header_timeout", "body_timeout", "max_connections",
            "max_header_size"})),
        upstream=_upstream(_Section(top.raw.get("upstream"), "upstream", {
            "url", "connect_timeout", "read_timeout", "max_connections", "pool_timeout"})),
        websocket=_websocket(_Section(top.raw.get("websocket"), "websocket", {"max_connections", "idle_timeout"})),
        redis=_redis(_Section(top.raw.get("redis"), "redis", {"url", "on_error", "spool_dir", "spool_max_bytes"})),
        database=DatabaseSettings(url=_database_url(_Section(top.raw.get("database"), "database", {"url"}))),
        auth=_auth(_Section(top.raw.get("auth"), "auth", {
            "issuer", "audience", "algorithms", "jwks_url", "public_key_file", "hs256_secret",
            "tenant_claim", "plan_claim", "leeway_seconds", "public_paths", "jwks_cache_seconds",
            "jwks_min_refetch_seconds", "allow_insecure_jwks_url"})),
        admin=_admin(_Section(top.raw.get("admin"), "admin", {"scope", "tokens"})),
        server=_server(_Section(top.raw.get("server"), "server", {
            "workers", "shutdown_grace_seconds", "access_log", "problem_type_base"})),
        billing=_billing(_Section(top.raw.get("billing"), "billing", {
            "period", "bucket_seconds", "grace_seconds", "stripe", "stripe_api_key",
            "stripe_webhook_secret"})),
        meters=top.mapping("meters") if top.has("meters") else None,
        plans=top.mapping("plans"),
        default_plan=top.string("default_plan", "starter", nullable=True),
        alerts=top.mapping("alerts"),
        metrics=top.mapping("metrics"),
    )
    from gateway.config.policy import build_policy  # policy modules import this one

    build_policy(settings)  # validates meters, plans, alerts and metrics now, naming the bad key
    return settings


def _listen(s: _Section) -> ListenSettings:
    proxies = []
    for i, item in enumerate(s.string_list("trusted_proxies", ())):
        try:
            proxies.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(f"listen.trusted_proxies[{i}]: not an IP address or CIDR: {item!r}") from exc
    return ListenSettings(
        proxy=parse_host_port(s.raw.get("proxy", "0.0.0.0:8080"), "listen.proxy"),
        admin=parse_host_port(s.raw.get("admin", "127.0.0.1:8081"), "listen.admin"),
        trusted_proxies=tuple(proxies),
        header_timeout=s.number("header_timeout", 15.0, minimum=0, exclusive_min=True),
        body_timeout=s.number("body_timeout", 30.0, minimum=0, exclusive_min=True),
        max_connections=s.integer("max_connections", 10_000, minimum=1),
        max_header_size=s.integer("max_header_size", 8190, minimum=1024, maximum=65536),
    )


def _upstream(s: _Section) -> UpstreamSettings:
    return UpstreamSettings(
        url=_url(s, "url", "http://127.0.0.1:9000", ("http",)),
        connect_timeout=s.number("connect_timeout", 5.0, exclusive_min=True),
        read_timeout=s.number("read_timeout", 60.0, exclusive_min=True),
        max_connections=s.integer("max_connections", 512, minimum=1),
        pool_timeout=s.number("pool_timeout", 5.0, exclusive_min=True),
    )


def _websocket(s: _Section) -> WebSocketSettings:
    return WebSocketSettings(
        max_connections=s.integer("max_connections", 1000, minimum=1),
        idle_timeout=s.number("idle_timeout", 300.0, exclusive_min=True),
    )


def _redis(s: _Section) -> RedisSettings:
    return RedisSettings(
        url=_url(s, "url", None, ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")),
        on_error=s.choice("on_error", "fail_open", ("fail_open", "fail_closed")),
        spool_dir=s.string("spool_dir", RedisSettings.spool_dir) or RedisSettings.spool_dir,
        # At least a megabyte: a spool that cannot hold one burst would refuse traffic at once.
        spool_max_bytes=s.integer("spool_max_bytes", RedisSettings.spool_max_bytes, minimum=1 << 20),
    )


def _database_url(s: _Section) -> str:
    url = s.string("url", DatabaseSettings.url)
    assert url is not None
    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(
            "database.url: expected sqlite+aiosqlite://… or postgresql+asyncpg://…, "
            f"got scheme {scheme or '(none)'!r}"
        )
    return url


def _auth(s: _Section) -> AuthSettings:
    algorithms = s.string_list("algorithms", AuthSettings.algorithms)
    if not algorithms:
        raise ConfigError("auth.algorithms: must name at least one algorithm")
    for i, alg in enumerate(algorithms):
        if alg.lower() == "none":
            raise ConfigError(f"auth.algorithms[{i}]: \"none\" is never accepted")
        if alg not in ALLOWED_ALGORITHMS:
            raise ConfigError(
                f"auth.algorithms[{i}]: unknown algorithm {alg!r} (known: {', '.join(sorted(ALLOWED_ALGORITHMS))})"
            )
    jwks_url = _url(s, "jwks_url", None, ("http", "https"))
    allow_insecure = s.boolean("allow_insecure_jwks_url", False)
    if jwks_url is not None and urlsplit(jwks_url).scheme == "http" and not allow_insecure \
            and not _is_loopback(urlsplit(jwks_url).hostname):
        # Keys fetched in clear can be swapped on the way: every token would then verify.
        raise ConfigError("auth.jwks_url: must be https:// (http:// only for a loopback host, or with "
                          "auth.allow_insecure_jwks_url: true)")
    key_file = s.string("public_key_file", None, nullable=True)
    if key_file is not None and not Path(key_file).is_file():
        raise ConfigError(f"auth.public_key_file: no such file: {key_file}")
    secret = s.string("hs256_secret", None, nullable=True)
    has_hmac = any(a.startswith("HS") for a in algorithms)
    has_keys = any(not a.startswith("HS") for a in algorithms)
    if has_hmac and secret is None and not (has_keys and (jwks_url or key_file)):
        raise ConfigError(
            "auth.algorithms: HS* algorithms are allowed but no secret is set (GATEWAY_JWT_HS256_SECRET)"
        )
    if has_keys and not (jwks_url or key_file) and secret is None:
        raise ConfigError(
            "auth: no key source: set auth.jwks_url, auth.public_key_file or GATEWAY_JWT_HS256_SECRET"
        )
    if secret is not None and len(secret) < 32:
        raise ConfigError("GATEWAY_JWT_HS256_SECRET: must be at least 32 characters (RFC 7518 §3.2)")
    claim = s.string("tenant_claim", "org_id")
    assert claim is not None
    return AuthSettings(
        issuer=s.string("issuer", None, nullable=True),
        audience=s.string("audience", None, nullable=True),
        algorithms=algorithms,
        jwks_url=jwks_url,
        public_key_file=key_file,
        hs256_secret=secret,
        tenant_claim=claim,
        plan_claim=s.string("plan_claim", None, nullable=True),
        leeway_seconds=s.number("leeway_seconds", 30.0, maximum=3600),
        public_paths=tuple(_public_path(p, i) for i, p in enumerate(s.string_list("public_paths", ()))),
        jwks_cache_seconds=s.number("jwks_cache_seconds", 300.0, exclusive_min=True),
        jwks_min_refetch_seconds=s.number("jwks_min_refetch_seconds", 30.0),
        allow_insecure_jwks_url=allow_insecure,
    )


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_path(pattern: str, index: int) -> str:
    if not pattern.startswith("/"):
        raise ConfigError(f"auth.public_paths[{index}]: must start with '/', got {pattern!r}")
    try:  # the glob rules of meters and guards apply here too
        return check_path(pattern, f"auth.public_paths[{index}]")
    except ConfigurationError as exc:
        raise ConfigError(str(exc)) from None


def _admin(s: _Section) -> AdminSettings:
    raw = s.raw.get("tokens")
    tokens: list[tuple[str, str]] = []
    if raw:
        if not isinstance(raw, str):
            raise ConfigError("admin.tokens: expected \"name:token,name:token\" (GATEWAY_ADMIN_TOKENS)")
        for i, item in enumerate(x.strip() for x in raw.split(",") if x.strip()):
            name, sep, token = item.partition(":")
            # A presented credential must be visible ASCII (gateway.auth.tokens.bearer_token): any other
            # character would make a token that can never match.
            if not sep or not TOKEN_NAME_RE.match(name) or len(token) < 16 or not _VISIBLE_ASCII.match(token):
                raise ConfigError(
                    f"GATEWAY_ADMIN_TOKENS[{i}]: expected name:token with a name of [A-Za-z0-9._-] "
                    "and a token of at least 16 visible ASCII characters (no spaces)"
                )
            tokens.append((name, token))
    scope = s.string("scope", "gateway:admin")
    assert scope is not None
    return AdminSettings(scope=scope, tokens=tuple(tokens))


def _server(s: _Section) -> ServerSettings:
    base = s.string("problem_type_base", ServerSettings.problem_type_base)
    assert base is not None
    return ServerSettings(
        workers=s.integer("workers", 1, minimum=1, maximum=256),
        shutdown_grace_seconds=s.number("shutdown_grace_seconds", 30.0),
        access_log=s.boolean("access_log", True),
        problem_type_base=base if base.endswith("/") else base + "/",
    )


def _billing(s: _Section) -> BillingSettings:
    bucket_seconds = s.integer("bucket_seconds", 300, minimum=1, maximum=86_400)
    if 86_400 % bucket_seconds:
        # Buckets start at multiples of their length: only a divisor of a day keeps every bucket inside
        # one day, and so inside one billing period (periods start at midnight UTC).
        raise ConfigError(f"{s.key('bucket_seconds')}: must divide 86400 (a bucket never crosses a day, so "
                          f"never a period boundary), e.g. 60, 300, 900, 3600; got {bucket_seconds}")
    return BillingSettings(
        period=s.choice("period", "calendar_month", ("calendar_month",)),
        bucket_seconds=bucket_seconds,
        grace_seconds=s.integer("grace_seconds", 10, minimum=0, maximum=3600),
        stripe=s.mapping("stripe"),
        stripe_api_key=s.string("stripe_api_key", None, nullable=True),
        stripe_webhook_secret=s.string("stripe_webhook_secret", None, nullable=True),
    )


# --------------------------------------------------------------------------- display

MASK = "***"


def _mask_url(url: str) -> str:
    """The URL with its password and every query value masked (`?password=…` is as secret as userinfo).

    Edited as text, not rebuilt with geturl(), which would drop the empty authority of `sqlite:///…`."""
    parts = urlsplit(url)
    if parts.password is not None:
        url = url.replace(f":{parts.password}@", f":{MASK}@", 1)
    base, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = query.partition("#")
    masked = "&".join(f"{item.partition('=')[0]}={MASK}" if "=" in item else item for item in query.split("&"))
    return f"{base}?{masked}{hash_}{fragment}"


def _mask_webhook_url(url: str) -> str:
    """Only scheme and host: webhook URLs often carry their credential in the path (Slack, Teams)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/{MASK}" if parts.path not in ("", "/") or parts.query else url


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked (for `check-config`)."""
    from dataclasses import asdict

    data = asdict(settings)
    data.pop("source", None)
    data["listen"]["proxy"] = str(settings.listen.proxy)
    data["listen"]["admin"] = str(settings.listen.admin)
    data["listen"]["trusted_proxies"] = [str(n) for n in settings.listen.trusted_proxies]
    for section, key in SECRET_ENV.values():
        value = data[section].get(key)
        if not value:
            continue
        if key == "url":
            data[section][key] = _mask_url(value)
        elif key == "tokens":
            data[section][key] = [f"{name}:{MASK}" for name, _ in settings.admin.tokens]
        else:
            data[section][key] = MASK
    for key in ("algorithms", "public_paths"):
        data["auth"][key] = list(data["auth"][key])
    if data["auth"].get("jwks_url"):
        data["auth"]["jwks_url"] = _mask_url(data["auth"]["jwks_url"])
    alerts = dict(data.get("alerts") or {})
    if alerts.get("webhook_secret"):
        alerts["webhook_secret"] = MASK
    if isinstance(alerts.get("webhook_url"), str):
        alerts["webhook_url"] = _mask_webhook_url(alerts["webhook_url"])
    data["alerts"] = alerts
    return data
