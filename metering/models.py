"""SQL schema of the gateway's store: tenants and their overrides, audit log, Stripe bookkeeping,
the usage ledger reported to Stripe and the alerts already sent.

The tables are created by Alembic (metering/migrations), never by `metadata.create_all`;
a change here needs a new revision there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from metering.clock import utcnow

# Explicit constraint names: Alembic's SQLite batch mode recreates tables and must be able to refer to
# constraints by name, and the names then match between SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LEDGER_KINDS = ("counter", "gauge")
LEDGER_STATES = ("pending", "sent", "parked")


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that always hands back aware UTC datetimes.

    PostgreSQL keeps the zone, SQLite drops it and returns naive values; storing everything in UTC
    and re-attaching UTC on the way out makes both backends compare and sort the same way.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # Naive values are taken as UTC, which is what every writer in this code base means.
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Every datetime column is a UTC timestamp; see UTCDateTime.
    type_annotation_map = {datetime: UTCDateTime()}


class Tenant(Base):
    """A customer of the platform API: its plan, lifecycle status and Stripe linkage."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    subscription_status: Mapped[str | None] = mapped_column(String(32))
    # Indexed: Stripe webhooks identify the tenant by customer id.
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), index=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    billing_anchor_day: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Indexed: workers poll "changed since my watermark" to refresh their tenant cache.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)
    # Time of the newest Stripe event applied, so an older event delivered late does not win.
    stripe_event_at: Mapped[datetime | None] = mapped_column()
    # When the subscription became past due (kept across later events of the same spell): the grace
    # of billing.stripe.past_due_grace_days counts from here.
    past_due_since: Mapped[datetime | None] = mapped_column()


class TenantOverride(Base):
    """A per-tenant replacement of one meter's plan limit, optionally expiring."""

    __tablename__ = "tenant_overrides"

    tenant_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    # "limit" is a reserved word in SQL; the column gets a safe name, the attribute the natural one.
    limit: Mapped[int | None] = mapped_column("limit_value", BigInteger)  # None = unlimited
    per_second: Mapped[float | None] = mapped_column(Float)
    burst: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column()
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # "on" or "shadow" (the limit only reports what it would refuse); NULL, in rows older than it, is "on".
    enforce: Mapped[str | None] = mapped_column(String(16))


class AuditEntry(Base):
    """One admin change: who did what to which tenant, with the state before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    # No foreign key: the audit trail must outlive the tenant it describes.
    tenant_id: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class StripeEvent(Base):
    """A Stripe webhook event already processed; Stripe retries deliveries, we apply each once."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """Usage of one tenant, meter and time bucket, queued for reporting to Stripe."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        CheckConstraint(f"kind IN {LEDGER_KINDS!r}", name="kind"),
        CheckConstraint(f"state IN {LEDGER_STATES!r}", name="state"),
        # The sender's page order (billing_sync.queries.due_page): pending rows are read along this index
        # instead of sorted. Its first column also serves every query by state.
        Index("ix_usage_ledger_pending_order", "state", "bucket_start", "tenant_id", "meter"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    value: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    kind: Mapped[str] = mapped_column(String(16))
    # Indexed with the page order of the sender (ix_usage_ledger_pending_order).
    state: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    # Sent to Stripe as the meter event identifier: unique, so a retried send is deduplicated by Stripe.
    identifier: Mapped[str] = mapped_column(String(100), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The first send to Stripe: past 23 hours, Stripe's summaries are checked before a resend.
    first_attempt_at: Mapped[datetime | None] = mapped_column()
    # Dry run: when the row was last shown as what would be sent (it stays unsent).
    previewed_at: Mapped[datetime | None] = mapped_column()


class AlertEvent(Base):
    """A usage alert already sent: one per tenant, meter, period and threshold."""

    __tablename__ = "alert_events"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    meter: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    threshold: Mapped[float] = mapped_column(Float, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    value: Mapped[float] = mapped_column(Float)
