"""YAML plus the environment into Settings, every value validated; a problem raises ConfigError naming the key.

Order of precedence: built-in defaults < YAML file < environment. Secrets come only from the
environment (PRODUCT.md §1); any other key can be overridden with `GATEWAY__SECTION__KEY=value`
(value parsed as YAML, e.g. `GATEWAY__UPSTREAM__READ_TIMEOUT=10`). The policy sections (`meters:`,
`plans:`, `alerts:`, `metrics:`, `billing.stripe`) are built here too, once (`gateway.config.policy`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.config.effective import mask_url
from gateway.config.policy import build_policy
from gateway.config.reader import Section
from gateway.config.settings import (
    MAX_WORKERS,
    SECRET_ENV,
    AdminSettings,
    AuthSettings,
    BillingSettings,
    DatabaseSettings,
    HostPort,
    ListenSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
    WebSocketSettings,
)
from metering.errors import ConfigError, kind_of
from metering.meters import check_path

OVERRIDE_PREFIX = "GATEWAY__"
ALLOWED_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES384", "ES512", "EdDSA"}
)
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]+$")
# While Stripe rolls an endpoint's secret it signs with two: the new one, and the old one until it expires.
MAX_WEBHOOK_SECRETS = 2


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
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(None, f"{path}: not valid YAML{where}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(None, f"{path}: the top level must be a mapping of keys")
        raw = loaded
    _apply_env(raw, env)
    return replace(parse_settings(raw), source=str(path) if path else None)


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
            raise ConfigError(name, f"expected {OVERRIDE_PREFIX}SECTION__KEY")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError as exc:
            raise ConfigError(name, "not a valid value") from exc
        target = raw
        for i, part in enumerate(parts[:-1]):
            target = _section(target, part, ".".join(parts[: i + 1]))
        target[parts[-1]] = parsed


def _section(raw: dict[str, Any], key: str, where: str | None = None) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        value = raw[key] = {}
    if not isinstance(value, dict):
        raise ConfigError(where or key, "expected a mapping")
    return value


# --------------------------------------------------------------------------- validation


def parse_host_port(value: Any, key: str) -> HostPort:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected \"host:port\", got {kind_of(value)}")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    # Port 0 asks the kernel for a free port (tests, ad-hoc runs).
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"expected \"host:port\" with a port 0-65535, got {value!r}")
    return HostPort(host, int(port))


def _url(section: Section, name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
    value = section.string(name, default, nullable=True)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ConfigError(
            section.key(name), f"expected a URL with scheme {' or '.join(schemes)}, got {mask_url(value)!r}"
        )
    return value


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Settings from the raw mapping (YAML with the environment applied); raise ConfigError naming the key."""
    top = Section(dict(raw), "", {
        "listen", "upstream", "websocket", "redis", "database", "auth", "admin", "server", "meters", "plans",
        "default_plan", "billing", "alerts", "metrics",
    })
    listen = _listen(Section(top.raw.get("listen"), "listen", {
        "proxy", "admin", "trusted_proxies", "header_timeout", "body_timeout", "max_connections",
        "max_header_size"}))
    upstream = _upstream(Section(top.raw.get("upstream"), "upstream", {
        "url", "connect_timeout", "read_timeout", "max_connections", "pool_timeout"}))
    websocket = _websocket(Section(top.raw.get("websocket"), "websocket", {"max_connections", "idle_timeout"}))
    redis = _redis(Section(top.raw.get("redis"), "redis", {"url", "on_error", "spool_dir", "spool_max_bytes"}))
    database = DatabaseSettings(url=_database_url(Section(top.raw.get("database"), "database", {"url"})))
    auth = _auth(Section(top.raw.get("auth"), "auth", {
        "issuer", "audience", "algorithms", "jwks_url", "public_key_file", "hs256_secret",
        "tenant_claim", "plan_claim", "leeway_seconds", "public_paths", "jwks_cache_seconds",
        "jwks_min_refetch_seconds", "allow_insecure_jwks_url"}))
    admin = _admin(Section(top.raw.get("admin"), "admin", {"scope", "tokens"}))
    server = _server(Section(top.raw.get("server"), "server", {
        "workers", "shutdown_grace_seconds", "access_log", "problem_type_base"}))
    billing_section = Section(top.raw.get("billing"), "billing", {
        "period", "bucket_seconds", "grace_seconds", "stripe", "stripe_api_key", "stripe_webhook_secret"})
    stripe = dict(billing_section.mapping("stripe"))
    billing = replace(_billing(billing_section),
                      portal_return_url=_portal_return_url(stripe.pop("portal_return_url", None)))
    meters = top.mapping("meters") if top.has("meters") else None
    plans = top.mapping("plans")
    default_plan = top.string("default_plan", "starter", nullable=True)
    # Built once, here: every consumer takes the typed policy from Settings and none parses these again.
    policy = build_policy(meters=meters, plans=plans, alerts=top.mapping("alerts"), metrics=top.mapping("metrics"),
                          stripe=stripe, stripe_api_key=billing.stripe_api_key, default_plan=default_plan)
    return Settings(listen=listen, upstream=upstream, websocket=websocket, redis=redis, database=database,
                    auth=auth, admin=admin, server=server, billing=billing, default_plan=default_plan,
                    policy=policy)


def _listen(s: Section) -> ListenSettings:
    proxies = []
    for i, item in enumerate(s.string_list("trusted_proxies", ())):
        try:
            proxies.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(f"listen.trusted_proxies[{i}]", f"not an IP address or CIDR: {item!r}") from exc
    return ListenSettings(
        proxy=parse_host_port(s.raw.get("proxy", "0.0.0.0:8080"), "listen.proxy"),
        admin=parse_host_port(s.raw.get("admin", "127.0.0.1:8081"), "listen.admin"),
        trusted_proxies=tuple(proxies),
        header_timeout=s.number("header_timeout", 15.0, minimum=0, exclusive_min=True),
        body_timeout=s.number("body_timeout", 30.0, minimum=0, exclusive_min=True),
        max_connections=s.integer("max_connections", 10_000, minimum=1),
        max_header_size=s.integer("max_header_size", 8190, minimum=1024, maximum=65536),
    )


def _upstream(s: Section) -> UpstreamSettings:
    return UpstreamSettings(
        url=_url(s, "url", "http://127.0.0.1:9000", ("http",)),
        connect_timeout=s.number("connect_timeout", 5.0, exclusive_min=True),
        read_timeout=s.number("read_timeout", 60.0, exclusive_min=True),
        max_connections=s.integer("max_connections", 512, minimum=1),
        pool_timeout=s.number("pool_timeout", 5.0, exclusive_min=True),
    )


def _websocket(s: Section) -> WebSocketSettings:
    return WebSocketSettings(
        max_connections=s.integer("max_connections", 1000, minimum=1),
        idle_timeout=s.number("idle_timeout", 300.0, exclusive_min=True),
    )


def _redis(s: Section) -> RedisSettings:
    return RedisSettings(
        url=_url(s, "url", None, ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")),
        on_error=s.choice("on_error", "fail_open", ("fail_open", "fail_closed")),
        spool_dir=s.string("spool_dir", RedisSettings.spool_dir) or RedisSettings.spool_dir,
        # At least a megabyte: a spool that cannot hold one burst would refuse traffic at once.
        spool_max_bytes=s.integer("spool_max_bytes", RedisSettings.spool_max_bytes, minimum=1 << 20),
    )


def _database_url(s: Section) -> str:
    url = s.string("url", DatabaseSettings.url)
    assert url is not None
    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(
            "database.url", "expected sqlite+aiosqlite://… or postgresql+asyncpg://…, "
            f"got scheme {scheme or '(none)'!r}"
        )
    return url


def _auth(s: Section) -> AuthSettings:
    algorithms = s.string_list("algorithms", AuthSettings.algorithms)
    if not algorithms:
        raise ConfigError("auth.algorithms", "must name at least one algorithm")
    for i, alg in enumerate(algorithms):
        if alg.lower() == "none":
            raise ConfigError(f"auth.algorithms[{i}]", "\"none\" is never accepted")
        if alg not in ALLOWED_ALGORITHMS:
            raise ConfigError(
                f"auth.algorithms[{i}]", f"unknown algorithm {alg!r} (known: {', '.join(sorted(ALLOWED_ALGORITHMS))})"
            )
    jwks_url = _url(s, "jwks_url", None, ("http", "https"))
    allow_insecure = s.boolean("allow_insecure_jwks_url", False)
    if jwks_url is not None and urlsplit(jwks_url).scheme == "http" and not allow_insecure \
            and not _is_loopback(urlsplit(jwks_url).hostname):
        # Keys fetched in clear can be swapped on the way: every token would then verify.
        raise ConfigError("auth.jwks_url", "must be https:// (http:// only for a loopback host, or with "
                          "auth.allow_insecure_jwks_url: true)")
    key_file = s.string("public_key_file", None, nullable=True)
    if key_file is not None and not Path(key_file).is_file():
        raise ConfigError("auth.public_key_file", f"no such file: {key_file}")
    secret = s.string("hs256_secret", None, nullable=True)
    has_hmac = any(a.startswith("HS") for a in algorithms)
    has_keys = any(not a.startswith("HS") for a in algorithms)
    if has_hmac and secret is None and not (has_keys and (jwks_url or key_file)):
        raise ConfigError(
            "auth.algorithms", "HS* algorithms are allowed but no secret is set (GATEWAY_JWT_HS256_SECRET)"
        )
    if has_keys and not (jwks_url or key_file) and secret is None:
        raise ConfigError(
            "auth", "no key source: set auth.jwks_url, auth.public_key_file or GATEWAY_JWT_HS256_SECRET"
        )
    if secret is not None and len(secret) < 32:
        raise ConfigError("GATEWAY_JWT_HS256_SECRET", "must be at least 32 characters (RFC 7518 §3.2)")
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
        raise ConfigError(f"auth.public_paths[{index}]", f"must start with '/', got {pattern!r}")
    # The glob rules of meters and guards apply here too; their error names this key already.
    return check_path(pattern, f"auth.public_paths[{index}]")


def _admin(s: Section) -> AdminSettings:
    raw = s.raw.get("tokens")
    tokens: list[tuple[str, str]] = []
    if raw:
        if not isinstance(raw, str):
            raise ConfigError("admin.tokens", "expected \"name:token,name:token\" (GATEWAY_ADMIN_TOKENS)")
        for i, item in enumerate(x.strip() for x in raw.split(",") if x.strip()):
            name, sep, token = item.partition(":")
            # A presented credential must be visible ASCII (gateway.auth.tokens.bearer_token): any other
            # character would make a token that can never match.
            if not sep or not TOKEN_NAME_RE.match(name) or len(token) < 16 or not _VISIBLE_ASCII.match(token):
                raise ConfigError(
                    f"GATEWAY_ADMIN_TOKENS[{i}]", "expected name:token with a name of [A-Za-z0-9._-] "
                    "and a token of at least 16 visible ASCII characters (no spaces)"
                )
            tokens.append((name, token))
    scope = s.string("scope", "gateway:admin")
    assert scope is not None
    return AdminSettings(scope=scope, tokens=tuple(tokens))


def _server(s: Section) -> ServerSettings:
    base = s.string("problem_type_base", ServerSettings.problem_type_base)
    assert base is not None
    return ServerSettings(
        workers=_workers(s),
        shutdown_grace_seconds=s.number("shutdown_grace_seconds", 30.0),
        access_log=s.boolean("access_log", True),
        problem_type_base=base if base.endswith("/") else base + "/",
    )


def _workers(s: Section) -> int | Literal["auto"]:
    """A count of worker processes, or `auto`: one per CPU core (resolved when serving starts)."""
    value = s.raw.get("workers", 1)
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(s.key("workers"), f"expected an integer or auto, got {kind_of(value)}")
    return s.integer("workers", 1, minimum=1, maximum=MAX_WORKERS)


def _portal_return_url(value: Any) -> str | None:
    """`billing.stripe.portal_return_url`: null, or an absolute http(s) URL (Stripe sends browsers there)."""
    key = "billing.stripe.portal_return_url"
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an absolute http(s) URL or null, got {kind_of(value)}")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - a port out of range raises here
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host or len(value) > 2000 \
            or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError(key, "expected an absolute http(s) URL (https://app.example.com/billing), "
                               f"got {value[:200]!r}")
    return value


def _billing(s: Section) -> BillingSettings:
    bucket_seconds = s.integer("bucket_seconds", 300, minimum=1, maximum=86_400)
    if 86_400 % bucket_seconds:
        # Buckets start at multiples of their length: only a divisor of a day keeps every bucket inside
        # one day, and so inside one billing period (periods start at midnight UTC).
        raise ConfigError(s.key('bucket_seconds'), "must divide 86400 (a bucket never crosses a day, so "
                          f"never a period boundary), e.g. 60, 300, 900, 3600; got {bucket_seconds}")
    return BillingSettings(
        period=s.choice("period", "calendar_month", ("calendar_month",)),
        bucket_seconds=bucket_seconds,
        grace_seconds=s.integer("grace_seconds", 10, minimum=0, maximum=3600),
        stripe_api_key=s.string("stripe_api_key", None, nullable=True),
        stripe_webhook_secrets=_webhook_secrets(s),
    )


def _webhook_secrets(s: Section) -> tuple[str, ...]:
    """`stripe_webhook_secret`: "whsec_new,whsec_old" during a roll of the endpoint's secret, or a YAML list."""
    raw = s.raw.get("stripe_webhook_secret")
    key = s.key("stripe_webhook_secret")
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ConfigError(key, "expected a secret, or two separated by a comma (STRIPE_WEBHOOK_SECRET)")
    if not 1 <= len(items) <= MAX_WEBHOOK_SECRETS or not all(_VISIBLE_ASCII.match(item) for item in items):
        # Say what is wrong without echoing any part of a secret.
        raise ConfigError(key, f"expected 1 to {MAX_WEBHOOK_SECRETS} secrets separated by a comma, each of visible "
                          f"ASCII characters (no spaces, none empty); got {len(items)} item(s)")
    return tuple(dict.fromkeys(items))  # the same secret twice is one

