"""What every room of the repository shares: the database, the artifact store, the caches.

:class:`RepositoryBase` owns the state of an :class:`~.repository.AnnotationRepository`
(database, artifact store, commit hook, predictions loader, caches, prebuilt statements)
and the lookups every aggregate needs (a project, a dataset, its classes, the label
votes, the outbox row of a write). Each aggregate's mixin subclasses it and uses only
what is declared here, never a sibling mixin's private methods.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, DateTime, and_, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from histoloop import events
from histoloop.annotation_store import models as m
from histoloop.annotation_store.consensus import Vote
from histoloop.annotation_store.db import Database
from histoloop.annotation_store.domain import LoopSettings
from histoloop.artifacts.base import ArtifactStore
from histoloop.auth import Role
from histoloop.errors import NotFound

__all__ = [
    "EXPERT_ROLES",
    "PRODUCER",
    "ROLES",
    "PredictionsLoader",
    "RepositoryBase",
]

PRODUCER = "annotation_store"
EXPERT_ROLES = frozenset({"expert", "admin"})
"""Roles whose labels the ``latest_expert`` consensus prefers."""
ROLES: tuple[Role, ...] = ("annotator", "expert", "admin", "service")
PredictionsLoader = Callable[[str, str], Mapping[str, str]]
"""``(predictions_uri, dataset_id) → barcode → predicted class``, supplied by the lead's wiring."""

_DATASET_CACHE = 32


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _ClassRef:
    id: int
    name: str
    color: str
    position: int
    since_version: int


@dataclass(frozen=True)
class _ProjectMeta:
    """What a label commit needs of a project, cached (config never changes; classes only grow)."""

    settings: LoopSettings
    classes: Mapping[str, _ClassRef]


@dataclass(frozen=True)
class _DatasetRef:
    """A dataset's row id and barcode → spot id (immutable once registered), cached."""

    pk: int
    spots: Mapping[str, int]
    """In unit order (the order the units were registered, as every export lists them)."""
    removed: bool = False
    """Taken out of the pool by RemoveDataset (labels for it are refused)."""


class Lru:
    """A small thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[object, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> object | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: object, value: object) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class _Statements:
    """The label commit's statements, built once per dialect (SQLAlchemy caches their SQL)."""

    def __init__(self, dialect: str) -> None:
        A, B, E, P, C, OB = (
            m.Annotator.__table__,
            m.LabelBatch.__table__,
            m.LabelEvent.__table__,
            m.Project.__table__,
            m.ProjectClass.__table__,
            m.Outbox.__table__,
        )
        self.dialect = dialect
        self.role_and_batch = (
            select(A.c.role, B.c.n_labels, B.c.label_version, B.c.event_id, B.c.n_placeholders)
            .select_from(
                A.outerjoin(
                    B,
                    and_(
                        B.c.project_id == bindparam("project"), B.c.batch_id == bindparam("batch")
                    ),
                )
            )
            .where(A.c.id == bindparam("annotator"))
        )
        self.current_version = select(P.c.label_version).where(P.c.id == bindparam("project"))
        self.bump_version = (
            update(P)
            .where(P.c.id == bindparam("project"))
            .values(label_version=P.c.label_version + 1)
            .returning(P.c.label_version)
        )
        self.insert_class = insert(C).returning(C.c.id)
        self.insert_batch = insert(B).returning(B.c.id)
        self.insert_outbox = insert(OB)
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.ensure_annotator = dialect_insert(A).on_conflict_do_nothing()
        self._events = E
        # PostgreSQL: one statement whatever the batch size (the per-label columns as arrays)
        self._events_unnest = text(
            "INSERT INTO label_events (project_id, batch_pk, spot_id, class_id, annotator_id, annotator_role, "
            "source, label_version, created_at) SELECT :project_id, :batch_pk, t.spot_id, t.class_id, "
            ":annotator_id, :annotator_role, :source, :label_version, :created_at "
            "FROM unnest(CAST(:spot_ids AS BIGINT[]), CAST(:class_ids AS BIGINT[])) AS t(spot_id, class_id)"
        ).bindparams(bindparam("created_at", type_=DateTime(timezone=True)))

    def insert_events(
        self,
        c: Connection,
        common: Mapping[str, object],
        spot_ids: Sequence[int],
        class_ids: Sequence[int],
    ) -> None:
        """Insert one label event per (spot, class) with the batch's common columns."""
        if self.dialect == "postgresql":
            c.execute(
                self._events_unnest,
                {**common, "spot_ids": list(spot_ids), "class_ids": list(class_ids)},
            )
        else:
            c.execute(
                insert(self._events),
                [
                    {**common, "spot_id": s, "class_id": k}
                    for s, k in zip(spot_ids, class_ids, strict=True)
                ],
            )


class RepositoryBase:
    """The state and shared lookups of the annotation store's repository."""

    def __init__(
        self,
        db: Database,
        artifacts: ArtifactStore,
        *,
        on_commit: Callable[[], None] | None = None,
        predictions_loader: PredictionsLoader | None = None,
    ) -> None:
        """Create the repository.

        Args:
            db: the store's database (already migrated).
            artifacts: where dataset inputs and label snapshots go.
            on_commit: called after a commit that wrote outbox rows (wakes the relay).
            predictions_loader: reads a predictions artifact for the predictions export.
        """
        self.db = db
        self.artifacts = artifacts
        self.on_commit = on_commit or (lambda: None)
        self.predictions_loader = predictions_loader
        self._known_annotators: set[str] = set()
        self._statements = _Statements(db.dialect)
        self._project_meta_cache: dict[str, _ProjectMeta] = {}
        self._dataset_cache: OrderedDict[tuple[str, str], _DatasetRef] = OrderedDict()
        # label summaries (status counts, agreement) per label version: labels at a version never change
        self._summaries = Lru(32)

    def _project(self, s: Session, project_id: str, *, lock: bool = False) -> m.Project:
        query = select(m.Project).where(m.Project.id == project_id)
        if lock:
            query = query.with_for_update()
        project = s.scalars(query).first()
        if project is None:
            raise NotFound(f"project {project_id!r} not found")
        return project

    def _dataset(
        self, s: Session, project_id: str, dataset_id: str, *, missing_ok: bool = False
    ) -> m.Dataset | None:
        d = s.scalars(
            select(m.Dataset).where(
                m.Dataset.project_id == project_id, m.Dataset.dataset_id == dataset_id
            )
        ).first()
        if d is None and not missing_ok:
            raise NotFound(f"dataset {dataset_id!r} not found in project {project_id!r}")
        return d

    def _classes(self, s: Session, project_id: str) -> list[m.ProjectClass]:
        return list(
            s.scalars(
                select(m.ProjectClass)
                .where(m.ProjectClass.project_id == project_id)
                .order_by(m.ProjectClass.position)
            )
        )

    def _project_meta(self, project_id: str, *, refresh: bool = False) -> _ProjectMeta:
        meta = None if refresh else self._project_meta_cache.get(project_id)
        if meta is None:
            with self.db.read() as s:
                project = self._project(s, project_id)
                meta = _ProjectMeta(
                    settings=_settings(project),
                    classes={
                        c.name: _ClassRef(
                            id=c.id,
                            name=c.name,
                            color=c.color,
                            position=c.position,
                            since_version=c.since_version,
                        )
                        for c in self._classes(s, project_id)
                    },
                )
            self._project_meta_cache[project_id] = meta
        return meta

    def _dataset_ref(
        self, project_id: str, dataset_id: str, *, refresh: bool = False
    ) -> _DatasetRef:
        key = (project_id, dataset_id)
        ref = None if refresh else self._dataset_cache.get(key)
        if ref is None:
            self._project_meta(project_id)  # NotFound for the project first
            with self.db.read() as s:
                dataset = self._dataset(s, project_id, dataset_id)
                assert dataset is not None
                spots = dict(
                    s.execute(
                        select(m.Spot.barcode, m.Spot.id)
                        .where(m.Spot.dataset_pk == dataset.id)
                        .order_by(m.Spot.id)
                    ).all()
                )
            ref = _DatasetRef(pk=dataset.id, spots=spots, removed=dataset.removed_at is not None)
            self._dataset_cache[key] = ref
            while len(self._dataset_cache) > _DATASET_CACHE:
                self._dataset_cache.popitem(last=False)
        else:
            self._dataset_cache.move_to_end(key)
        return ref

    def unit_order(
        self, project_id: str, dataset_id: str, *, including: Iterable[str] = ()
    ) -> list[str]:
        """A dataset's unit barcodes in the order they were registered: the row order of the
        Loupe exports. From the cached dataset reference (no query once cached).

        Args:
            project_id: the project.
            dataset_id: the dataset.
            including: the barcodes the caller will list; one the cached units lack (a WSI's
                tiles added since, by another replica) reads the units again.

        Raises:
            NotFound: the project or dataset.
        """
        ref = self._dataset_ref(project_id, dataset_id)
        if any(b not in ref.spots for b in including):
            ref = self._dataset_ref(project_id, dataset_id, refresh=True)
        return list(ref.spots)

    def _votes(
        self,
        s: Session,
        project_id: str,
        *,
        dataset_id: str = "",
        max_version: int | None = None,
        min_version: int | None = None,
    ) -> list[Vote]:
        E, S, D, C = (
            m.LabelEvent.__table__,
            m.Spot.__table__,
            m.Dataset.__table__,
            m.ProjectClass.__table__,
        )
        query = (
            select(
                E.c.id, D.c.dataset_id, S.c.barcode, E.c.annotator_id, E.c.annotator_role, C.c.name
            )
            .select_from(
                E.join(S, S.c.id == E.c.spot_id)
                .join(D, D.c.id == S.c.dataset_pk)
                .join(C, C.c.id == E.c.class_id)
            )
            .where(E.c.project_id == project_id)
        )
        if dataset_id:
            query = query.where(D.c.dataset_id == dataset_id)
        if max_version is not None:
            query = query.where(E.c.label_version <= max_version)
        if min_version is not None:
            query = query.where(E.c.label_version > min_version)
        query = query.order_by(E.c.id)
        return [
            Vote(
                item=(ds, barcode),
                annotator=annotator,
                label=label,
                seq=seq,
                expert=role in EXPERT_ROLES,
            )
            for seq, ds, barcode, annotator, role, label in s.execute(query)
        ]

    def _add_outbox(
        self,
        s: Session,
        project_id: str,
        message: Any,
        event_id: str,
        *,
        label_version: int | None,
        now: datetime,
    ) -> None:
        s.execute(
            insert(m.Outbox.__table__).values(
                project_id=project_id,
                topic=events.topic_of(message),
                event_id=event_id,
                payload=message.SerializeToString(),
                label_version=label_version,
                created_at=now,
                published_at=None,
                attempts=0,
                last_error="",
            )
        )


def _settings(project: m.Project) -> LoopSettings:
    return LoopSettings(
        strategy=project.strategy,
        cold_start_strategy=project.cold_start_strategy,
        query_size=project.query_size,
        seed=project.seed,
        head=project.head,
        features=project.features,
        spatial_neighbours=project.spatial_neighbours,
        resampling=project.resampling,
        consensus=project.consensus,
        adjudication_share=project.adjudication_share,
        compactness=project.compactness,
        smoothing=project.smoothing,
        hybrid_share=project.hybrid_share,
        kmeans_pick=project.kmeans_pick,
        mc_dropout_samples=project.mc_dropout_samples,
        stop_max_change=project.stop_max_change,
        stop_min_kappa=project.stop_min_kappa,
        stop_patience=project.stop_patience,
        stop_max_uncertainty=project.stop_max_uncertainty,
        resampling_every=project.resampling_every,
        harmony=project.harmony,
        preset=project.preset,
        semi_supervised=project.semi_supervised,
        augment_views=project.augment_views,
    )
