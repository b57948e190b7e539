"""Configuration: YAML plus environment, validated into Settings; `check-config` and `token`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jwt
import pytest
import yaml

from gateway.cli.main import main
from gateway.config import ConfigError, effective_config, load_settings, parse_settings

SECRET = "s" * 40
KEYED = {"auth": {"algorithms": ["HS256"], "hs256_secret": SECRET}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream: {url: 'http://127.0.0.1:9100'}\nauth: {algorithms: [HS256]}\n")
    settings = load_settings(path, env={
        "GATEWAY_JWT_HS256_SECRET": SECRET, "REDIS_URL": "redis://:pw@127.0.0.1:6390/1",
        "GATEWAY__UPSTREAM__READ_TIMEOUT": "7.5", "GATEWAY__LISTEN__PROXY": "127.0.0.1:18080",
    })
    assert settings.upstream.url == "http://127.0.0.1:9100"
    assert settings.upstream.read_timeout == 7.5
    assert settings.listen.proxy.port == 18080
    assert settings.redis.url == "redis://:pw@127.0.0.1:6390/1"
    assert settings.auth.hs256_secret == SECRET
    assert settings.default_plan == "starter"
    assert settings.database.url.startswith("sqlite+aiosqlite://")


@pytest.mark.parametrize(("raw", "message"), [
    ({"listen": {"proxy": "nonsense"}}, "listen.proxy"),
    ({"listen": {"proxy": "127.0.0.1:99999"}}, "listen.proxy"),
    ({"listen": {"trusted_proxies": ["not-an-ip"]}}, "listen.trusted_proxies[0]"),
    ({"upstream": {"url": "ftp://x"}}, "upstream.url"),
    ({"upstream": {"read_timeout": -1}}, "upstream.read_timeout"),
    ({"upstream": {"read_timeout": "soon"}}, "upstream.read_timeout"),
    ({"upstream": {"max_connections": 0}}, "upstream.max_connections"),
    ({"upstream": {"timeout": 1}}, "upstream.timeout: unknown key"),
    ({"redis": {"on_error": "explode"}}, "redis.on_error"),
    ({"redis": {"url": "http://x"}}, "redis.url"),
    ({"database": {"url": "mysql://x"}}, "database.url"),
    ({"auth": {"algorithms": ["none"], "hs256_secret": SECRET}}, "auth.algorithms[0]"),
    ({"auth": {"algorithms": ["HS999"], "hs256_secret": SECRET}}, "auth.algorithms[0]"),
    ({"auth": {"algorithms": ["HS256"]}}, "GATEWAY_JWT_HS256_SECRET"),
    ({"auth": {"algorithms": ["RS256"]}}, "auth: no key source"),
    ({"auth": {"algorithms": ["RS256"], "public_key_file": "/nonexistent.pem"}}, "auth.public_key_file"),
    ({"auth": {"algorithms": ["HS256"], "hs256_secret": "short"}}, "at least 32"),
    ({"auth": {"algorithms": ["HS256"], "hs256_secret": SECRET, "public_paths": ["health"]}},
     "auth.public_paths[0]"),
    ({"server": {"workers": 0}}, "server.workers"),
    ({"server": {"workers": 257}}, "server.workers: must be <= 256"),
    ({"server": {"workers": "many"}}, "server.workers: expected an integer or auto"),
    ({"server": {"workers": True}}, "server.workers: expected an integer or auto"),
    ({"server": {"workers": 1.5}}, "server.workers: expected an integer or auto"),
    ({"server": {"access_log": "yes"}}, "server.access_log"),
    ({"admin": {"tokens": "no-colon"}}, "GATEWAY_ADMIN_TOKENS[0]"),
    ({"plans": ["starter"]}, "plans"),
    ({"bogus": 1}, ".bogus: unknown key"),
    ({"billing": {"bucket_seconds": 7000}}, "billing.bucket_seconds: must divide 86400"),
    ({"billing": {"bucket_seconds": 86_401}}, "billing.bucket_seconds"),
])
def test_errors_name_the_key(raw: dict, message: str) -> None:
    merged = {**KEYED, **raw}
    with pytest.raises(ConfigError) as info:
        parse_settings(merged)
    assert message in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen:\n  proxy: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_settings(path, env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_check_config_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "auth: {algorithms: [HS256]}\n")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://gw:dbpassword@db:5432/gw")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKENS", "ops:0123456789abcdef0123")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_abcdef")
    monkeypatch.setenv("GATEWAY__ALERTS__WEBHOOK_SECRET", "whsec-alerts-secret")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in (SECRET, "dbpassword", "0123456789abcdef0123", "sk_test_abcdef", "whsec-alerts-secret"):
        assert secret not in out
    shown = yaml.safe_load(out)
    assert shown["auth"]["hs256_secret"] == "***"
    assert shown["database"]["url"] == "postgresql+asyncpg://gw:***@db:5432/gw"
    assert shown["admin"]["tokens"] == ["ops:***"]


def test_check_config_error_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_JWT_HS256_SECRET", raising=False)
    path = write(tmp_path, "upstream: {read_timeout: fast}\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "upstream.read_timeout: expected a number" in capsys.readouterr().err


def test_token_command_mints_a_valid_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "auth: {algorithms: [HS256], issuer: 'https://i/', audience: api}\n")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    assert main(["token", "--config", str(path), "--tenant", "acme", "--plan", "professional",
                 "--ttl", "60", "--scope", "gateway:admin"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="api", issuer="https://i/")
    assert claims["org_id"] == "acme" and claims["scope"] == "gateway:admin"
    assert claims["exp"] - claims["iat"] == 60


def test_token_command_refuses_without_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    key.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path = write(tmp_path, f"auth: {{algorithms: [RS256], public_key_file: '{key}'}}\n")
    monkeypatch.delenv("GATEWAY_JWT_HS256_SECRET", raising=False)
    assert main(["token", "--config", str(path), "--tenant", "acme"]) == 2
    assert "no HS256 secret" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 9: new keys and their checks


_AUTH = {"auth": {"algorithms": ["HS256"], "hs256_secret": "s" * 32}}


def test_hostile_input_keys_have_defaults_and_are_validated() -> None:
    settings = parse_settings(_AUTH)
    assert settings.listen.body_timeout == 30.0
    assert settings.upstream.pool_timeout == 5.0
    assert (settings.websocket.max_connections, settings.websocket.idle_timeout) == (1000, 300.0)
    assert settings.redis.spool_max_bytes == 1 << 30
    for raw, key in [({"listen": {"body_timeout": 0}}, "listen.body_timeout"),
                     ({"upstream": {"pool_timeout": "soon"}}, "upstream.pool_timeout"),
                     ({"websocket": {"max_connections": 0}}, "websocket.max_connections"),
                     ({"websocket": {"idle": 1}}, "websocket.idle"),
                     ({"redis": {"spool_max_bytes": 1000}}, "redis.spool_max_bytes")]:
        with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}:"):
            parse_settings({**_AUTH, **raw})


def test_plain_http_jwks_url_only_for_loopback_or_with_the_flag() -> None:
    base = {"algorithms": ["RS256"]}
    with pytest.raises(ConfigError, match=r"^auth\.jwks_url: must be https://"):
        parse_settings({"auth": {**base, "jwks_url": "http://idp.example.com/jwks.json"}})
    for url in ("http://127.0.0.1:9999/jwks.json", "http://localhost/jwks.json", "http://[::1]/jwks.json"):
        assert parse_settings({"auth": {**base, "jwks_url": url}}).auth.jwks_url == url
    allowed = parse_settings({"auth": {**base, "jwks_url": "http://idp.internal/jwks.json",
                                       "allow_insecure_jwks_url": True}})
    assert allowed.auth.jwks_url == "http://idp.internal/jwks.json"


def test_check_config_masks_query_secrets_and_webhook_urls() -> None:
    settings = parse_settings({
        **_AUTH,
        "database": {"url": "postgresql+asyncpg://db/gw?password=hunter2&sslmode=require"},
        "alerts": {"webhook_url": "https://hooks.example.com/services/T0/B0/s3cr3t", "webhook_secret": "k" * 32},
    })
    shown = repr(effective_config(settings))
    assert "hunter2" not in shown and "s3cr3t" not in shown and "k" * 32 not in shown
    assert effective_config(settings)["alerts"]["webhook_url"] == "https://hooks.example.com/***"
    assert effective_config(settings)["database"]["url"] == "postgresql+asyncpg://db/gw?password=***&sslmode=***"
    sqlite = parse_settings({**_AUTH, "database": {"url": "sqlite+aiosqlite:///./var/g.db?mode=rwc"}})
    assert effective_config(sqlite)["database"]["url"] == "sqlite+aiosqlite:///./var/g.db?mode=***"


def test_alert_webhook_url_needs_a_signing_secret() -> None:
    with pytest.raises(ConfigError, match=r"alerts\.webhook_url: needs a signing key"):
        parse_settings({**_AUTH, "alerts": {"webhook_url": "https://hooks.example.com/x"}})


@pytest.mark.parametrize("glob", ["/a/**b", "/a%zz", "/a b", "/a?x"])
def test_bad_public_path_glob_is_a_config_error(glob: str) -> None:
    with pytest.raises(ConfigError, match=r"^auth\.public_paths\[0\]: "):
        parse_settings({"auth": {**_AUTH["auth"], "public_paths": [glob]}})


@pytest.mark.parametrize("token", ["admin-token-with-\u00a0nbsp-inside", "admin-token-with space-in", "t\u00e9" * 8])
def test_admin_tokens_must_be_visible_ascii(token: str) -> None:
    with pytest.raises(ConfigError, match=r"^GATEWAY_ADMIN_TOKENS\[0\]: "):
        parse_settings({**_AUTH, "admin": {"tokens": f"ops:{token}"}})


# ---------------------------------------------------------------- issue 11: check-config shows the effective policy


def test_check_config_prints_the_default_meters_and_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "auth: {algorithms: [HS256]}\n")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_abcdef")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "sk_test_abcdef" not in out
    shown = yaml.safe_load(out)
    assert list(shown["meters"]) == ["api_calls", "chain_deployments", "bandwidth_bytes", "chains", "storage_gb"]
    assert shown["meters"]["chain_deployments"] == {
        "source": "request", "kind": "counter", "match": {"method": "POST", "path": "/api/chains/*/deployments"},
        "stripe_event": "chain_deployments", "bill_server_errors": False}
    assert shown["meters"]["chains"] == {"source": "reported", "kind": "gauge", "stripe_event": None,
                                         "bill_server_errors": False}
    assert list(shown["plans"]) == ["starter", "professional", "enterprise", "sovereign"]
    assert shown["plans"]["starter"] == {
        "rate": {"per_second": 10, "burst": 20},
        "quotas": {"chain_deployments": {"limit": 100, "on_exceed": "reject"},
                   "chains": {"limit": 1, "on_exceed": "reject", "guards": [{"method": "POST", "path": "/api/chains"}]},
                   "storage_gb": {"limit": 10, "on_exceed": "reject"}}}
    assert shown["plans"]["sovereign"]["quotas"]["storage_gb"]["limit"] is None
    assert shown["alerts"] == {"thresholds": [0.8, 1.0], "webhook_url": None, "webhook_secret": None,
                               "max_attempts": 5}
    assert shown["metrics"] == {"tenant_usage": True, "max_tenants": 10000}
    assert shown["billing"]["stripe"]["mode"] == "live"  # STRIPE_API_KEY set and no mode: live
    assert shown["billing"]["stripe"]["plans_by_lookup_key"]["starter_monthly"] == "starter"
    assert "api_key" not in shown["billing"]["stripe"] and shown["billing"]["stripe_api_key"] == "***"


def test_check_config_prints_a_replaced_plan_beside_the_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "auth: {algorithms: [HS256]}\n"
                           "meters: {calls: {match: {path: '/v1/**'}}}\n"
                           "plans: {starter: {rate: null, quotas: {calls: {limit: 5, on_exceed: overage}}},\n"
                           "        professional: {quotas: {}}, enterprise: {quotas: {}}, sovereign: {quotas: {}}}\n")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY__ALERTS__WEBHOOK_URL", "https://hooks.example.com/services/T0/s3cr3t")
    monkeypatch.setenv("GATEWAY__ALERTS__WEBHOOK_SECRET", "whsec-alerts-secret")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and "whsec-alerts-secret" not in out
    shown = yaml.safe_load(out)
    assert shown["meters"] == {"calls": {"source": "request", "kind": "counter", "match": {"path": "/v1/**"},
                                         "stripe_event": None, "bill_server_errors": False}}
    assert shown["plans"]["starter"] == {"rate": None,
                                         "quotas": {"calls": {"limit": 5, "on_exceed": "overage"}}}
    assert shown["alerts"]["webhook_url"] == "https://hooks.example.com/***"
    assert shown["alerts"]["webhook_secret"] == "***"


def test_effective_config_reads_back_as_the_same_policy(tmp_path: Path) -> None:
    """What check-config prints is itself a valid config that gives the same meters and plans."""
    settings = parse_settings(KEYED)
    shown = effective_config(settings)
    again = parse_settings({**KEYED, "meters": shown["meters"], "plans": shown["plans"]})
    assert again.policy.meters == settings.policy.meters
    assert again.policy.plans == settings.policy.plans


# ------------------------------------------------------------------------------ server.workers: auto


def test_workers_auto_in_the_file_and_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings({**KEYED, "server": {"workers": "auto"}}).server.workers == "auto"
    assert parse_settings({**KEYED, "server": {"workers": 3}}).server.workers == 3
    assert parse_settings(KEYED).server.workers == 1
    path = write(tmp_path, "auth: {algorithms: [HS256]}\n")
    env = {"GATEWAY_JWT_HS256_SECRET": SECRET, "GATEWAY__SERVER__WORKERS": "auto"}
    assert load_settings(path, env=env).server.workers == "auto"
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY__SERVER__WORKERS", "auto")
    assert main(["check-config", "--config", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["server"]["workers"] == "auto"


@pytest.mark.parametrize(("argument", "expected"), [("auto", "auto"), ("3", 3), (None, "from-config")])
def test_serve_takes_workers_auto_or_a_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             argument: str | None, expected: object) -> None:
    import gateway.cli.devservices
    import gateway.server

    seen: list[object] = []
    monkeypatch.setattr(gateway.server, "serve", lambda settings, workers: seen.append(workers) or 0)
    monkeypatch.setattr(gateway.cli.devservices, "resolved", contextlib.nullcontext)
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    path = write(tmp_path, "auth: {algorithms: [HS256]}\nserver: {workers: auto}\n")
    assert main(["serve", "--config", str(path), *(["--workers", argument] if argument else [])]) == 0
    assert seen == ["auto" if expected == "from-config" else expected]


@pytest.mark.parametrize("argument", ["0", "-1", "two", "Auto", ""])
def test_serve_refuses_other_worker_counts(argument: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--workers", argument])
    assert info.value.code == 2
    assert "--workers: expected a positive integer or auto" in capsys.readouterr().err


def _cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text(proc)
    return root, proc_cgroup


@pytest.mark.parametrize(("proc", "files", "limit"), [
    # cgroup v2 in a container (its own cgroup is the root it sees): 1.5 CPUs are 2 workers
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 2),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {}, None),
    # v2 on a host: the quota of the own cgroup or of one above it, whichever is smaller
    ("0::/system.slice/gw.service\n", {"system.slice/gw.service/cpu.max": "max 100000",
                                        "system.slice/cpu.max": "100000 100000"}, 1),
    ("0::/a/b\n", {"a/b/cpu.max": "300000 100000", "a/cpu.max": "max 100000"}, 3),
    # v1 (the cpu controller's own hierarchy), also when the path is not visible inside a container
    ("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "250000\n",
                                                   "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ("2:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("garbage\n", {"cpu.max": "100000 100000"}, None),
])
def test_workers_auto_is_one_per_core_within_the_cgroup_cpu_quota(
        tmp_path: Path, proc: str, files: dict[str, str], limit: int | None) -> None:
    from gateway.server import worker_count

    root, proc_cgroup = _cgroups(tmp_path, proc, files)
    cores = len(os.sched_getaffinity(0))
    expected = cores if limit is None else min(cores, limit)
    assert worker_count("auto", cgroup_root=root, proc_cgroup=proc_cgroup) == expected
    assert worker_count(5, cgroup_root=root, proc_cgroup=proc_cgroup) == 5  # a count is taken as it is


def test_workers_auto_without_cgroup_files_is_the_cpu_affinity(tmp_path: Path) -> None:
    from gateway.server import worker_count

    assert worker_count("auto", cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none") == \
        len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- Stripe webhook secrets


@pytest.mark.parametrize(("value", "expected"), [
    ("whsec_one", ("whsec_one",)),
    ("whsec_new, whsec_old", ("whsec_new", "whsec_old")),  # during a roll of the endpoint's secret
    ("whsec_same,whsec_same", ("whsec_same",)),
    ("", ()),
])
def test_stripe_webhook_secret_is_one_or_two_secrets(value: str, expected: tuple[str, ...]) -> None:
    settings = load_settings(None, env={"GATEWAY_JWT_HS256_SECRET": SECRET, "STRIPE_WEBHOOK_SECRET": value})
    assert settings.billing.stripe_webhook_secrets == expected


def test_stripe_webhook_secrets_may_be_a_yaml_list() -> None:
    settings = parse_settings({**KEYED, "billing": {"stripe_webhook_secret": ["whsec_new", "whsec_old"]}})
    assert settings.billing.stripe_webhook_secrets == ("whsec_new", "whsec_old")


@pytest.mark.parametrize("value", ["whsec_a,whsec_b,whsec_c", "whsec_a,,whsec_b", "whsec_a,", "whsec a",
                                   "whsec_\u00e9", ["whsec_a", 5], {"new": "whsec_a"}, 42])
def test_bad_stripe_webhook_secrets_name_the_key_and_never_echo_a_secret(value: object) -> None:
    with pytest.raises(ConfigError, match=r"billing\.stripe_webhook_secret") as raised:
        parse_settings({**KEYED, "billing": {"stripe_webhook_secret": value}})
    assert "whsec" not in str(raised.value)


def test_check_config_masks_each_webhook_secret(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_new_123,whsec_old_456")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "whsec_" not in out
    assert yaml.safe_load(out)["billing"]["stripe_webhook_secret"] == "***,***"
