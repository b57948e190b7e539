"""The sync's state as the ledger and Redis hold it: counts, the admin view, and requeueing parked rows.

Read by the worker after each pass (gauges, `PassResult.pending`) and by `GET /admin/sync`; nothing here
talks to Stripe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering.errors import REDIS_ERRORS
from metering.models import LedgerEntry, Tenant

LAST_RUN_KEY = "gw:sync:last_run"  # epoch seconds of the end of the last pass, written by the worker


def reason_of(last_error: str | None) -> str | None:
    """The bounded reason at the head of `last_error` ("no_customer: tenant has no ...")."""
    return last_error.partition(":")[0] if last_error else None


async def requeue_with_customer(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Parked "no_customer" rows of tenants that now have a Stripe customer become pending again."""
    with_customer = select(Tenant.id).where(Tenant.stripe_customer_id.is_not(None), Tenant.stripe_customer_id != "")
    async with sessions() as session, session.begin():
        result = await session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.state == "parked", LedgerEntry.last_error.like("no_customer:%"),
                   LedgerEntry.tenant_id.in_(with_customer))
            .values(state="pending", next_attempt_at=None)
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def requeue_parked(sessions: async_sessionmaker[AsyncSession], *, tenant: str | None = None,
                         reason: str | None = None) -> int:
    """Make parked rows pending again (admin action, after fixing the cause); returns how many."""
    query = update(LedgerEntry).where(LedgerEntry.state == "parked")
    if tenant is not None:
        query = query.where(LedgerEntry.tenant_id == tenant)
    if reason is not None:
        query = query.where(LedgerEntry.last_error.like(f"{reason}:%"))
    async with sessions() as session, session.begin():
        result = await session.execute(query.values(state="pending", next_attempt_at=None))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    pending: int
    parked: int
    previewed: int  # pending rows a dry run has shown
    oldest: datetime | None  # oldest pending bucket_start


async def ledger_counts(sessions: async_sessionmaker[AsyncSession]) -> LedgerCounts:
    """Pending, parked and previewed rows, and the oldest pending bucket."""
    async with sessions() as session:
        by_state = dict((await session.execute(
            select(LedgerEntry.state, func.count()).where(LedgerEntry.state.in_(("pending", "parked")))
            .group_by(LedgerEntry.state))).tuples().all())
        previewed = await session.scalar(select(func.count()).where(
            LedgerEntry.state == "pending", LedgerEntry.previewed_at.is_not(None)))
        oldest = await session.scalar(select(func.min(LedgerEntry.bucket_start)).where(LedgerEntry.state == "pending"))
    if isinstance(oldest, str):  # SQLite hands an aggregate back untyped
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return LedgerCounts(by_state.get("pending", 0), by_state.get("parked", 0), int(previewed or 0), oldest)


async def sync_state(redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession], *, now: float,
                     parked_limit: int = 100) -> dict[str, Any]:
    """The admin view: last pass, lag, pending and sent counts, and the parked buckets (oldest first).

    `last_run_at` is epoch seconds (None: never, or Redis unreachable); `bucket_start` epoch seconds.
    """
    last_run: float | None = None
    with contextlib.suppress(*REDIS_ERRORS, ValueError):
        raw = await redis.get(LAST_RUN_KEY)
        last_run = float(raw) if raw is not None else None
    counts = await ledger_counts(sessions)
    oldest = counts.oldest
    async with sessions() as session:
        sent_total = await session.scalar(select(func.count()).where(LedgerEntry.state == "sent"))
        parked = (await session.scalars(
            select(LedgerEntry).where(LedgerEntry.state == "parked")
            .order_by(LedgerEntry.bucket_start, LedgerEntry.tenant_id, LedgerEntry.meter).limit(parked_limit))).all()
    return {
        "last_run_at": last_run,
        "lag_seconds": max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0,
        "pending": counts.pending,
        "previewed": counts.previewed,  # dry run: pending rows shown as what would be sent
        "sent_total": int(sent_total or 0),
        "parked": [
            {"tenant": row.tenant_id, "meter": row.meter, "bucket_start": int(row.bucket_start.timestamp()),
             "reason": reason_of(row.last_error), "detail": row.last_error, "value": str(row.value),
             "identifier": row.identifier, "attempts": row.attempts}
            for row in parked
        ],
    }
