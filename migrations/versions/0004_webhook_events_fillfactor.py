"""webhook_events pages keep half their space free, so a claim's update stays on its page

A claim changes only the lease columns, which no index holds: with room on the page PostgreSQL
updates the row in place (a HOT update), with no new index entries and a fraction of the WAL.
Pages filled to the brim made every claim write a new row version and five index entries
(docs/performance.md). Existing pages get the free space as they are rewritten.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 50


def upgrade() -> None:
    op.execute(f"ALTER TABLE webhook_events SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    op.execute("ALTER TABLE webhook_events RESET (fillfactor)")
