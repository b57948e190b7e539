"""Schema migrations as an operator runs them: the real `cosmos-gateway db upgrade` and `serve` processes.

- A database of the first revision, with rows in every table, upgrades to head keeping every value, and a
  gateway started on it afterwards enforces those rows.
- A database that a newer gateway migrated (a revision this code does not know) is refused in one line by
  `db upgrade` and by `serve`, and left as it was; an unreachable database is reported in one line too.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sqlalchemy import bindparam, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.cli.devservices import RedisProcess, free_port
from gateway.config import SECRET_ENV
from metering.migrate import current_revision_async, head_revision, upgrade_async
from metering.models import Base
from tests.support import ROOT, GatewayProcess, Upstream, bearer, config_dict

OPS_TOKEN = "ops-token-0123456789"
T0 = datetime(2026, 11, 3, 8, 30, 15, 123456, tzinfo=UTC)
T1 = datetime(2026, 11, 20, 17, 0, tzinfo=UTC)
FAR = datetime(2099, 1, 1, tzinfo=UTC)
COMMAND_DEADLINE = 60  # seconds for one CLI process, far above its usual second

# Rows in every table revision 0001 creates, with the columns 0001 gave them (audit_log.id comes from the
# database). Values of every kind the tables hold: text, NULL, integers, floats, decimals, JSON, timestamps.
ROWS_0001: dict[str, list[dict[str, Any]]] = {
    "tenants": [
        {"id": "capped", "plan": "professional", "status": "active", "subscription_status": "active",
         "stripe_customer_id": "cus_capped", "stripe_subscription_id": "sub_capped", "billing_anchor_day": None,
         "created_at": T0, "updated_at": T1, "stripe_event_at": T1},
        {"id": "frozen", "plan": "starter", "status": "suspended", "subscription_status": None,
         "stripe_customer_id": None, "stripe_subscription_id": None, "billing_anchor_day": 15,
         "created_at": T0, "updated_at": T0, "stripe_event_at": None},
    ],
    "tenant_overrides": [
        {"tenant_id": "capped", "meter": "chain_deployments", "limit_value": 1, "per_second": None, "burst": None,
         "expires_at": FAR, "reason": "trial: one deployment", "updated_at": T1},
        {"tenant_id": "capped", "meter": "rate", "limit_value": None, "per_second": 7.5, "burst": 15,
         "expires_at": None, "reason": None, "updated_at": T1},
    ],
    "audit_log": [
        {"at": T1, "actor": "token:ops", "tenant_id": "capped", "action": "tenant.update",
         "before": {"plan": "starter"}, "after": {"plan": "professional", "note": "ünïcode"}},
    ],
    "stripe_events": [
        {"id": "evt_old", "type": "customer.subscription.updated", "received_at": T1},
    ],
    "usage_ledger": [
        {"tenant_id": "capped", "meter": "api_calls", "bucket_start": T0, "value": Decimal("12.345678"),
         "kind": "counter", "state": "sent", "identifier": "capped:api_calls:1794213000",
         "stripe_customer_id": "cus_capped", "attempts": 1, "last_error": None, "next_attempt_at": None,
         "sent_at": T1, "created_at": T0},
        {"tenant_id": "capped", "meter": "storage_gb", "bucket_start": T0, "value": Decimal(3),
         "kind": "gauge", "state": "parked", "identifier": "capped:storage_gb:1794213000",
         "stripe_customer_id": None, "attempts": 3, "last_error": "no Stripe customer", "next_attempt_at": T1,
         "sent_at": None, "created_at": T0},
    ],
    "alert_events": [
        {"tenant_id": "capped", "meter": "chain_deployments", "period_start": T0, "threshold": 0.8, "at": T1,
         "value": 80.0},
    ],
}
# What the later revisions give the rows that were there before them: nothing (NULL reads as "not yet",
# and for tenant_overrides.enforce as "on", 0004).
ADDED_LATER = {"tenants": {"past_due_since": None},
               "usage_ledger": {"first_attempt_at": None, "previewed_at": None},
               "tenant_overrides": {"enforce": None}}
GENERATED = {"audit_log": {"id": 1}}


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


def write_config(tmp_path: Path, database_url: str, upstream_url: str = "http://127.0.0.1:9",
                 redis_url: str = "redis://127.0.0.1:9/0") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config_dict(upstream_url, redis_url, database_url)))
    return path


async def cli(*args: str) -> Done:
    """`python -m gateway.cli ARGS` with the config file as the whole truth (no GATEWAY_*/secret env)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith("GATEWAY")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_DEADLINE)
    except TimeoutError:
        os.killpg(process.pid, 9)
        await process.wait()
        raise
    assert process.returncode is not None
    return Done(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def insert_rows(engine: AsyncEngine, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Plain INSERTs; each value bound with its column's type, so it is stored as the ORM stores it."""
    async with engine.begin() as connection:
        for table, table_rows in rows.items():
            columns = Base.metadata.tables[table].c
            for row in table_rows:
                statement = text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)})")
                await connection.execute(statement.bindparams(*(bindparam(c, type_=columns[c].type) for c in row)),
                                         row)


async def read_rows(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of `ROWS_0001`, all columns, through the models' types, in key order."""
    found = {}
    async with engine.connect() as connection:
        for name in ROWS_0001:
            table = Base.metadata.tables[name]
            result = await connection.execute(select(table).order_by(*table.primary_key.columns))
            found[name] = [dict(row) for row in result.mappings()]
    return found


async def schema(engine: AsyncEngine) -> dict[str, list[str]]:
    """Tables and their columns, as the database has them."""

    def read(sync: Any) -> dict[str, list[str]]:
        inspector = inspect(sync)
        return {t: [c["name"] for c in inspector.get_columns(t)] for t in sorted(inspector.get_table_names())}

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def migrated_by_a_newer_gateway(engine: AsyncEngine) -> dict[str, Any]:
    """Head, then what a later revision might do (a new column, a revision id this code has never seen);
    returns a snapshot of the database to compare with afterwards."""
    await upgrade_async(engine)
    await insert_rows(engine, {"tenants": ROWS_0001["tenants"]})
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE tenants ADD COLUMN region VARCHAR(32)"))
        await connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    return await snapshot(engine)


async def snapshot(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        versions = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        tenants = (await connection.execute(text("SELECT * FROM tenants ORDER BY id"))).all()
    return {"versions": versions, "tenants": [tuple(row) for row in tenants], "schema": await schema(engine)}


def assert_one_clear_line(stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- upgrade with data in place


async def test_db_upgrade_from_the_first_revision_keeps_every_row_and_the_gateway_enforces_them(
        db_url: str, engine: AsyncEngine, tmp_path: Path, redis_server: RedisProcess, upstream: Upstream) -> None:
    await upgrade_async(db_url, "0001")
    await insert_rows(engine, ROWS_0001)

    done = await cli("db", "upgrade", "--config", str(write_config(tmp_path, db_url)))
    assert done.code == 0, done.stderr
    assert "latest schema revision" in done.stdout
    assert await current_revision_async(engine) == head_revision()

    expected = {table: [{**GENERATED.get(table, {}), **row, **ADDED_LATER.get(table, {})} for row in rows]
                for table, rows in ROWS_0001.items()}
    assert await read_rows(engine) == expected
    await engine.dispose()  # the gateway process is the database's user from here on

    # PostgreSQL: a gateway refuses to start below head, so this start also shows `db upgrade` was enough.
    config = config_dict(upstream.url, redis_server.url, db_url, admin={"tokens": f"ops:{OPS_TOKEN}"})
    gateway = GatewayProcess(config, tmp_path)
    try:
        gateway.start()
        async with aiohttp.ClientSession() as session:
            async with session.get(gateway.url + "/api/chains", headers=bearer("frozen")) as response:
                assert response.status == 403  # tenants.status = suspended
                assert (await response.json())["type"].endswith("forbidden")

            deploy = gateway.url + "/api/chains/c1/deployments"
            async with session.post(deploy, headers=bearer("capped")) as response:
                assert response.status == 200
            async with session.post(deploy, headers=bearer("capped")) as response:
                assert response.status == 429  # the override's limit of 1, not the professional plan's 500
                problem = await response.json()
                assert (problem["meter"], problem["limit"]) == ("chain_deployments", 1)

            async with session.get(gateway.url + "/_gateway/usage", headers=bearer("capped")) as response:
                view = await response.json()
            assert view["plan"] == "professional" and view["stripe_customer_id"] == "cus_capped"
            # enforce NULL (0004) reads as "on": no shadow
            assert view["rate"] == {"per_second": 7.5, "burst": 15, "source": "override", "shadow": None}
            deployments = view["meters"]["chain_deployments"]
            assert (deployments["limit"], deployments["source"]) == (1, "override")

            admin = {"Authorization": f"Bearer {OPS_TOKEN}"}
            async with session.get(gateway.admin_url + "/admin/audit?tenant=capped", headers=admin) as response:
                entries = (await response.json())["entries"]
            assert [(e["actor"], e["action"], e["before"], e["after"]) for e in entries] == [
                ("token:ops", "tenant.update", {"plan": "starter"}, {"plan": "professional", "note": "ünïcode"})]
        assert gateway.terminate() == 0
    finally:
        gateway.stop()


# --------------------------------------------------------------------------- a database newer than the code


async def test_db_upgrade_refuses_a_database_newer_than_the_code(
        db_url: str, engine: AsyncEngine, tmp_path: Path) -> None:
    before = await migrated_by_a_newer_gateway(engine)

    done = await cli("db", "upgrade", "--config", str(write_config(tmp_path, db_url)))
    assert done.code != 0
    line = assert_one_clear_line(done.stderr, "0099", f"head {head_revision()}", "newer", "backup")
    assert line.startswith("cosmos-gateway: ")
    assert await snapshot(engine) == before


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: the supervisor checks before it forks, no restart loop
async def test_serve_refuses_a_database_newer_than_the_code(
        db_url: str, engine: AsyncEngine, tmp_path: Path, redis_server: RedisProcess, upstream: Upstream,
        workers: str) -> None:
    """SQLite is migrated at start-up and PostgreSQL compared with head: both refuse the same way."""
    before = await migrated_by_a_newer_gateway(engine)

    config = write_config(tmp_path, db_url, upstream.url, redis_server.url)
    done = await cli("serve", "--config", str(config), "--workers", workers)
    assert done.code != 0
    line = assert_one_clear_line(done.stderr, "0099", f"head {head_revision()}", "newer", "backup")
    assert line.startswith("cosmos-gateway: cannot start: ")  # as any other start-up failure of `serve`
    assert await snapshot(engine) == before


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite is migrated at start-up instead
async def test_serve_refuses_a_postgresql_schema_older_than_the_code(
        db_url: str, tmp_path: Path, redis_server: RedisProcess, upstream: Upstream, workers: str) -> None:
    await upgrade_async(db_url, "0002")

    config = write_config(tmp_path, db_url, upstream.url, redis_server.url)
    done = await cli("serve", "--config", str(config), "--workers", workers)
    assert done.code != 0
    assert_one_clear_line(done.stderr, "cosmos-gateway: cannot start: ", "at revision 0002", "older",
                          f"head {head_revision()}", "cosmos-gateway db upgrade")
    assert await current_revision_async(db_url) == "0002"


# --------------------------------------------------------------------------- an unreachable database


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_db_upgrade_reports_an_unreachable_database_in_one_line(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        (tmp_path / "a-file").write_text("not a folder")
        url = f"sqlite+aiosqlite:///{tmp_path}/a-file/gw.db"  # its folder cannot be created
    else:
        url = f"postgresql+asyncpg://postgres:s3cret-pw@127.0.0.1:{free_port()}/test"  # nothing listens there
    done = await cli("db", "upgrade", "--config", str(write_config(tmp_path, url)))
    assert done.code != 0
    line = assert_one_clear_line(done.stderr, "cannot reach the database")
    assert "s3cret-pw" not in line
