"""Projects get ``preset`` ('' = the evidence defaults; ``activevisium`` = the paper's) and
``semi_supervised`` (pseudo-label threshold of label spreading; 0 = off) loop settings.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("preset", sa.String(32), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("semi_supervised", sa.Float(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("semi_supervised")
        batch.drop_column("preset")
