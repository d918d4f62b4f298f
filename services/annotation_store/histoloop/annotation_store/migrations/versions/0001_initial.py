"""Initial schema: projects, classes, datasets, spots, annotators, labels, query sets, outbox.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21
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
    """Apply this revision."""
    op.create_table(
        "annotators",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotators")),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label_version", sa.BigInteger(), nullable=False),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("cold_start_strategy", sa.String(length=64), nullable=False),
        sa.Column("query_size", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("head", sa.String(length=32), nullable=False),
        sa.Column("features", sa.String(length=32), nullable=False),
        sa.Column("spatial_neighbours", sa.Integer(), nullable=False),
        sa.Column("resampling", sa.String(length=16), nullable=False),
        sa.Column("consensus", sa.String(length=32), nullable=False),
        sa.Column("adjudication_share", sa.Float(), nullable=False),
        sa.Column("compactness", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )
    op.create_table(
        "annotator_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"],
            ["annotators.id"],
            name=op.f("fk_annotator_tokens_annotator_id_annotators"),
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_annotator_tokens")),
    )
    with op.batch_alter_table("annotator_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_annotator_tokens_annotator_id"), ["annotator_id"], unique=False
        )

    op.create_table(
        "datasets",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("dataset_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("slide_uri", sa.Text(), nullable=False),
        sa.Column("spatial_uri_prefix", sa.Text(), nullable=False),
        sa.Column("expression_uri", sa.Text(), nullable=False),
        sa.Column("slide_scale", sa.Float(), nullable=False),
        sa.Column("context", sa.Float(), nullable=False),
        sa.Column("mpp", sa.Float(), nullable=False),
        sa.Column("tile_size", sa.Integer(), nullable=False),
        sa.Column("n_spots", sa.Integer(), nullable=False),
        sa.Column("n_in_tissue", sa.Integer(), nullable=False),
        sa.Column("embeddings_uri", sa.Text(), nullable=False),
        sa.Column("embeddings_event_id", sa.String(length=64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_datasets_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint(
            "project_id", "dataset_id", name=op.f("uq_datasets_project_id_dataset_id")
        ),
    )
    op.create_table(
        "memberships",
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_memberships_annotator_id_annotators")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_memberships_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("annotator_id", "project_id", name=op.f("pk_memberships")),
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("label_version", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_outbox_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outbox_published_at_id"), ["published_at", "id"], unique=False
        )

    op.create_table(
        "project_classes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("color", sa.String(length=7), nullable=False),
        sa.Column("since_version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_project_classes_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project_classes")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_project_classes_project_id_name")),
        sa.UniqueConstraint(
            "project_id", "position", name=op.f("uq_project_classes_project_id_position")
        ),
    )
    op.create_table(
        "query_sets",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("queryset_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("label_version", sa.BigInteger(), nullable=False),
        sa.Column("queryset_uri", sa.Text(), nullable=False),
        sa.Column("predictions_uri", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("stopping", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_query_sets_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_sets")),
        sa.UniqueConstraint("event_id", name=op.f("uq_query_sets_event_id")),
        sa.UniqueConstraint(
            "project_id", "queryset_id", name=op.f("uq_query_sets_project_id_queryset_id")
        ),
    )
    op.create_table(
        "label_batches",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("batch_id", sa.String(length=128), nullable=False),
        sa.Column(
            "dataset_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("queryset_id", sa.String(length=128), nullable=False),
        sa.Column("label_version", sa.BigInteger(), nullable=False),
        sa.Column("n_labels", sa.Integer(), nullable=False),
        sa.Column("n_placeholders", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"],
            ["annotators.id"],
            name=op.f("fk_label_batches_annotator_id_annotators"),
        ),
        sa.ForeignKeyConstraint(
            ["dataset_pk"], ["datasets.id"], name=op.f("fk_label_batches_dataset_pk_datasets")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_label_batches_project_id_projects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_batches")),
        sa.UniqueConstraint(
            "project_id", "batch_id", name=op.f("uq_label_batches_project_id_batch_id")
        ),
    )
    op.create_table(
        "query_set_spots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "queryset_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.String(length=128), nullable=False),
        sa.Column("barcode", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["queryset_pk"],
            ["query_sets.id"],
            name=op.f("fk_query_set_spots_queryset_pk_query_sets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_set_spots")),
        sa.UniqueConstraint(
            "queryset_pk", "position", name=op.f("uq_query_set_spots_queryset_pk_position")
        ),
    )
    op.create_table(
        "rounds",
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column(
            "queryset_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("label_version", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_rounds_project_id_projects")
        ),
        sa.ForeignKeyConstraint(
            ["queryset_pk"], ["query_sets.id"], name=op.f("fk_rounds_queryset_pk_query_sets")
        ),
        sa.PrimaryKeyConstraint("project_id", "round", name=op.f("pk_rounds")),
    )
    op.create_table(
        "spots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "dataset_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("barcode", sa.String(length=64), nullable=False),
        sa.Column("in_tissue", sa.Boolean(), nullable=False),
        sa.Column("array_row", sa.Integer(), nullable=False),
        sa.Column("array_col", sa.Integer(), nullable=False),
        sa.Column("pxl_row", sa.Float(), nullable=False),
        sa.Column("pxl_col", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_pk"], ["datasets.id"], name=op.f("fk_spots_dataset_pk_datasets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spots")),
        sa.UniqueConstraint("dataset_pk", "barcode", name=op.f("uq_spots_dataset_pk_barcode")),
    )
    op.create_table(
        "label_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.String(length=63), nullable=False),
        sa.Column("batch_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("spot_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("class_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("annotator_role", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("label_version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"],
            ["annotators.id"],
            name=op.f("fk_label_events_annotator_id_annotators"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_pk"], ["label_batches.id"], name=op.f("fk_label_events_batch_pk_label_batches")
        ),
        sa.ForeignKeyConstraint(
            ["class_id"],
            ["project_classes.id"],
            name=op.f("fk_label_events_class_id_project_classes"),
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_label_events_project_id_projects")
        ),
        sa.ForeignKeyConstraint(
            ["spot_id"], ["spots.id"], name=op.f("fk_label_events_spot_id_spots")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_events")),
    )
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_label_events_project_id_label_version"),
            ["project_id", "label_version"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_label_events_spot_id"), ["spot_id"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_events_spot_id"))
        batch_op.drop_index(batch_op.f("ix_label_events_project_id_label_version"))

    op.drop_table("label_events")
    op.drop_table("spots")
    op.drop_table("rounds")
    op.drop_table("query_set_spots")
    op.drop_table("label_batches")
    op.drop_table("query_sets")
    op.drop_table("project_classes")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_published_at_id"))

    op.drop_table("outbox")
    op.drop_table("memberships")
    op.drop_table("datasets")
    with op.batch_alter_table("annotator_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotator_tokens_annotator_id"))

    op.drop_table("annotator_tokens")
    op.drop_table("projects")
    op.drop_table("annotators")
