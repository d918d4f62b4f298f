"""The annotation store's tables (SQLAlchemy 2 declarative models).

The same schema runs on SQLite (embedded default) and PostgreSQL (distributed mode); it
is created and changed only by the Alembic migrations in ``migrations/versions``, which
a test compares with these models on both databases.

Label events are append-only: nothing ever updates or deletes a row of ``label_events``;
a correction is a new event. ``outbox`` rows are written in the same transaction as the
change they announce and are marked published by the relay.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false as sa_false

__all__ = [
    "Annotator",
    "AnnotatorToken",
    "Base",
    "Dataset",
    "LabelBatch",
    "LabelEvent",
    "Membership",
    "Outbox",
    "Project",
    "ProjectClass",
    "ProjectConfigChange",
    "QuerySet",
    "QuerySetSpot",
    "Round",
    "Spot",
]

# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets BIGINT identities.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention (stable constraint names for migrations)."""

    metadata = MetaData(naming_convention=NAMING)
    __table__: ClassVar[
        Table
    ]  # every model here maps one table (SQLAlchemy types it as any FromClause)


class Project(Base):
    """A project: its class schema (in :class:`ProjectClass`) and its loop configuration."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    label_version: Mapped[int] = mapped_column(BigInteger, default=0)
    """Committed label batches so far; bumped (row-locked) by each batch."""
    # LoopConfig
    strategy: Mapped[str] = mapped_column(String(64))
    cold_start_strategy: Mapped[str] = mapped_column(String(64))
    query_size: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    head: Mapped[str] = mapped_column(String(32))
    features: Mapped[str] = mapped_column(String(32))
    spatial_neighbours: Mapped[int] = mapped_column(Integer)
    resampling: Mapped[str] = mapped_column(String(16))
    consensus: Mapped[str] = mapped_column(String(32))
    adjudication_share: Mapped[float] = mapped_column(Float)
    compactness: Mapped[float] = mapped_column(Float)
    smoothing: Mapped[float] = mapped_column(Float, server_default="0")
    hybrid_share: Mapped[float] = mapped_column(Float, server_default="0.7")
    kmeans_pick: Mapped[str] = mapped_column(String(32), server_default="closest_to_centroid")
    mc_dropout_samples: Mapped[int] = mapped_column(Integer, server_default="0")
    stop_max_change: Mapped[float] = mapped_column(Float, server_default="0.01")
    stop_min_kappa: Mapped[float] = mapped_column(Float, server_default="0.95")
    stop_patience: Mapped[int] = mapped_column(Integer, server_default="2")
    stop_max_uncertainty: Mapped[float] = mapped_column(Float, server_default="0")
    resampling_every: Mapped[int] = mapped_column(Integer, server_default="5")
    harmony: Mapped[bool] = mapped_column(Boolean, server_default=sa_false())
    preset: Mapped[str] = mapped_column(String(32), server_default="")
    semi_supervised: Mapped[float] = mapped_column(Float, server_default="0")
    augment_views: Mapped[int] = mapped_column(Integer, server_default="0")


class ProjectClass(Base):
    """One class of a project's schema; ``position`` orders them, names are never changed."""

    __tablename__ = "project_classes"
    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        UniqueConstraint("project_id", "position"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    color: Mapped[str] = mapped_column(String(7))
    since_version: Mapped[int] = mapped_column(BigInteger)
    """The first label version whose schema includes this class."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Dataset(Base):
    """A registered Visium sample or WSI, with the artifact URIs of its copied inputs."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("project_id", "dataset_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    dataset_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    slide_uri: Mapped[str] = mapped_column(Text, default="")
    spatial_uri_prefix: Mapped[str] = mapped_column(Text, default="")
    expression_uri: Mapped[str] = mapped_column(Text, default="")
    slide_scale: Mapped[float] = mapped_column(Float, default=1.0)
    context: Mapped[float] = mapped_column(Float, default=1.0)
    mpp: Mapped[float] = mapped_column(Float, default=0.0)
    tile_size: Mapped[int] = mapped_column(Integer, default=0)
    n_spots: Mapped[int] = mapped_column(Integer, default=0)
    n_in_tissue: Mapped[int] = mapped_column(Integer, default=0)
    embeddings_uri: Mapped[str] = mapped_column(Text, default="")
    embeddings_event_id: Mapped[str] = mapped_column(String(64), default="")
    embedding_model: Mapped[str] = mapped_column(String(128), default="", server_default="")
    embedding_model_version: Mapped[str] = mapped_column(String(128), default="", server_default="")
    embedding_dim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """Set by RemoveDataset: out of the pool (soft; its spots and labels stay)."""
    removed_by: Mapped[str] = mapped_column(String(128), default="", server_default="")


class Spot(Base):
    """One labelled unit of a dataset: a Visium spot (a row of ``tissue_positions*.csv``) or,
    in a WSI dataset, a tissue tile ``r<row>_c<col>`` (``array_row``/``array_col`` = grid row
    and column, ``pxl_row``/``pxl_col`` = its centre in level-0 pixels)."""

    __tablename__ = "spots"
    __table_args__ = (UniqueConstraint("dataset_pk", "barcode"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dataset_pk: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    barcode: Mapped[str] = mapped_column(String(64))
    in_tissue: Mapped[bool] = mapped_column(Boolean)
    array_row: Mapped[int] = mapped_column(Integer)
    array_col: Mapped[int] = mapped_column(Integer)
    pxl_row: Mapped[float] = mapped_column(Float)
    pxl_col: Mapped[float] = mapped_column(Float)
    extent: Mapped[float] = mapped_column(Float, server_default="0")
    """A WSI tile's side in level-0 pixels (its centre is ``pxl_col, pxl_row``); 0 for a spot."""


class Annotator(Base):
    """Someone (or some service) who gives labels."""

    __tablename__ = "annotators"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Membership(Base):
    """An annotator's membership of a project."""

    __tablename__ = "memberships"

    annotator_id: Mapped[str] = mapped_column(ForeignKey("annotators.id"), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)


class AnnotatorToken(Base):
    """A bearer token of an annotator, stored only as its SHA-256 hash."""

    __tablename__ = "annotator_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[str] = mapped_column(ForeignKey("annotators.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LabelBatch(Base):
    """One committed SubmitLabels/ImportLoupeCsv call and its (first) result."""

    __tablename__ = "label_batches"
    __table_args__ = (UniqueConstraint("project_id", "batch_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    batch_id: Mapped[str] = mapped_column(String(128))
    dataset_pk: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    annotator_id: Mapped[str] = mapped_column(ForeignKey("annotators.id"))
    source: Mapped[str] = mapped_column(String(16))
    queryset_id: Mapped[str] = mapped_column(String(128), default="")
    label_version: Mapped[int] = mapped_column(BigInteger)
    n_labels: Mapped[int] = mapped_column(Integer)
    n_placeholders: Mapped[int] = mapped_column(Integer, default=0)
    event_id: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LabelEvent(Base):
    """One label an annotator gave one spot (append-only)."""

    __tablename__ = "label_events"
    __table_args__ = (Index(None, "project_id", "label_version"), Index(None, "spot_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    batch_pk: Mapped[int] = mapped_column(ForeignKey("label_batches.id"))
    spot_id: Mapped[int] = mapped_column(ForeignKey("spots.id"))
    class_id: Mapped[int] = mapped_column(ForeignKey("project_classes.id"))
    annotator_id: Mapped[str] = mapped_column(ForeignKey("annotators.id"))
    annotator_role: Mapped[str] = mapped_column(String(16))
    """The annotator's role when they gave the label (consensus replays use it)."""
    source: Mapped[str] = mapped_column(String(16))
    label_version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class QuerySet(Base):
    """A query set received on ``queryset.ready``."""

    __tablename__ = "query_sets"
    __table_args__ = (UniqueConstraint("project_id", "queryset_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    queryset_id: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    round: Mapped[int] = mapped_column(Integer)
    strategy: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(128), default="")
    label_version: Mapped[int] = mapped_column(BigInteger, default=0)
    queryset_uri: Mapped[str] = mapped_column(Text, default="")
    predictions_uri: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, object]] = mapped_column(JSON)
    stopping: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class QuerySetSpot(Base):
    """One spot of a query set, in the acquisition's order."""

    __tablename__ = "query_set_spots"
    __table_args__ = (UniqueConstraint("queryset_pk", "position"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    queryset_pk: Mapped[int] = mapped_column(ForeignKey("query_sets.id"))
    position: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[str] = mapped_column(String(128), default="")
    barcode: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(String(32), default="")


class Round(Base):
    """A round of the loop: the query set that opened it."""

    __tablename__ = "rounds"

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    queryset_pk: Mapped[int] = mapped_column(ForeignKey("query_sets.id"))
    label_version: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Outbox(Base):
    """An event to publish, written in the transaction of the change it announces."""

    __tablename__ = "outbox"
    __table_args__ = (Index(None, "published_at", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    topic: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    """The serialized event; for ``labels.committed`` the relay adds the snapshot fields."""
    label_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")


class ProjectConfigChange(Base):
    """One UpdateProject call: the loop config before and after, who, when, why (audit)."""

    __tablename__ = "project_config_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    changed_by: Mapped[str] = mapped_column(String(128))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(Text, default="")
    before: Mapped[dict[str, object]] = mapped_column(JSON)
    after: Mapped[dict[str, object]] = mapped_column(JSON)
    from_label_version: Mapped[int] = mapped_column(BigInteger)
    """The first label version (round) whose ``labels.committed`` carries ``after``."""
