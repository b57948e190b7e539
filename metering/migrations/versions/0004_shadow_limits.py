"""Shadow limits: an override may only report what it would refuse (`tenant_overrides.enforce`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08

`tenant_overrides.enforce` is "on" or "shadow" (PRODUCT.md §6a: a quota, a rate or an override may say
`enforce: shadow`; what it would refuse is served, counted and shown per tenant). Nullable, with no default
written into existing rows: NULL reads as "on", which is what every override before this revision was.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenant_overrides", sa.Column("enforce", sa.String(16), nullable=True))


def downgrade() -> None:
    # A shadow override would be read as an enforced one by the code of 0003, which knows no other kind:
    # dropped with the column, rather than enforced by surprise.
    op.execute("DELETE FROM tenant_overrides WHERE enforce = 'shadow'")
    with op.batch_alter_table("tenant_overrides") as batch:
        batch.drop_column("enforce")
