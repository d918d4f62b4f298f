"""Projects get ``augment_views`` (ActiveVisium repetitions, default 10); datasets record the
embedding model that made their latest embeddings (name, version, vector length).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("projects") as batch:
        batch.add_column(
            sa.Column("augment_views", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(
            sa.Column("embedding_model", sa.String(128), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("embedding_model_version", sa.String(128), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("embedding_dim", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("embedding_dim")
        batch.drop_column("embedding_model_version")
        batch.drop_column("embedding_model")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("augment_views")
