"""failed_operations.suspended: a FailedOperation resource's spec.suspend, honoured by every claim

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a constant default: PostgreSQL adds the column without rewriting the table
    op.add_column(
        "failed_operations",
        sa.Column("suspended", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("failed_operations", "suspended")
