"""metering.tenant_rows: the one writer of a tenant row and its audit entry (the admin API and the Stripe
webhooks both write through it), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering.db import create_engine, session_factory
from metering.migrate import upgrade_async
from metering.models import AuditEntry, Tenant
from metering.tenant_rows import RowChanged, write_tenant
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

NOW = 1_800_000_000.0
AUDITED = ("plan", "status", "subscription_status", "stripe_customer_id", "stripe_subscription_id")


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:  # noqa: F811
    engine = create_engine(db_url)
    await upgrade_async(engine)
    yield session_factory(engine)
    await engine.dispose()


AT = datetime.fromtimestamp(NOW, UTC)


async def _write(sessions: async_sessionmaker[AsyncSession], values: dict[str, Any], **options: Any) -> Any:
    async with sessions() as session, session.begin():
        return await write_tenant(session, "acme", values, audited=AUDITED, actor="stripe", action="x.update",
                                  create_action="x.create", at=AT, updated_at=AT, **options)


async def _audit_actions(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        return [e.action for e in (await session.scalars(select(AuditEntry).order_by(AuditEntry.id))).all()]


async def test_write_tenant_creates_updates_and_audits_only_changes(sessions: async_sessionmaker[AsyncSession]) -> None:
    created = await _write(sessions, {"subscription_status": "active"}, defaults={"plan": "starter"})
    assert created.created and created.after["plan"] == "starter" and created.after["status"] == "active"
    same = await _write(sessions, {"subscription_status": "active"})
    assert not same.changed
    moved = await _write(sessions, {"plan": "enterprise"})
    assert (moved.before["plan"], moved.after["plan"]) == ("starter", "enterprise")
    assert await _audit_actions(sessions) == ["x.create", "x.update"]


async def test_write_tenant_compare_and_set_refuses_a_row_changed_since_it_was_read(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    await _write(sessions, {}, defaults={"plan": "starter"})
    async with sessions() as session:
        read = await session.get(Tenant, "acme")
    await _write(sessions, {"plan": "professional"})  # another writer, meanwhile
    with pytest.raises(RowChanged):
        await _write(sessions, {"plan": "enterprise"}, expected=read)
    async with sessions() as session:
        row = await session.get(Tenant, "acme")
        assert row is not None and row.plan == "professional"
    assert await _audit_actions(sessions) == ["x.create", "x.update"]
