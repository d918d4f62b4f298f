"""Recovery: soft-removed datasets and the audit history of loop-config changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("removed_by", sa.String(length=128), nullable=False, server_default="")
        )
    op.create_table(
        "project_config_changes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=False),
        sa.Column("after", sa.JSON(), nullable=False),
        sa.Column("from_label_version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_config_changes_project_id_projects"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project_config_changes")),
    )
    with op.batch_alter_table("project_config_changes") as batch:
        batch.create_index(
            batch.f("ix_project_config_changes_project_id"), ["project_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("project_config_changes") as batch:
        batch.drop_index(batch.f("ix_project_config_changes_project_id"))
    op.drop_table("project_config_changes")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("removed_by")
        batch.drop_column("removed_at")
