"""SQL the sync worker runs for many rows at once, written so PostgreSQL keeps using its indexes.

`among(column, values, dialect)` is `column IN values`; `planned_per_run(session)` makes PostgreSQL plan a
transaction's statements for the ledger as it is at each run. Both guard against the same trap: asyncpg
prepares every statement, and PostgreSQL reuses a generic plan after five runs, so a plan made while the
ledger was small (a sequential scan) stays as the ledger grows to hundreds of thousands of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, literal, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

IN_CHUNK = 500  # values per IN (...) list where the list is spelled out (SQLite)


async def planned_per_run(session: AsyncSession) -> str:
    """The session's dialect name; on PostgreSQL, the statements of its transaction are planned at each run.

    asyncpg prepares every statement, and PostgreSQL then reuses a generic plan after five runs: one made
    while the ledger was small stays a sequential scan as it grows (an `IN` of 500 identifiers took 5 s at
    300,000 rows, where a plan for the ledger as it is takes 1 ms). Autovacuum's ANALYZE replaces such plans
    in time; a pass that moves or sends a large backlog must not wait for it. `SET LOCAL` ends with the
    transaction.
    """
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql" and (dialect.server_version_info or (0,)) >= (12,):
        await session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    return dialect.name


def among(column: Any, values: Sequence[Any], dialect: str) -> Any:
    """`column IN values`; on PostgreSQL `column IN (SELECT unnest(:array))`: one statement, and one bound
    value, for any number of values, which a plan looks up in the index (see `planned_per_run`)."""
    if dialect == "postgresql":
        return column.in_(select(func.unnest(literal(list(values), ARRAY(column.type)))))
    return column.in_(values)
