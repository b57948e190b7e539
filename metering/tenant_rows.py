"""The one writer of tenant rows: create or update a tenant, with its audit entry, in the caller's transaction.

    change = await write_tenant(session, "acme", {"plan": "team"}, audited=OPERATOR_FIELDS,
                                actor="token:ops", action="tenant.update", create_action="tenant.create",
                                at=audit_time, updated_at=now)

The admin API and the Stripe webhooks both write through it. An audit entry is added only when the
audited fields changed (a created row always is one: `before` None), so a repeated PUT or a redelivered
state leaves no trace. Two ways to guard against a concurrent writer:

- without `expected`, the row is read here `FOR UPDATE` and written through the ORM (the admin API);
- with `expected` (the row the caller read and decided from, or None when it read none) the write is a
  compare-and-set, real on SQLite too, where `FOR UPDATE` is a no-op: `UPDATE ... WHERE <the columns read
  are unchanged>`; when another writer changed the row meanwhile nothing is written and RowChanged is
  raised, so the caller decides again from the new row (the Stripe webhooks).

A concurrent creation of the same tenant fails at the flush with IntegrityError; the caller retries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, update
from sqlalchemy.ext.asyncio import AsyncSession

from metering.models import AuditEntry, Tenant


class _Unread:
    """The default of `expected`: the caller read nothing; the row is read here."""


READ_HERE: Final = _Unread()


class RowChanged(Exception):
    """The tenant row changed between the caller's read and this write: decide again from the new row."""


@dataclass(frozen=True, slots=True)
class TenantChange:
    """The audited fields of a tenant row before (None: created by this write) and after it."""

    before: dict[str, Any] | None
    after: dict[str, Any]

    @property
    def created(self) -> bool:
        return self.before is None

    @property
    def changed(self) -> bool:
        return self.after != self.before


def tenant_state(row: Tenant, fields: Sequence[str]) -> dict[str, Any]:
    """The `fields` of a tenant row, as an audit entry shows them."""
    return {field: getattr(row, field) for field in fields}


async def write_tenant(session: AsyncSession, tenant_id: str, values: Mapping[str, Any], *,
                       audited: Sequence[str], actor: str, action: str, at: datetime, updated_at: datetime,
                       create_action: str | None = None, defaults: Mapping[str, Any] | None = None,
                       expected: Tenant | _Unread | None = READ_HERE) -> TenantChange:
    """Set `values` on tenant `tenant_id`, creating it (status active, then `defaults`) if it has no row.

    `updated_at` is the row's new `updated_at` (and a new row's `created_at`): written when the row is
    created or an `audited` field changes; a caller whose `values` must reach the other instances even
    when no audited field moves puts `updated_at` in `values`. The audit entry (`action`, or
    `create_action` for a new row) is stamped `at`. `expected`: the row as the caller read it, for a
    compare-and-set (see above); RowChanged when it is no longer so.
    """
    row = (await session.get(Tenant, tenant_id, with_for_update=True) if isinstance(expected, _Unread)
           else expected)
    if row is None:
        new = Tenant(**{"id": tenant_id, "status": "active", **(defaults or {}), "created_at": updated_at,
                        "updated_at": updated_at, **values})
        session.add(new)
        await session.flush()  # a concurrent creation of the tenant fails here: IntegrityError
        change = TenantChange(None, tenant_state(new, audited))
    else:
        before = tenant_state(row, audited)
        change = TenantChange(before, before | {k: v for k, v in values.items() if k in before})
        written = dict(values)
        if change.changed:
            written.setdefault("updated_at", updated_at)
        if isinstance(expected, _Unread):
            for field, value in written.items():
                setattr(row, field, value)
        else:
            # The compare-and-set: written only if the row is still what the caller decided from. On
            # PostgreSQL the caller's row lock already serializes; on SQLite nothing else would.
            result = await session.execute(
                update(Tenant).where(Tenant.id == tenant_id, *_unchanged(row)).values(**written)
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise RowChanged(tenant_id)
    if change.changed:
        if change.created and create_action is not None:
            action = create_action
        session.add(AuditEntry(at=at, actor=actor, tenant_id=tenant_id, action=action, before=change.before,
                               after=change.after))
    return change


def _unchanged(row: Tenant) -> list[ColumnElement[bool]]:
    """Conditions that hold while the row is what was read (NULL-safe: IS NOT DISTINCT FROM, SQLite IS).

    The columns a Stripe event's decision reads; the others (billing anchor, times) never decide one.
    """
    return [column.is_not_distinct_from(getattr(row, column.key)) for column in (
        Tenant.plan, Tenant.status, Tenant.subscription_status, Tenant.stripe_customer_id,
        Tenant.stripe_subscription_id, Tenant.stripe_event_at, Tenant.past_due_since)]
