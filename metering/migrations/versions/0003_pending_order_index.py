"""The ledger's pending rows in the sender's order: an index on (state, bucket_start, tenant_id, meter).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

The sync worker reads pending rows a page at a time, `WHERE state = 'pending' ... ORDER BY bucket_start,
tenant_id, meter` after the last key of the previous page (`billing_sync.queries.due_page`). With only an
index on `state`, every page sorted every pending row: at 100,000 tenants each page of 5,000 rows cost a sort
of the whole backlog. `ix_usage_ledger_pending_order` holds the rows in that order, so a page is a walk of the
index from the previous page's key.

It replaces `ix_usage_ledger_state`, which is its first column: every query that used that index (counts by
state, parked rows, sent rows of a period) can use this one, and a ledger write keeps one index fewer up to date.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_usage_ledger_pending_order"), "usage_ledger",
                    ["state", "bucket_start", "tenant_id", "meter"])
    op.drop_index(op.f("ix_usage_ledger_state"), table_name="usage_ledger")


def downgrade() -> None:
    op.create_index(op.f("ix_usage_ledger_state"), "usage_ledger", ["state"])
    op.drop_index(op.f("ix_usage_ledger_pending_order"), table_name="usage_ledger")
