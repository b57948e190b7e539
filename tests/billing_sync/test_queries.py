"""The sender's page query reads the ledger along an index, on SQLite and PostgreSQL (EXPLAIN of the real query)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_sync.queries import due_page, planned_per_run
from metering import db
from metering.migrate import upgrade_async
from metering.models import LedgerEntry
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

START = datetime(2026, 12, 1, tzinfo=UTC)
INDEX = "ix_usage_ledger_pending_order"


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    """A migrated ledger with 3,000 rows, most of them sent, as a ledger that has run for a while is."""
    engine = db.create_engine(db_url)
    await upgrade_async(engine)
    rows = [{"tenant_id": f"t{i % 100}", "meter": "api_calls", "bucket_start": START + timedelta(minutes=5 * i),
             "value": Decimal(1), "kind": "counter", "state": "pending" if i % 10 == 0 else "sent",
             "identifier": f"id{i}", "attempts": 0, "created_at": START} for i in range(3000)]
    async with engine.begin() as connection:
        await connection.execute(insert(LedgerEntry), rows)
        await connection.execute(text("ANALYZE"))
    yield engine
    await engine.dispose()


async def explain(engine: AsyncEngine, query: Any) -> str:
    """The plan of `query` as the worker runs it (same statement, same bound values), as one text."""
    sync_engine = engine.sync_engine
    prefix = "EXPLAIN QUERY PLAN " if sync_engine.dialect.name == "sqlite" else "EXPLAIN "

    async with db.session_factory(engine)() as session:
        await planned_per_run(session)
        if sync_engine.dialect.name == "postgresql":
            # Only which plans are possible counts here, not the costs of a 3,000-row table: with a sort
            # or a full scan priced out, a plan that still sorts has no index to read the order from.
            await session.execute(text("SET LOCAL enable_sort = off"))
            await session.execute(text("SET LOCAL enable_seqscan = off"))
        connection = await session.connection()
        compiled = query.compile(dialect=sync_engine.dialect)
        # The statement as the driver receives it, its values through the columns' own bind processing.
        values = compiled.construct_params()
        processors = compiled._bind_processors
        params = {name: processors[name](value) if name in processors else value for name, value in values.items()}
        if compiled.positiontup is not None:
            params = tuple(params[name] for name in compiled.positiontup)
        rows = (await connection.exec_driver_sql(prefix + compiled.string, params)).all()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)


@pytest.mark.parametrize("after", [None, (START + timedelta(days=3), "t7", "api_calls")], ids=["first", "next"])
@pytest.mark.parametrize("previewed", [True, False], ids=["live", "dry-run"])
async def test_a_page_of_pending_rows_is_read_along_the_index_not_sorted(ledger: AsyncEngine, after: Any,
                                                                        previewed: bool) -> None:
    plan = await explain(ledger, due_page(START + timedelta(days=30), after=after, previewed=previewed, size=500))
    assert INDEX in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # SQLite's and PostgreSQL's sort


async def test_the_page_query_returns_due_pending_rows_in_key_order(ledger: AsyncEngine) -> None:
    due = START + timedelta(days=30)
    async with db.session_factory(ledger)() as session:
        await session.execute(text("UPDATE usage_ledger SET next_attempt_at = :at WHERE identifier = 'id10'"),
                              {"at": due + timedelta(seconds=1)})  # backing off: not due
        await session.commit()
        first = (await session.execute(due_page(due, after=None, previewed=True, size=5))).all()
        after = (first[-1].bucket_start, first[-1].tenant_id, first[-1].meter)
        rest = (await session.execute(due_page(due, after=after, previewed=True, size=1000))).all()
    keys = [(r.bucket_start, r.tenant_id, r.meter) for r in first + rest]
    assert keys == sorted(keys) and len(keys) == 299
    assert [r.identifier for r in first] == ["id0", "id20", "id30", "id40", "id50"]
