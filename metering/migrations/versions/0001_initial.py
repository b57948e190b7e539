"""Initial schema: tenants, overrides, audit log, Stripe events, usage ledger, alert events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Tables are spelled out here rather than derived from metering.models: a revision must keep creating
the schema as it was at this revision, whatever the models look like later. Constraint names follow
the naming convention of metering.models.Base so later revisions (and SQLite batch mode) can find them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)

    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("plan", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("subscription_status", sa.String(32), nullable=True),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(255), nullable=True),
        sa.Column("billing_anchor_day", sa.Integer(), nullable=True),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        sa.Column("stripe_event_at", tz, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_index(op.f("ix_tenants_stripe_customer_id"), "tenants", ["stripe_customer_id"])
    op.create_index(op.f("ix_tenants_updated_at"), "tenants", ["updated_at"])

    op.create_table(
        "tenant_overrides",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("meter", sa.String(64), nullable=False),
        sa.Column("limit_value", sa.BigInteger(), nullable=True),
        sa.Column("per_second", sa.Float(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column("expires_at", tz, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", tz, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_overrides_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "meter", name=op.f("pk_tenant_overrides")),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", tz, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_tenant_id"), "audit_log", ["tenant_id"])

    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("received_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )

    op.create_table(
        "usage_ledger",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("meter", sa.String(64), nullable=False),
        sa.Column("bucket_start", tz, nullable=False),
        sa.Column("value", sa.Numeric(20, 6), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", tz, nullable=True),
        sa.Column("sent_at", tz, nullable=True),
        sa.Column("created_at", tz, nullable=False),
        sa.CheckConstraint("kind IN ('counter', 'gauge')", name=op.f("ck_usage_ledger_kind")),
        sa.CheckConstraint("state IN ('pending', 'sent', 'parked')", name=op.f("ck_usage_ledger_state")),
        sa.PrimaryKeyConstraint("tenant_id", "meter", "bucket_start", name=op.f("pk_usage_ledger")),
        sa.UniqueConstraint("identifier", name=op.f("uq_usage_ledger_identifier")),
    )
    op.create_index(op.f("ix_usage_ledger_state"), "usage_ledger", ["state"])

    op.create_table(
        "alert_events",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("meter", sa.String(64), nullable=False),
        sa.Column("period_start", tz, nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("at", tz, nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "meter", "period_start", "threshold", name=op.f("pk_alert_events")
        ),
    )


def downgrade() -> None:
    op.drop_table("alert_events")
    op.drop_index(op.f("ix_usage_ledger_state"), table_name="usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_table("stripe_events")
    op.drop_index(op.f("ix_audit_log_tenant_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("tenant_overrides")
    op.drop_index(op.f("ix_tenants_updated_at"), table_name="tenants")
    op.drop_index(op.f("ix_tenants_stripe_customer_id"), table_name="tenants")
    op.drop_table("tenants")
