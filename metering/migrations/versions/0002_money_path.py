"""Money path columns: when a subscription became past due, and when a ledger row was first attempted
or previewed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

- `tenants.past_due_since`: the past-due grace counts from when the subscription became past due, kept
  across later events of the same past-due spell (PRODUCT.md §8).
- `usage_ledger.first_attempt_at`: the time of the first send to Stripe; a row first attempted more than
  23 hours ago is checked against Stripe's event summaries before it is sent again (Stripe deduplicates
  identifiers for 24 hours only).
- `usage_ledger.previewed_at`: dry run records what would be sent here, and leaves the row unsent.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.add_column("tenants", sa.Column("past_due_since", tz, nullable=True))
    op.add_column("usage_ledger", sa.Column("first_attempt_at", tz, nullable=True))
    op.add_column("usage_ledger", sa.Column("previewed_at", tz, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("previewed_at")
        batch.drop_column("first_attempt_at")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("past_due_since")
