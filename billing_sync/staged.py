"""A staged bucket and the ledger rows it becomes: the SQL side of a move (`billing_sync.ledger`).

The mover stages a bucket in Redis, then `plan_moves` decides for it (one read for a whole group: which of
its meters are billed already, where its leftovers go), and after the plan is stored with the staged hash,
`commit_rows` writes its rows, all of a group's in one transaction and one INSERT, ignoring rows already
there. `split_rows` and `leftover_rows` say which rows a staged bucket makes under its plan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, func, literal, select
from sqlalchemy import insert as generic_insert
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.buckets import (
    bucket_datetime,
    bucket_identifier,
    carry_target,
    leftover_identifier,
    parse_bucket_value,
)
from billing_sync.queries import IN_CHUNK, among, planned_per_run
from metering.meters import Meter
from metering.models import LedgerEntry, Tenant

log = logging.getLogger("cosmos_gateway.billing_sync")

REFUND_NOT_NETTED = "refund_not_netted"
_ROWS_PER_STATEMENT = 2000  # new ledger rows per INSERT (a group's rows, mostly)

_LEDGER = LedgerEntry.__table__
# The columns every new row names (`split_rows`, `leftover_rows`), and the types PostgreSQL receives them as:
# plain timestamptz for the datetimes, which are UTC already (no per-value conversion in Python).
_ROW_COLUMNS = ("tenant_id", "meter", "bucket_start", "value", "kind", "state", "identifier", "attempts",
                "created_at", "last_error")
_PG_ARRAY_TYPES = {name: ARRAY(DateTime(timezone=True) if name in ("bucket_start", "created_at")
                               else _LEDGER.c[name].type) for name in _ROW_COLUMNS}


def _insert_ignoring_conflicts(dialect: str, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(statement, parameters) that insert `rows`, leaving a row already there alone.

    PostgreSQL: one INSERT ... SELECT unnest(:column_array), ... (an array a column, encoded by asyncpg in C;
    40 % less time than a statement run per row). SQLite: one statement run per row (executemany), which
    SQLite loops over in C. Other backends: a repeat raises instead.
    """
    if dialect == "postgresql":
        arrays = [func.unnest(literal([row[name] for row in rows], _PG_ARRAY_TYPES[name])) for name in _ROW_COLUMNS]
        return pg_insert(_LEDGER).from_select(_ROW_COLUMNS, select(*arrays)).on_conflict_do_nothing(), None
    if dialect == "sqlite":
        return sqlite_insert(_LEDGER).on_conflict_do_nothing(), rows
    return generic_insert(_LEDGER), rows


@dataclass
class Plan:
    """What a mover decided for one staged bucket, stored with it before the ledger commit.

    A pass interrupted after the commit finds the plan and repeats exactly the same work: the rows are
    inserted ignoring conflicts, the leftovers go where they were meant to go, nothing vanishes or doubles.
    """

    billed: list[str]  # meters whose row was in the ledger before this staging: their units are late
    target: int | None  # bucket the leftovers are carried into; None: the period ends, they become rows
    slot: int  # microsecond offset of the leftover rows from the bucket start (never a real bucket's start)

    def dump(self) -> str:
        return json.dumps({"billed": self.billed, "target": self.target, "slot": self.slot})

    @classmethod
    def load(cls, raw: Any) -> Plan | None:
        try:
            data = json.loads(raw)
            return cls(list(data["billed"]), data["target"], int(data["slot"]))
        except (TypeError, ValueError, KeyError):
            return None


@dataclass
class Staged:
    """One staged bucket on its way into the ledger."""

    staging: str
    lock: str
    token: str
    tenant: str
    bucket_start: int
    raw: dict[str, Any]
    plan: Plan | None = None
    plan_stored: bool = False  # `plan` was read from the staged hash, where an earlier pass stored it
    fields: list[tuple[str, Meter | None, Decimal, str]] | None = None  # `billable_fields`, read once
    split: tuple[list[dict[str, Any]], dict[str, int]] | None = None  # `split_rows`, made once under the plan


def billable_fields(staged: Staged, meters: Mapping[str, Meter]) -> list[tuple[str, Meter | None, Decimal, str]]:
    """(meter name, meter, value, identifier) of the staged bucket's fields that may be billed."""
    if staged.fields is not None:
        return staged.fields
    out = []
    for field, raw_value in staged.raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        if name.startswith("~"):
            continue
        meter = meters.get(name)
        if meter is not None and meter.stripe_event is None:
            continue  # not billed: leaves with the bucket, refunds included
        value = parse_bucket_value(raw_value)
        if value is None:
            log.error("bucket %s: meter %s holds %r, not a number; not billed", staged.staging, name, raw_value)
            continue
        out.append((name, meter, value, bucket_identifier(staged.tenant, name, staged.bucket_start)))
    staged.fields = out
    return out


def split_rows(staged: Staged, meters: Mapping[str, Meter],
           created_at: datetime) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The staged bucket's new ledger rows, and its leftovers (meter -> units) to net in a later bucket.

    Made once per bucket (the commit and the carry both ask): the plan is fixed by then."""
    assert staged.plan is not None
    if staged.split is not None:
        return staged.split
    rows: list[dict[str, Any]] = []
    leftovers: dict[str, int] = {}
    for name, meter, value, identifier in billable_fields(staged, meters):
        kind = meter.kind if meter is not None else "counter"
        if value < 0:
            # A refund that arrived after its own bucket closed: netted against a later bucket.
            leftovers[name] = leftovers.get(name, 0) + int(value)
            continue
        if name in staged.plan.billed:
            if kind == "counter" and value:
                leftovers[name] = leftovers.get(name, 0) + int(value)  # late units: with a later bucket
            log.warning("bucket %s of %s: %s %s arrived after it was billed; %s", staged.bucket_start, staged.tenant,
                        value, name, "carried" if kind == "counter" else "a gauge keeps its billed value")
            continue
        # A counter's empty bucket is not sent. A gauge field exists only when the upstream reported it,
        # and its Stripe meter keeps the last value: a drop to 0 must reach Stripe too.
        if value == 0 and kind == "counter":
            continue
        rows.append({
            "tenant_id": staged.tenant, "meter": name, "bucket_start": bucket_datetime(staged.bucket_start),
            "value": value, "kind": kind, "state": "pending", "identifier": identifier, "attempts": 0,
            "created_at": created_at, "last_error": None,  # every row names the same columns (_ROW_COLUMNS)
        })
    staged.split = rows, {name: units for name, units in leftovers.items() if units}
    return staged.split


def _leftover_meters(staged: Staged, meters: Mapping[str, Meter]) -> list[str]:
    """The meters whose units `split_rows` will leave over under the plan: refunds, late units of a counter."""
    assert staged.plan is not None
    return [name for name, meter, value, _ in billable_fields(staged, meters)
            if int(value) and (value < 0 or (name in staged.plan.billed
                                             and (meter is None or meter.kind == "counter")))]


def leftover_rows(staged: Staged, leftovers: Mapping[str, int], created_at: datetime) -> list[dict[str, Any]]:
    """Leftovers the period could not net, as rows of that period: late units are billed, refunds parked."""
    assert staged.plan is not None and staged.plan.target is None
    at = bucket_datetime(staged.bucket_start) + timedelta(microseconds=staged.plan.slot)
    rows = []
    for name, units in leftovers.items():
        refund = units < 0
        rows.append({
            "tenant_id": staged.tenant, "meter": name, "bucket_start": at, "value": Decimal(units),
            "kind": "counter", "state": "parked" if refund else "pending",
            "identifier": leftover_identifier(staged.tenant, name, staged.bucket_start, staged.plan.slot),
            "attempts": 0, "created_at": created_at,
            "last_error": f"{REFUND_NOT_NETTED}: {-units} refunded after the period's usage was billed; "
                          "Stripe takes no negative usage (credit the customer)" if refund else None,
        })
        log.warning("bucket %s of %s: %s %s left at the end of the billing period: %s", staged.bucket_start,
                    staged.tenant, units, name, "parked" if refund else "billed on its own")
    return rows


async def plan_moves(sessions: async_sessionmaker[AsyncSession], items: list[Staged], meters: Mapping[str, Meter],
                now: float, bucket_seconds: int) -> None:
    """Decide, for the items without a plan, which units are late and where leftovers go (one read)."""
    todo = [item for item in items if item.plan is None]
    if not todo:
        return
    ids = [identifier for item in todo for _, _, _, identifier in billable_fields(item, meters)]
    tenants = list({item.tenant for item in todo})
    billed: set[str] = set()
    anchors: dict[str, int | None] = {}
    async with sessions() as session:
        dialect = await planned_per_run(session)
        for i in range(0, len(ids), IN_CHUNK):
            billed |= set((await session.scalars(select(LedgerEntry.identifier).where(
                among(LedgerEntry.identifier, ids[i : i + IN_CHUNK], dialect)))).all())
        for i in range(0, len(tenants), IN_CHUNK):
            anchors.update((await session.execute(select(Tenant.id, Tenant.billing_anchor_day).where(
                among(Tenant.id, tenants[i : i + IN_CHUNK], dialect)))).tuples().all())
        targets: dict[tuple[int, int | None], int | None] = {}  # most tenants share bucket and anchor
        for item in todo:
            anchor = anchors.get(item.tenant)
            if (item.bucket_start, anchor) not in targets:
                targets[(item.bucket_start, anchor)] = carry_target(item.bucket_start, bucket_seconds, now, anchor)
            target = targets[(item.bucket_start, anchor)]
            item.plan = Plan([name for name, _, _, identifier in billable_fields(item, meters) if identifier in billed],
                              target, 1)
            # Leftover rows need a free slot only when the period ends and there are leftovers: at a period's
            # end that is a few buckets, not every tenant's last one.
            if target is None and (names := _leftover_meters(item, meters)):
                item.plan.slot = await _free_slot(session, item, names)


async def _free_slot(session: AsyncSession, item: Staged, names: list[str]) -> int:
    """A microsecond offset within the bucket's first second that no leftover row of the tenant's meters `names`
    uses yet (a leftover row's key and identifier hold its meter). Read along the primary key."""
    start = bucket_datetime(item.bucket_start)
    taken = (await session.scalars(select(LedgerEntry.bucket_start).where(
        LedgerEntry.tenant_id == item.tenant, LedgerEntry.meter.in_(names), LedgerEntry.bucket_start > start,
        LedgerEntry.bucket_start < start + timedelta(seconds=1)))).all()
    return 1 + max((at.microsecond for at in taken), default=0)


async def commit_rows(sessions: async_sessionmaker[AsyncSession], items: list[Staged], meters: Mapping[str, Meter],
                  created_at: datetime) -> None:
    """The items' ledger rows in one transaction (one fsync for many buckets), ignoring rows already there.

    Every decision was taken by the plan, so committing again after an interruption adds nothing.
    """
    rows: list[dict[str, Any]] = []
    for item in items:
        new, leftovers = split_rows(item, meters, created_at)
        rows += new
        if item.plan is not None and item.plan.target is None:
            rows += leftover_rows(item, leftovers, created_at)
    if not rows:
        return
    async with sessions() as session, session.begin():
        dialect = session.get_bind().dialect.name
        for i in range(0, len(rows), _ROWS_PER_STATEMENT):
            await session.execute(*_insert_ignoring_conflicts(dialect, rows[i : i + _ROWS_PER_STATEMENT]))
