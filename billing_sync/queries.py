"""SQL the sync worker runs for many rows at once, written so PostgreSQL keeps using its indexes.

`among(column, values, dialect)` is `column IN values`; `planned_per_run(session)` makes PostgreSQL plan a
transaction's statements for the ledger as it is at each run. Both guard against the same trap: asyncpg
prepares every statement, and PostgreSQL reuses a generic plan after five runs, so a plan made while the
ledger was small (a sequential scan) stays as the ledger grows to hundreds of thousands of rows.

`due_page(...)` is the sender's page of pending rows, read in the order of the index
`ix_usage_ledger_pending_order` (state, bucket_start, tenant_id, meter): a page is the next rows of that index,
not a sort of every pending row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, literal, select, text, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from metering.models import LedgerEntry

IN_CHUNK = 500  # values per IN (...) list where the list is spelled out (SQLite)
# The columns of a pending row that its send needs, as plain result rows: no ORM object and state per row.
DUE_COLUMNS = (LedgerEntry.identifier, LedgerEntry.tenant_id, LedgerEntry.meter, LedgerEntry.bucket_start,
               LedgerEntry.value, LedgerEntry.kind, LedgerEntry.attempts, LedgerEntry.first_attempt_at)


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


def due_page(due_at: datetime, *, after: tuple[datetime, str, str] | None, previewed: bool,
             size: int) -> Select[Any]:
    """The next `size` pending rows due at `due_at` after the key `after` (bucket_start, tenant_id, meter),
    in that order; `previewed=False` leaves out the rows a dry run has shown already.

    The order, the `state` equality and the keyset condition are the columns of `ix_usage_ledger_pending_order`
    in its order, so both databases walk the index from `after` and stop after `size` due rows; the rows
    backing off (`next_attempt_at` ahead) and the previewed ones are filtered on the way.
    """
    order = (LedgerEntry.bucket_start, LedgerEntry.tenant_id, LedgerEntry.meter)
    query = (
        select(*DUE_COLUMNS)
        .where(LedgerEntry.state == "pending")
        .where(LedgerEntry.next_attempt_at.is_(None) | (LedgerEntry.next_attempt_at <= due_at))
        .order_by(*order)
        .limit(size)
    )
    if not previewed:
        query = query.where(LedgerEntry.previewed_at.is_(None))
    if after is not None:
        query = query.where(tuple_(*order) > tuple_(*after))
    return query
