"""SQL store foundation on SQLite and PostgreSQL: migrations, models round-trip, constraints, ping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from metering.db import create_engine, ping, session_factory
from metering.migrate import (
    current_revision,
    current_revision_async,
    head_revision,
    upgrade,
    upgrade_async,
)
from metering.models import (
    AlertEvent,
    AuditEntry,
    Base,
    LedgerEntry,
    StripeEvent,
    Tenant,
    TenantOverride,
    utcnow,
)

TABLES = {"tenants", "tenant_overrides", "audit_log", "stripe_events", "usage_ledger", "alert_events"}


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names)


async def test_upgrade_creates_all_tables(engine: AsyncEngine) -> None:
    assert await table_names(engine) == set()
    await upgrade_async(engine)
    assert await table_names(engine) == TABLES | {"alembic_version"}


async def test_upgrade_twice_is_idempotent(db_url: str, engine: AsyncEngine) -> None:
    await upgrade_async(db_url)
    await upgrade_async(db_url)
    assert await table_names(engine) == TABLES | {"alembic_version"}
    assert await current_revision_async(db_url) == head_revision() == "0004"


async def test_current_revision(db_url: str) -> None:
    assert await current_revision_async(db_url) is None
    await upgrade_async(db_url)
    assert await current_revision_async(db_url) == "0004" == head_revision()
    # The sync helper needs a thread without a running loop.
    assert await asyncio.to_thread(current_revision, db_url) == "0004"


async def test_sync_upgrade_from_thread_without_loop(db_url: str, engine: AsyncEngine) -> None:
    await asyncio.to_thread(upgrade, db_url)
    assert await table_names(engine) == TABLES | {"alembic_version"}


def test_sync_upgrade_refuses_running_loop(tmp_path: Path) -> None:
    async def call() -> None:
        upgrade(f"sqlite+aiosqlite:///{tmp_path}/gw.db")

    with pytest.raises(RuntimeError, match="_async variant"):
        asyncio.run(call())


async def test_migration_matches_models(migrated_engine: AsyncEngine) -> None:
    """The hand-written revision and metering.models describe the same schema."""

    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return [d for d in compare_metadata(context, Base.metadata) if "alembic_version" not in repr(d)]

    async with migrated_engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_tenant_with_override_round_trip_and_cascade(migrated_engine: AsyncEngine) -> None:
    sessions = session_factory(migrated_engine)
    expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with sessions() as session, session.begin():
        session.add(Tenant(id="acme", plan="pro", stripe_customer_id="cus_1", billing_anchor_day=15))
        await session.flush()  # the override's foreign key needs the tenant row first
        session.add(TenantOverride(tenant_id="acme", meter="api_calls", limit=None, per_second=2.5, burst=10,
                                   expires_at=expires, reason="launch"))
        session.add(TenantOverride(tenant_id="acme", meter="tokens", limit=10**12))

    async with sessions() as session:
        tenant = await session.get(Tenant, "acme")
        assert tenant is not None
        assert (tenant.plan, tenant.status, tenant.stripe_customer_id) == ("pro", "active", "cus_1")
        assert tenant.created_at.tzinfo is not None and tenant.updated_at.tzinfo is not None
        assert abs(tenant.updated_at - utcnow()) < timedelta(minutes=1)
        overrides = {o.meter: o for o in await session.scalars(select(TenantOverride))}
        assert overrides["api_calls"].limit is None
        assert overrides["api_calls"].per_second == 2.5
        assert overrides["api_calls"].expires_at == expires
        assert overrides["tokens"].limit == 10**12

    async with sessions() as session, session.begin():
        # A bulk delete: the database, not the ORM, must remove the overrides (ON DELETE CASCADE).
        await session.execute(delete(Tenant).where(Tenant.id == "acme"))
    async with sessions() as session:
        assert (await session.scalars(select(TenantOverride))).all() == []


async def test_override_needs_existing_tenant(migrated_engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with session_factory(migrated_engine)() as session, session.begin():
            session.add(TenantOverride(tenant_id="ghost", meter="api_calls", limit=1))


async def test_audit_entry_json(migrated_engine: AsyncEngine) -> None:
    sessions = session_factory(migrated_engine)
    before = {"plan": "free", "overrides": []}
    after = {"plan": "pro", "overrides": [{"meter": "api_calls", "limit": None}], "note": "ünïcode"}
    async with sessions() as session, session.begin():
        entry = AuditEntry(actor="admin@example.com", tenant_id="acme", action="tenant.update",
                           before=before, after=after)
        session.add(entry)
        session.add(AuditEntry(actor="admin@example.com", tenant_id=None, action="tenant.create",
                               before=None, after={"plan": "free"}))
    assert entry.id is not None

    async with sessions() as session:
        rows = (await session.scalars(select(AuditEntry).order_by(AuditEntry.id))).all()
    assert [r.action for r in rows] == ["tenant.update", "tenant.create"]
    assert rows[0].before == before and rows[0].after == after
    assert rows[1].before is None
    assert rows[0].at.tzinfo is not None


async def test_ledger_identifier_is_unique(migrated_engine: AsyncEngine) -> None:
    sessions = session_factory(migrated_engine)
    bucket = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    async with sessions() as session, session.begin():
        session.add(LedgerEntry(tenant_id="acme", meter="api_calls", bucket_start=bucket,
                                value=Decimal("12.345678"), kind="counter", identifier="acme:api_calls:1"))
    async with sessions() as session:
        row = await session.get(LedgerEntry, ("acme", "api_calls", bucket))
        assert row is not None
        assert (row.state, row.attempts, row.bucket_start) == ("pending", 0, bucket)
        assert Decimal(row.value) == Decimal("12.345678")

    with pytest.raises(IntegrityError):
        async with sessions() as session, session.begin():
            later = bucket + timedelta(hours=1)
            session.add(LedgerEntry(tenant_id="acme", meter="api_calls", bucket_start=later,
                                    value=Decimal(1), kind="counter", identifier="acme:api_calls:1"))


async def test_stripe_and_alert_events(migrated_engine: AsyncEngine) -> None:
    sessions = session_factory(migrated_engine)
    period = datetime(2025, 5, 1, tzinfo=UTC)
    async with sessions() as session, session.begin():
        session.add(StripeEvent(id="evt_1", type="customer.subscription.updated"))
        session.add(AlertEvent(tenant_id="acme", meter="api_calls", period_start=period, threshold=0.8,
                               value=812.0))
    with pytest.raises(IntegrityError):  # an event id is processed once
        async with sessions() as session, session.begin():
            session.add(StripeEvent(id="evt_1", type="customer.subscription.updated"))
    async with sessions() as session:
        alert = await session.get(AlertEvent, ("acme", "api_calls", period, 0.8))
        assert alert is not None and alert.value == 812.0


async def test_ping(engine: AsyncEngine) -> None:
    await ping(engine)


async def test_ping_bad_url_raises(db_url: str, tmp_path: Path) -> None:
    if db_url.startswith("sqlite"):
        # Not a directory (aiosqlite then leaks its worker thread past the test's loop): a corrupt file.
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"this is not an sqlite database" * 100)
        bad = f"sqlite+aiosqlite:///{garbage}"
    else:
        bad = db_url.rsplit("/", 1)[0] + "/gw_no_such_database"
    engine = create_engine(bad)
    try:
        # Connect errors reach us unwrapped (asyncpg.InvalidCatalogNameError), so any exception counts.
        with pytest.raises(Exception):  # noqa: B017
            await ping(engine)
    finally:
        await engine.dispose()


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/nested/dir/gw.db")
    try:
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            }
    finally:
        await engine.dispose()
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 5000, "foreign_keys": 1}
    assert (tmp_path / "nested" / "dir" / "gw.db").exists()


async def test_upgrade_from_the_first_revision_keeps_the_rows(db_url: str, engine: AsyncEngine) -> None:
    """A database at 0001 with rows in it upgrades to head; the new columns start empty."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    await upgrade_async(db_url, "0001")
    async with engine.begin() as connection:
        await connection.execute(text("INSERT INTO tenants (id, plan, status, created_at, updated_at) "
                                      "VALUES ('kept', 'starter', 'active', :t, :t)"),
                                 {"t": datetime(2026, 12, 1, tzinfo=UTC)})
    await upgrade_async(db_url)
    async with engine.connect() as connection:
        row = (await connection.execute(text("SELECT id, past_due_since FROM tenants"))).one()
    assert tuple(row) == ("kept", None)
    assert await current_revision_async(db_url) == head_revision()


async def test_the_ledger_page_index_upgrades_and_downgrades(db_url: str, engine: AsyncEngine) -> None:
    """0003 replaces the index on `state` with the sender's page order, and its downgrade puts it back."""
    from alembic import command
    from sqlalchemy import text

    from metering.migrate import alembic_config

    async def indexes() -> dict[str, list[str]]:
        async with engine.connect() as connection:
            found = await connection.run_sync(lambda sync: inspect(sync).get_indexes("usage_ledger"))
        return {index["name"]: index["column_names"] for index in found if index["name"].startswith("ix_")}

    await upgrade_async(db_url, "0002")
    async with engine.begin() as connection:
        await connection.execute(text(
            "INSERT INTO usage_ledger (tenant_id, meter, bucket_start, value, kind, state, identifier, attempts, "
            "created_at) VALUES ('kept', 'api_calls', :t, 5, 'counter', 'pending', 'id-kept', 0, :t)"),
            {"t": datetime(2026, 12, 1, tzinfo=UTC)})
    assert (await indexes()) == {"ix_usage_ledger_state": ["state"]}
    await upgrade_async(db_url)
    assert (await indexes()) == {"ix_usage_ledger_pending_order": ["state", "bucket_start", "tenant_id", "meter"]}

    def downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")

    async with engine.begin() as connection:
        await connection.run_sync(downgrade)
    assert (await indexes()) == {"ix_usage_ledger_state": ["state"]}
    assert await current_revision_async(db_url) == "0002"
    await upgrade_async(db_url)
    async with engine.connect() as connection:
        kept = (await connection.execute(text("SELECT identifier, state FROM usage_ledger"))).all()
    assert [tuple(row) for row in kept] == [("id-kept", "pending")]


async def test_the_override_enforce_column_upgrades_and_downgrades(db_url: str, engine: AsyncEngine) -> None:
    """0004 adds `tenant_overrides.enforce` (NULL in older rows: "on"); its downgrade drops the column and the
    shadow overrides with it, which the older code would otherwise enforce."""
    from alembic import command
    from sqlalchemy import text

    from metering.migrate import alembic_config

    async def columns() -> set[str]:
        async with engine.connect() as connection:
            found = await connection.run_sync(lambda sync: inspect(sync).get_columns("tenant_overrides"))
        return {column["name"] for column in found}

    at = {"t": datetime(2026, 12, 1, tzinfo=UTC)}
    await upgrade_async(db_url, "0003")
    async with engine.begin() as connection:
        await connection.execute(text("INSERT INTO tenants (id, plan, status, created_at, updated_at) "
                                      "VALUES ('kept', 'starter', 'active', :t, :t)"), at)
        await connection.execute(text("INSERT INTO tenant_overrides (tenant_id, meter, limit_value, updated_at) "
                                      "VALUES ('kept', 'chains', 3, :t)"), at)
    assert "enforce" not in await columns()
    await upgrade_async(db_url)
    assert "enforce" in await columns()
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        assert (await session.get(TenantOverride, ("kept", "chains"))).enforce is None  # type: ignore[union-attr]
        session.add(TenantOverride(tenant_id="kept", meter="chain_deployments", limit=20, enforce="shadow"))

    def downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")

    async with engine.begin() as connection:
        await connection.run_sync(downgrade)
    assert "enforce" not in await columns()
    assert await current_revision_async(db_url) == "0003"
    async with engine.connect() as connection:
        kept = (await connection.execute(text("SELECT meter, limit_value FROM tenant_overrides"))).all()
    assert [tuple(row) for row in kept] == [("chains", 3)]
    await upgrade_async(db_url)
    assert await current_revision_async(db_url) == head_revision()
