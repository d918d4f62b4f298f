"""Projects get the acquisition, uncertainty and stopping settings of issue 17.

``hybrid_share``, ``kmeans_pick``, ``mc_dropout_samples``, the stopping thresholds
(``stop_max_change``, ``stop_min_kappa``, ``stop_patience``, ``stop_max_uncertainty``) and
the online resampling period ``resampling_every`` and ``harmony`` (integrate expression
across datasets); existing projects get the defaults.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS: tuple[tuple[str, sa.types.TypeEngine, str | sa.sql.ColumnElement[Any]], ...] = (
    ("hybrid_share", sa.Float(), "0.7"),
    ("kmeans_pick", sa.String(32), "closest_to_centroid"),
    ("mc_dropout_samples", sa.Integer(), "0"),
    ("stop_max_change", sa.Float(), "0.01"),
    ("stop_min_kappa", sa.Float(), "0.95"),
    ("stop_patience", sa.Integer(), "2"),
    ("stop_max_uncertainty", sa.Float(), "0"),
    ("resampling_every", sa.Integer(), "5"),
    ("harmony", sa.Boolean(), sa.false()),
)


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("projects") as batch:
        for name, type_, default in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=False, server_default=default))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("projects") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
