"""deploy/prometheus/alerts.yml through the tools that consume it (issue 14 §1): `promtool check rules`,
`promtool test rules` (alerts_test.yml: the rules' unit tests, `for:` included), then a real Prometheus that
loads the rules and scrapes a real gateway whose Redis is stopped under traffic: the spool alerts fire. The same
Prometheus then answers every PromQL expression of deploy/grafana/cosmos-gateway.json (issue 14 §2).

Prometheus and promtool are Debian's (`make test` installs them: scripts/ensure-prometheus.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.cli.devservices import RedisProcess, free_port
from tests.support import ROOT, Upstream, bearer, running_gateway, upstream_app

RULES_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "cosmos-gateway.json"
SPOOL_CAP = 1 << 20  # the smallest redis.spool_max_bytes the config takes: full after ~1,700 requests
PLANS: dict[str, Any] = {"starter": {"rate": {"per_second": 100_000, "burst": 100_000},
                                     "quotas": {"chain_deployments": {"limit": 1_000_000}}}}
DEPLOY = "/api/chains/c1/deployments"
# What Grafana puts in place of its variables before it sends a query (the test's values).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$instance": ".*", "$meter": ".*"}


def tool(name: str) -> str:
    path = os.environ.get(name.upper()) or shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).is_file():
        pytest.fail(f"{name} is missing: run scripts/ensure-prometheus.sh (`make test` does) or set {name.upper()}")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = run_promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_cover_every_alert() -> None:
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts - tested == set(), "alerts without a unit test that makes them fire"


def test_the_dashboard_only_uses_metrics_the_rules_know() -> None:
    """Every metric name in the dashboard exists in PRODUCT.md §7 or the gateway's metrics modules."""
    known = "\n".join((ROOT / p).read_text() for p in ("gateway/metrics.py", "quota/metrics.py",
                                                         "billing_sync/metrics.py"))
    for expr in dashboard_expressions():
        for name in re.findall(r"\b((?:gateway|billing_sync)_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name) if "duration_seconds" in name else name
            assert f'"{base}"' in known, f"{name} in {expr!r}"


# --------------------------------------------------------------------------- a real Prometheus


def shortened_rules(workdir: Path) -> Path:
    """The rules as the test's Prometheus loads them: every `for:` shortened to 0s (the production durations
    are covered by alerts_test.yml) and the spool cap set to the test gateway's."""
    text = (RULES_DIR / "alerts.yml").read_text()
    text = re.sub(r"(?m)^(\s+for:\s*)\S+$", r"\g<1>0s", text)
    text, replaced = re.subn(r"vector\(1073741824\)", f"vector({SPOOL_CAP})", text)
    assert replaced == 1, "the spool cap recording rule changed: update this test"
    path = workdir / "alerts.yml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def running_prometheus(workdir: Path, admin_port: int) -> Iterator[str]:
    """Prometheus on a free loopback port with its own data folder, scraping the gateway's admin listener and
    evaluating the rules every second; stopped by its PID."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(shortened_rules(workdir))],
        "scrape_configs": [{"job_name": "cosmos-gateway",
                            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def wait_for(what: str, seconds: float, check: Any) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            result = await check()
            if result:
                return result
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.25)


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return await response.json()


def dashboard_expressions() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    model = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in panels(model["panels"]) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in model["templating"]["list"] if v["type"] == "query"]
    return exprs


def as_sent(expr: str) -> str:
    """The expression as Grafana sends it: variables replaced; label_values() is Grafana's, not PromQL (it asks
    /api/v1/series for the metric), so it becomes the metric's selector."""
    expr = re.sub(r"^label_values\((\w+),\s*\w+\)$", r"\1", expr)
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


async def test_prometheus_fires_the_spool_alerts_when_redis_stops_and_answers_the_dashboard(
        tmp_path: Path) -> None:
    redis = RedisProcess().start()  # this test's own: it is stopped half way
    upstream = await Upstream(upstream_app()).start()
    try:
        with running_gateway(upstream.url, redis.url, tmp_path, plans=PLANS,
                             redis={"spool_dir": str(tmp_path / "spool"), "spool_max_bytes": SPOOL_CAP,
                                    "on_error": "fail_open"}) as gateway, \
                running_prometheus(tmp_path, gateway.admin_port) as prometheus:
            async with aiohttp.ClientSession() as session:
                tenant = f"prom-{uuid.uuid4().hex[:8]}"
                statuses: list[int] = []

                async def one(path: str = DEPLOY, headers: dict[str, str] | None = None) -> None:
                    async with session.post(gateway.url + path, data=b"{}",
                                            headers=bearer(tenant) if headers is None else headers) as response:
                        await response.read()
                        statuses.append(response.status)

                async def target_up() -> bool:
                    body = await get_json(session, prometheus + "/api/v1/query", query="up")
                    return any(r["value"][1] == "1" for r in body["data"]["result"])

                await wait_for("Prometheus scrapes the gateway", 20, target_up)
                # Some ordinary traffic and auth failures first, so the dashboard's series exist.
                await asyncio.gather(*(one() for _ in range(20)), one(headers={"Authorization": "Bearer x"}))
                assert statuses.count(200) == 20, statuses

                redis.stop()
                statuses.clear()
                for _ in range(100):  # ~600 spooled bytes a request: 1 MiB refuses (503) after ~1,700
                    await asyncio.gather(*(one() for _ in range(40)))
                    if statuses.count(503) >= 40:
                        break
                assert statuses.count(503) >= 40, f"the spool never filled: {len(statuses)} served"

                async def firing() -> set[str]:
                    body = await get_json(session, prometheus + "/api/v1/alerts")
                    names = {a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == "firing"}
                    return names if {"GatewaySpoolPending", "GatewaySpoolFull"} <= names else set()

                await wait_for("the spool alerts fire", 20, firing)

                for expr in dashboard_expressions():
                    body = await get_json(session, prometheus + "/api/v1/query", query=as_sent(expr))
                    assert body["status"] == "success", (expr, body)

                async def traffic_shown() -> bool:
                    # The first panel shows the traffic just sent, 503s included (a counter's rate needs two
                    # samples of it: a few scrapes after the first 503).
                    body = await get_json(session, prometheus + "/api/v1/query",
                                          query=as_sent(dashboard_expressions()[0]))
                    return {r["metric"].get("status_class") for r in body["data"]["result"]} >= {"2xx", "5xx"}

                await wait_for("the traffic panel shows 2xx and 5xx", 15, traffic_shown)
    finally:
        redis.close()
        await upstream.close()
