"""The annotation store's domain operations over its database and the artifact store.

Every mutating operation is one unit of work (:meth:`Database.write`): everything is
validated first, then written in a single transaction together with the outbox row that
announces it, so a rejected request changes nothing and a committed one is never lost
nor announced twice. No transport code here: the servicer maps requests to these calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, DateTime, and_, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from histoloop import events
from histoloop.annotation_store import models as m
from histoloop.annotation_store.agreement import fleiss_kappa, pairwise_cohen
from histoloop.annotation_store.consensus import (
    ConsensusResult,
    Vote,
    compute_consensus,
    dawid_skene,
    latest_votes,
)
from histoloop.annotation_store.convert import loop_settings_to_proto
from histoloop.annotation_store.db import Database
from histoloop.annotation_store.domain import (
    HELP_LABEL,
    AgreementReport,
    BatchResult,
    ClassSpec,
    ConfigChange,
    DatasetInfo,
    DatasetSpec,
    LoopSettings,
    ProjectInfo,
    ProjectStatus,
    QuerySetRecord,
    QuerySpot,
    SpotLabelInput,
    check_id,
)
from histoloop.annotation_store.doors import check_spots_on_slide, slide_size
from histoloop.annotation_store.history import label_batches
from histoloop.annotation_store.loupe import (
    DEFAULT_GROUP,
    DEFAULT_PREDICTIONS_GROUP,
    labels_csv,
    parse_loupe_csv,
    predictions_csv,
    query_set_csv,
)
from histoloop.annotation_store.raters import rater_confusions
from histoloop.annotation_store.snapshot import snapshot_document, snapshot_key
from histoloop.annotation_store.units import TileUnit, Unit, UnitLayout
from histoloop.artifacts.base import ArtifactExists, ArtifactStore, InvalidKey
from histoloop.auth import Identity, Role, hash_token
from histoloop.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from histoloop.formats.positions import (
    SCALEFACTORS_FILE,
    find_positions_file,
    parse_positions,
    parse_scalefactors,
)
from histoloop.labelsets import MIN_TRAINING_CLASSES
from histoloop.metrics import LABELS_COMMITTED
from histoloop.v1 import common_pb2, events_pb2

__all__ = [
    "EXPERT_ROLES",
    "MAX_LABELS_PER_BATCH",
    "PRODUCER",
    "AnnotationRepository",
    "OutboxRow",
    "PredictionsLoader",
]

log = logging.getLogger(__name__)

PRODUCER = "annotation_store"
EXPERT_ROLES = frozenset({"expert", "admin"})
"""Roles whose labels the ``latest_expert`` consensus prefers."""
MAX_LABELS_PER_BATCH = 1_000_000
ROLES: tuple[Role, ...] = ("annotator", "expert", "admin", "service")
PredictionsLoader = Callable[[str, str], Mapping[str, str]]
"""``(predictions_uri, dataset_id) → barcode → predicted class``, supplied by the lead's wiring."""

_DATASET_CACHE = 32
_RELAY_LOCK = 0x68697375  # PostgreSQL advisory lock key of the outbox relay
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.=+@-]")
_KIND_NAMES = {"visium": common_pb2.DATASET_KIND_VISIUM, "wsi": common_pb2.DATASET_KIND_WSI}


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
    removed: bool = False
    """Taken out of the pool by RemoveDataset (labels for it are refused)."""


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


@dataclass(frozen=True)
class OutboxRow:
    """An unpublished outbox row."""

    id: int
    project_id: str
    topic: str
    event_id: str
    payload: bytes
    label_version: int | None
    attempts: int


class AnnotationRepository:
    """Projects, datasets, annotators, labels, query sets and the outbox."""

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

    # projects ---------------------------------------------------------------------------
    def create_project(
        self, project_id: str, name: str, classes: Sequence[ClassSpec], config: LoopSettings
    ) -> ProjectInfo:
        """Create a project with its class schema and loop configuration.

        Raises:
            InvalidArgument: a bad id, class name, colour or config field.
            AlreadyExists: the project id is taken.
        """
        check_id(project_id, "project_id", project=True)
        name = (name or project_id).strip()
        if len(name) > 200:
            raise InvalidArgument("name: longer than 200 characters")
        specs = _validated_classes(classes, start=0, field_name="classes")
        config.validate()
        now = _now()
        try:
            with self.db.write() as s:
                if s.get(m.Project, project_id) is not None:
                    raise AlreadyExists(f"project {project_id!r} exists already")
                s.add(
                    m.Project(
                        id=project_id, name=name, created_at=now, label_version=0, **config.__dict__
                    )
                )
                s.flush()
                for pos, spec in enumerate(specs):
                    s.add(
                        m.ProjectClass(
                            project_id=project_id,
                            position=pos,
                            name=spec.name,
                            color=spec.color,
                            since_version=0,
                            created_at=now,
                        )
                    )
        except IntegrityError:
            raise AlreadyExists(f"project {project_id!r} exists already") from None
        log.info("created project %s with %d classes", project_id, len(specs))
        return self.get_project(project_id)

    def get_project(self, project_id: str) -> ProjectInfo:
        """A project, its classes and datasets. Raises :class:`NotFound`."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            classes = self._classes(s, project_id)
            datasets = s.scalars(
                select(m.Dataset.dataset_id)
                .where(m.Dataset.project_id == project_id)
                .order_by(m.Dataset.id)
            ).all()
            return ProjectInfo(
                project_id=project.id,
                name=project.name,
                classes=tuple(ClassSpec(c.name, c.color) for c in classes),
                config=_settings(project),
                created_at=_utc(project.created_at),
                datasets=tuple(datasets),
                label_version=project.label_version,
            )

    def list_projects(self, only: Iterable[str] | None = None) -> list[ProjectInfo]:
        """Every project (``only``: just these ids, e.g. an annotator's memberships), by id."""
        with self.db.read() as s:
            query = select(m.Project.id).order_by(m.Project.id)
            if only is not None:
                query = query.where(m.Project.id.in_(list(only)))
            ids = list(s.scalars(query))
        return [self.get_project(project_id) for project_id in ids]

    def list_datasets(self, project_id: str) -> list[DatasetInfo]:
        """A project's datasets in registration order. Raises :class:`NotFound`."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.Dataset).where(m.Dataset.project_id == project_id).order_by(m.Dataset.id)
            ).all()
            return [_dataset_info(d) for d in rows]

    def add_classes(self, project_id: str, classes: Sequence[ClassSpec]) -> ProjectInfo:
        """Append classes to the schema; names already there (same colour) are kept as they are.

        Raises:
            NotFound: no such project.
            InvalidArgument: a bad name, or an existing name with another colour (classes
                are never changed or renamed).
        """
        if not classes:
            raise InvalidArgument("classes: nothing to add")
        with self.db.write() as s:
            project = self._project(s, project_id, lock=True)
            existing = {c.name: c for c in self._classes(s, project_id)}
            position = len(existing)
            seen: set[str] = set()
            for i, given in enumerate(classes):
                spec = given.validated(f"classes[{i}]", position)
                if spec.name in seen:
                    raise InvalidArgument(f"classes[{i}]: {spec.name!r} is given twice")
                seen.add(spec.name)
                held = existing.get(spec.name)
                if held is not None:
                    if given.color.strip() and given.color.strip().lower() != held.color:
                        raise InvalidArgument(
                            f"classes[{i}]: {spec.name!r} exists with colour {held.color}; "
                            "classes are never changed"
                        )
                    continue
                s.add(
                    m.ProjectClass(
                        project_id=project_id,
                        position=position,
                        name=spec.name,
                        color=spec.color,
                        since_version=project.label_version + 1,
                        created_at=_now(),
                    )
                )
                position += 1
        self._project_meta_cache.pop(project_id, None)
        return self.get_project(project_id)

    # datasets ---------------------------------------------------------------------------
    def register_dataset(self, spec: DatasetSpec) -> DatasetInfo:
        """Copy a dataset's inputs into the artifact store, store its spots, announce it.

        The inputs go to ``datasets/<project>/<dataset>/input/{spatial,slide,expression}/``;
        the ``dataset.registered`` event is written to the outbox in the same transaction
        as the dataset row, so it is published even if the process dies right after.

        Raises:
            InvalidArgument: bad ids, kind, numbers or a malformed positions file.
            NotFound: the project, the spatial folder or an input file is missing.
            AlreadyExists: the dataset is registered already.
        """
        check_id(spec.dataset_id, "dataset_id")
        if spec.kind not in _KIND_NAMES:
            raise InvalidArgument(f"kind: {spec.kind!r} is not visium or wsi")
        for name in ("slide_scale", "context", "mpp"):
            value = getattr(spec, name)
            if not value >= 0:
                raise InvalidArgument(f"{name}: {value} must be >= 0")
        with self.db.read() as s:
            project = self._project(s, spec.project_id)
            config = _settings(project)
            if self._dataset(s, spec.project_id, spec.dataset_id, missing_ok=True) is not None:
                raise AlreadyExists(
                    f"dataset {spec.dataset_id!r} exists already in project {spec.project_id!r}"
                )

        rows = []
        prefix = f"datasets/{spec.project_id}/{spec.dataset_id}/input"
        spatial_prefix = ""
        if spec.kind == "visium":
            if not spec.spatial_dir:
                raise InvalidArgument(
                    "spatial_dir: a Visium dataset needs its Space Ranger spatial/ folder"
                )
            positions = find_positions_file(spec.spatial_dir)
            rows = list(parse_positions(positions.read_bytes(), source=positions.name))
            if spec.slide_path and "://" not in spec.slide_path and Path(spec.slide_path).is_file():
                size = slide_size(spec.slide_path)
                if size is not None:  # before anything is copied: a refusal stores nothing
                    check_spots_on_slide(rows, size, scale=spec.slide_scale, source=positions.name)
            for path in sorted(Path(spec.spatial_dir).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    self._put_input(f"{prefix}/spatial/{_safe(path.name)}", path)
            spatial_prefix = self.artifacts.uri(f"{prefix}/spatial")
        elif not spec.slide_path:
            raise InvalidArgument("slide_path: a WSI dataset needs a slide")
        slide_uri = self._input_uri(spec.slide_path, f"{prefix}/slide", "slide_path")
        expression_uri = self._input_uri(
            spec.expression_path, f"{prefix}/expression", "expression_path"
        )

        now = _now()
        event_id = str(uuid.uuid4())
        message = events_pb2.DatasetRegistered(
            meta=events.new_meta(
                project=spec.project_id,
                dataset=spec.dataset_id,
                producer=PRODUCER,
                event_id=event_id,
                trace_id=event_id,
            ),
            kind=_KIND_NAMES[spec.kind],
            slide_uri=slide_uri,
            spatial_uri_prefix=spatial_prefix,
            expression_uri=expression_uri,
            config=loop_settings_to_proto(config),
            slide_scale=spec.slide_scale or 1.0,
            context=spec.context or 1.0,
            mpp=spec.mpp,
            tile_size=spec.tile_size,
        )
        try:
            with self.db.write() as s:
                dataset = m.Dataset(
                    project_id=spec.project_id,
                    dataset_id=spec.dataset_id,
                    kind=spec.kind,
                    slide_uri=slide_uri,
                    spatial_uri_prefix=spatial_prefix,
                    expression_uri=expression_uri,
                    slide_scale=spec.slide_scale or 1.0,
                    context=spec.context or 1.0,
                    mpp=spec.mpp,
                    tile_size=spec.tile_size,
                    n_spots=len(rows),
                    n_in_tissue=sum(1 for r in rows if r.in_tissue),
                    embeddings_uri="",
                    embeddings_event_id="",
                    registered_at=now,
                )
                s.add(dataset)
                s.flush()
                if rows:
                    s.execute(
                        insert(m.Spot.__table__),
                        [
                            {
                                "dataset_pk": dataset.id,
                                "barcode": r.barcode,
                                "in_tissue": r.in_tissue,
                                "array_row": r.array_row,
                                "array_col": r.array_col,
                                "pxl_row": r.pxl_row,
                                "pxl_col": r.pxl_col,
                            }
                            for r in rows
                        ],
                    )
                self._add_outbox(s, spec.project_id, message, event_id, label_version=None, now=now)
        except IntegrityError:
            raise AlreadyExists(
                f"dataset {spec.dataset_id!r} exists already in project {spec.project_id!r}"
            ) from None
        self.on_commit()
        log.info("registered dataset %s/%s (%d spots)", spec.project_id, spec.dataset_id, len(rows))
        return self.get_dataset(spec.project_id, spec.dataset_id)

    def get_dataset(self, project_id: str, dataset_id: str) -> DatasetInfo:
        """A registered dataset. Raises :class:`NotFound`."""
        with self.db.read() as s:
            self._project(s, project_id)
            d = self._dataset(s, project_id, dataset_id)
            assert d is not None
            return _dataset_info(d)

    def _put_input(self, key: str, path: Path) -> str:
        """Copy a file to ``key`` (reusing an identical object from an earlier attempt)."""
        try:
            self.artifacts.put_file(key, path)
        except ArtifactExists:
            if self.artifacts.stat(key).sha256 != _sha256_file(path):
                raise AlreadyExists(
                    f"artifact {key} exists with other content; the dataset id is taken"
                ) from None
        return self.artifacts.uri(key)

    def _input_uri(self, given: str, key_prefix: str, field_name: str) -> str:
        if not given:
            return ""
        if "://" in given:
            try:
                self.artifacts.key_from_uri(given)
            except InvalidKey:
                raise InvalidArgument(
                    f"{field_name}: {given!r} is not in this artifact store; give a local path"
                ) from None
            return given
        path = Path(given)
        if not path.is_file():
            raise NotFound(f"{field_name}: {given!r} is not a file")
        return self._put_input(f"{key_prefix}/{_safe(path.name)}", path)

    def set_embeddings(self, project_id: str, dataset_id: str, uri: str, event_id: str, *,
                       model: str = "", model_version: str = "", dim: int = 0) -> bool:
        """Remember a dataset's latest embeddings (from ``embeddings.ready``) and the model that
        made them (shown in the dataset's status); False if unknown/seen."""
        with self.db.write() as s:
            if s.get(m.Project, project_id) is None:
                return False
            d = self._dataset(s, project_id, dataset_id, missing_ok=True)
            if d is None or d.embeddings_event_id == event_id:
                return False
            d.embeddings_uri = uri
            d.embeddings_event_id = event_id
            d.embedding_model, d.embedding_model_version, d.embedding_dim = model, model_version, dim
        return True

    def add_tiles(
        self, project_id: str, dataset_id: str, tiles: Sequence[TileUnit], *, source: str
    ) -> int:
        """Make a WSI dataset's tissue tiles (from ``tiles.ready``) its labelled units.

        Tiles already known keep their row (labels refer to it); new ones are added and the
        dataset's unit counts updated. Visium datasets (units come from their positions)
        and unknown datasets are left alone.

        Returns:
            The number of tiles added.
        """
        with self.db.write() as s:
            if s.get(m.Project, project_id) is None:
                return 0
            d = self._dataset(s, project_id, dataset_id, missing_ok=True)
            if d is None or d.kind != "wsi":
                return 0
            held = set(s.scalars(select(m.Spot.barcode).where(m.Spot.dataset_pk == d.id)))
            new = {t.tile_id: t for t in tiles if t.tile_id not in held}
            if new:
                s.execute(
                    insert(m.Spot.__table__),
                    [
                        {
                            "dataset_pk": d.id,
                            "barcode": t.tile_id,
                            "in_tissue": True,
                            "array_row": t.grid_row,
                            "array_col": t.grid_col,
                            "pxl_row": t.cy,
                            "pxl_col": t.cx,
                            "extent": t.side,
                        }
                        for t in new.values()
                    ],
                )
            d.n_spots = d.n_in_tissue = len(held) + len(new)
        self._dataset_cache.pop((project_id, dataset_id), None)
        log.info(
            "dataset %s/%s: %d new tiles from %s (%d units)",
            project_id,
            dataset_id,
            len(new),
            source,
            len(held) + len(new),
        )
        return len(new)

    def unit_layout(self, project_id: str, dataset_id: str) -> UnitLayout:
        """Every unit of a dataset with its centre and size in slide level-0 pixels.

        Raises:
            NotFound: the project or dataset.
            FailedPrecondition: a WSI dataset whose tiles are not known yet.
        """
        with self.db.read() as s:
            self._project(s, project_id)
            d = self._dataset(s, project_id, dataset_id)
            assert d is not None
            rows = s.execute(
                select(
                    m.Spot.barcode, m.Spot.pxl_col, m.Spot.pxl_row, m.Spot.extent, m.Spot.in_tissue
                )
                .where(m.Spot.dataset_pk == d.id)
                .order_by(m.Spot.id)
            ).all()
            kind, scale = d.kind, d.slide_scale or 1.0
            slide_uri, spatial = d.slide_uri, d.spatial_uri_prefix
        if kind == "wsi":
            if not rows:
                raise FailedPrecondition(
                    f"dataset {dataset_id!r}: its tiles are not known yet (tiling still running?)"
                )
            units = tuple(
                Unit(b, x, y, size, "square", bool(t)) for b, x, y, size, t in rows
            )
        else:
            diameter = self._spot_diameter(spatial) * scale
            units = tuple(
                Unit(b, x * scale, y * scale, diameter, "circle", bool(t))
                for b, x, y, _size, t in rows
            )
        return UnitLayout(
            project_id=project_id,
            dataset_id=dataset_id,
            kind=kind,
            slide_uri=slide_uri,
            spatial_uri_prefix=spatial,
            slide_scale=scale,
            units=units,
        )

    def _spot_diameter(self, spatial_uri_prefix: str) -> float:
        """``spot_diameter_fullres`` from the copied ``scalefactors_json.json``."""
        key = self.artifacts.key_from_uri(spatial_uri_prefix.rstrip("/")) + "/" + SCALEFACTORS_FILE
        try:
            return parse_scalefactors(self.artifacts.get(key), source=key).spot_diameter_fullres
        except InvalidArgument as exc:
            raise FailedPrecondition(
                f"{self.artifacts.uri(key)}: no usable spot_diameter_fullres ({exc})"
            ) from None

    # annotators --------------------------------------------------------------------------
    def register_annotator(
        self,
        annotator_id: str,
        *,
        display_name: str = "",
        role: Role | None = None,
        projects: Sequence[str] = (),
    ) -> str:
        """Create (or update) an annotator, add memberships, and issue a new token.

        The token is returned once; only its SHA-256 is stored. Registering an existing
        annotator again adds memberships, updates the name/role if given, and issues an
        additional token (earlier ones stay valid).

        Raises:
            InvalidArgument: a bad id or role.
            NotFound: a named project does not exist.
        """
        check_id(annotator_id, "annotator_id")
        if role is not None and role not in ROLES:
            raise InvalidArgument(f"role: {role!r} is not one of {', '.join(ROLES)}")
        # The prefix keeps a token from starting with "-", which a command line would read as a flag.
        token = "hl_" + secrets.token_urlsafe(32)
        now = _now()
        with self.db.write() as s:
            for i, project_id in enumerate(projects):
                if s.get(m.Project, project_id) is None:
                    raise NotFound(f"projects[{i}]: project {project_id!r} not found")
            annotator = s.get(m.Annotator, annotator_id)
            if annotator is None:
                s.add(
                    m.Annotator(
                        id=annotator_id,
                        display_name=display_name.strip() or annotator_id,
                        role=role or "annotator",
                        created_at=now,
                    )
                )
                s.flush()
            else:
                if display_name.strip():
                    annotator.display_name = display_name.strip()
                if role is not None:
                    annotator.role = role
            held = set(
                s.scalars(
                    select(m.Membership.project_id).where(m.Membership.annotator_id == annotator_id)
                )
            )
            for project_id in dict.fromkeys(projects):
                if project_id not in held:
                    s.add(m.Membership(annotator_id=annotator_id, project_id=project_id))
            s.add(
                m.AnnotatorToken(
                    token_hash=hash_token(token), annotator_id=annotator_id, created_at=now
                )
            )
        self._known_annotators.add(annotator_id)
        log.info("registered annotator %s (%d projects)", annotator_id, len(projects))
        return token

    def resolve_token(self, token: str) -> Identity | None:
        """The identity of an annotator token, or None if it is not one of ours."""
        with self.db.read() as s:
            row = s.execute(
                select(m.Annotator.id, m.Annotator.role)
                .join(m.AnnotatorToken, m.AnnotatorToken.annotator_id == m.Annotator.id)
                .where(m.AnnotatorToken.token_hash == hash_token(token))
            ).first()
            if row is None:
                return None
            annotator_id, role = row
            if role in ("admin", "service"):
                return Identity(subject=annotator_id, role=role, projects=None)
            projects = s.scalars(
                select(m.Membership.project_id).where(m.Membership.annotator_id == annotator_id)
            )
            return Identity(subject=annotator_id, role=role, projects=frozenset(projects))

    def _ensure_annotator(self, c: Connection, annotator_id: str, role: str) -> None:
        """Create the annotator row of a caller without one (the local user, service tokens)."""
        check_id(annotator_id, "annotator")
        c.execute(
            self._statements.ensure_annotator,
            {
                "id": annotator_id,
                "display_name": annotator_id,
                "role": role if role in ROLES else "annotator",
                "created_at": _now(),
            },
        )

    # labels ----------------------------------------------------------------------------
    def submit_labels(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        labels: Sequence[SpotLabelInput],
        *,
        annotator: str,
        annotator_role: str = "annotator",
        source: str = "grpc",
        add_missing_classes: bool = False,
        queryset_id: str = "",
        n_placeholders: int = 0,
        create_annotator: bool = True,
    ) -> BatchResult:
        """Commit a batch of labels atomically, with its ``labels.committed`` outbox row.

        ``annotator`` is recorded as the labels' author; without a row yet (the local user,
        a service or admin token) one is created with ``annotator_role`` in the same
        transaction, unless ``create_annotator`` is False (labels given on someone's behalf).

        The same ``batch_id`` again (in this project) returns the first result with
        ``duplicate=True`` and changes nothing. A batch of placeholders only (a re-imported
        query-set export) is recorded without labels, version bump or event.

        Raises:
            InvalidArgument: empty batch, empty/``help`` label, a barcode twice with
                different labels, a barcode not in the dataset, a class not in the schema
                (unless ``add_missing_classes``) — naming the row.
            NotFound: the project, dataset or (on-behalf) annotator does not exist.
        """
        check_id(batch_id, "batch_id")
        if source not in ("grpc", "loupe_csv", "correction", "geojson"):
            raise InvalidArgument(
                f"source: {source!r} is not grpc, loupe_csv, correction or geojson"
            )
        if not labels and not n_placeholders:
            raise InvalidArgument("labels: the batch is empty")
        if len(labels) > MAX_LABELS_PER_BATCH:
            raise InvalidArgument(
                f"labels: {len(labels)} labels; at most {MAX_LABELS_PER_BATCH} per batch"
            )
        unique = _dedupe(labels)
        create_role = (
            annotator_role if create_annotator and annotator not in self._known_annotators else None
        )
        for _attempt in range(3):
            try:
                result = self._commit_batch(
                    project_id,
                    dataset_id,
                    batch_id,
                    unique,
                    annotator=annotator,
                    source=source,
                    add_missing_classes=add_missing_classes,
                    queryset_id=queryset_id,
                    n_placeholders=n_placeholders,
                    create_role=create_role,
                )
            except IntegrityError as exc:
                # a concurrent commit of the same batch id or class: the retry sees it
                log.info(
                    "batch %s/%s raced another commit (%s); retrying",
                    project_id,
                    batch_id,
                    exc.orig,
                )
                continue
            self._known_annotators.add(annotator)
            if result.event_id and not result.duplicate:
                LABELS_COMMITTED.labels(project=project_id).inc(result.n_labels)
                self.on_commit()
            return result
        raise FailedPrecondition(
            f"batch {batch_id!r} kept conflicting with concurrent commits; retry it"
        )

    def _commit_batch(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        labels: Mapping[str, SpotLabelInput],
        *,
        annotator: str,
        source: str,
        add_missing_classes: bool,
        queryset_id: str,
        n_placeholders: int,
        create_role: str | None,
    ) -> BatchResult:
        # project, classes and spots come from caches (immutable or append-only data); the
        # transaction itself is a handful of prebuilt Core statements
        meta = self._project_meta(project_id)
        dataset = self._dataset_ref(project_id, dataset_id)
        if dataset.removed:
            raise FailedPrecondition(
                f"dataset_id: {dataset_id!r} was removed from project {project_id!r} (RemoveDataset); "
                "its labels are kept but it takes no new ones"
            )
        if any(item.label not in meta.classes for item in labels.values()):
            meta = self._project_meta(project_id, refresh=True)  # added by another call?
        classes = meta.classes
        missing: dict[str, str] = {}
        for item in labels.values():
            if item.label not in classes and item.label not in missing:
                missing[item.label] = item.row
        for label, where in missing.items():
            near = _near_class(label, classes)
            if near is not None:
                raise InvalidArgument(
                    f"{where}: class {label!r} is not in the schema of project {project_id!r}; did you "
                    f"mean {near!r}? (it differs only in case or spaces; add_missing_classes does not "
                    "create such near-duplicates)"
                )
        if missing and not add_missing_classes:
            label, where = next(iter(missing.items()))
            known = ", ".join(classes) or "no classes yet"
            raise InvalidArgument(
                f"{where}: class {label!r} is not in the schema of project {project_id!r} ({known}); "
                "add it with AddClasses or pass add_missing_classes"
            )
        new_classes = [
            ClassSpec(label).validated(f"{where}: label", len(classes) + i)
            for i, (label, where) in enumerate(missing.items())
        ]
        unknown = [b for b in labels if b not in dataset.spots]
        if unknown:  # a WSI's tiles may have arrived (tiles.ready) since the units were cached
            self._dataset_cache.pop((project_id, dataset_id), None)
            dataset = self._dataset_ref(project_id, dataset_id)
            unknown = [b for b in labels if b not in dataset.spots]
        if unknown:
            raise InvalidArgument(
                self._unknown_barcode_message(project_id, dataset_id, unknown, labels)
            )
        if queryset_id:
            self._check_queryset_id(project_id, queryset_id)

        st = self._statements
        now = _now()
        n_labels = len(labels)
        with self.db.write_conn() as c:
            if create_role is not None:
                self._ensure_annotator(c, annotator, create_role)
            # the author's role and, if this batch id was committed before, its first result
            row = c.execute(
                st.role_and_batch,
                {"annotator": annotator, "project": project_id, "batch": batch_id},
            ).first()
            if row is None:
                raise NotFound(f"annotator_id: annotator {annotator!r} not found")
            if row.label_version is not None:
                self._check_same_batch(c, project_id, batch_id, dataset.pk, labels, n_placeholders)
                return BatchResult(
                    batch_id=batch_id,
                    n_labels=row.n_labels,
                    label_version=row.label_version,
                    duplicate=True,
                    event_id=row.event_id,
                    n_placeholders=row.n_placeholders,
                )
            batch_row = {
                "project_id": project_id,
                "batch_id": batch_id,
                "dataset_pk": dataset.pk,
                "annotator_id": annotator,
                "source": source,
                "queryset_id": queryset_id,
                "n_labels": n_labels,
                "n_placeholders": n_placeholders,
                "created_at": now,
            }
            if n_labels == 0:  # placeholders only: record the batch for idempotency, nothing else
                version = c.execute(st.current_version, {"project": project_id}).scalar_one()
                c.execute(st.insert_batch, {**batch_row, "label_version": version, "event_id": ""})
                return BatchResult(
                    batch_id=batch_id,
                    n_labels=0,
                    label_version=version,
                    duplicate=False,
                    event_id="",
                    n_placeholders=n_placeholders,
                )

            # the project row lock: versions are handed out (and committed) in order
            version = c.execute(st.bump_version, {"project": project_id}).scalar_one()
            class_ids = {name: ref.id for name, ref in classes.items()}
            for position, spec in enumerate(new_classes, start=len(classes)):
                class_ids[spec.name] = c.execute(
                    st.insert_class,
                    {
                        "project_id": project_id,
                        "position": position,
                        "name": spec.name,
                        "color": spec.color,
                        "since_version": version,
                        "created_at": now,
                    },
                ).scalar_one()
            event_id = str(uuid.uuid4())
            batch_pk = c.execute(
                st.insert_batch, {**batch_row, "label_version": version, "event_id": event_id}
            ).scalar_one()
            st.insert_events(
                c,
                {
                    "project_id": project_id,
                    "batch_pk": batch_pk,
                    "annotator_id": annotator,
                    "annotator_role": row.role,
                    "source": source,
                    "label_version": version,
                    "created_at": now,
                },
                [dataset.spots[b] for b in labels],
                [class_ids[item.label] for item in labels.values()],
            )
            ordered = sorted(classes.values(), key=lambda ref: ref.position)
            schema = [ref.name for ref in ordered if ref.since_version <= version]
            message = events_pb2.LabelsCommitted(
                meta=events.new_meta(
                    project=project_id,
                    dataset=dataset_id,
                    producer=PRODUCER,
                    event_id=event_id,
                    source_versions={"labels": str(version)},
                    trace_id=event_id,
                ),
                batch_id=batch_id,
                label_version=version,
                labels_uri=self.artifacts.uri(snapshot_key(project_id, version)),
                n_labels=n_labels,
                classes=schema + [spec.name for spec in new_classes],
                config=loop_settings_to_proto(meta.settings),
            )  # n_labelled_spots and embeddings_uris are filled in by the relay
            c.execute(
                st.insert_outbox,
                {
                    "project_id": project_id,
                    "topic": events.LABELS_COMMITTED,
                    "event_id": event_id,
                    "payload": message.SerializeToString(),
                    "label_version": version,
                    "created_at": now,
                    "published_at": None,
                    "attempts": 0,
                    "last_error": "",
                },
            )
        if new_classes:
            self._project_meta_cache.pop(project_id, None)
        return BatchResult(
            batch_id=batch_id,
            n_labels=n_labels,
            label_version=version,
            duplicate=False,
            event_id=event_id,
            n_placeholders=n_placeholders,
        )

    def _check_queryset_id(self, project_id: str, queryset_id: str) -> None:
        """Raise NotFound unless ``queryset_id`` is a query set of the project."""
        with self.db.read() as s:
            found = s.scalar(
                select(func.count())
                .select_from(m.QuerySet)
                .where(m.QuerySet.project_id == project_id, m.QuerySet.queryset_id == queryset_id)
            )
        if not found:
            raise NotFound(
                f"queryset_id: {queryset_id!r} is not a query set of project {project_id!r} "
                "(GetQuerySet/ListQuerySets list them; leave it empty for labels not asked for)"
            )

    def _check_same_batch(
        self,
        c: Connection,
        project_id: str,
        batch_id: str,
        dataset_pk: int,
        labels: Mapping[str, SpotLabelInput],
        n_placeholders: int,
    ) -> None:
        """A batch id sent again must carry what it carried the first time.

        Raises:
            AlreadyExists: the batch id was committed with other labels, another dataset or
                other placeholders (a reused id would otherwise drop the new labels silently).
        """
        B, E, S, C = (
            m.LabelBatch.__table__,
            m.LabelEvent.__table__,
            m.Spot.__table__,
            m.ProjectClass.__table__,
        )
        first = c.execute(
            select(B.c.id, B.c.dataset_pk, B.c.n_placeholders).where(
                B.c.project_id == project_id, B.c.batch_id == batch_id
            )
        ).one()
        given = c.execute(
            select(S.c.barcode, C.c.name)
            .select_from(E.join(S, E.c.spot_id == S.c.id).join(C, E.c.class_id == C.c.id))
            .where(E.c.batch_pk == first.id)
        ).all()
        before = dict((str(b), str(n)) for b, n in given)
        now = {b: item.label for b, item in labels.items()}
        if first.dataset_pk != dataset_pk or before != now or first.n_placeholders != n_placeholders:
            changed = sorted(b for b in set(before) | set(now) if before.get(b) != now.get(b))
            detail = (
                f"{len(changed)} spot(s) differ, e.g. {changed[0]!r}: "
                f"{before.get(changed[0], 'absent')!r} then, {now.get(changed[0], 'absent')!r} now"
                if changed
                else "another dataset or other placeholders"
            )
            raise AlreadyExists(
                f"batch_id: {batch_id!r} was committed before with different content ({detail}); "
                "a batch id is sent again only to retry the same batch — use a new batch_id"
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

    def _dataset_ref(self, project_id: str, dataset_id: str) -> _DatasetRef:
        key = (project_id, dataset_id)
        ref = self._dataset_cache.get(key)
        if ref is None:
            self._project_meta(project_id)  # NotFound for the project first
            with self.db.read() as s:
                dataset = self._dataset(s, project_id, dataset_id)
                assert dataset is not None
                spots = dict(
                    s.execute(
                        select(m.Spot.barcode, m.Spot.id).where(m.Spot.dataset_pk == dataset.id)
                    ).all()
                )
            ref = _DatasetRef(pk=dataset.id, spots=spots, removed=dataset.removed_at is not None)
            self._dataset_cache[key] = ref
            while len(self._dataset_cache) > _DATASET_CACHE:
                self._dataset_cache.popitem(last=False)
        else:
            self._dataset_cache.move_to_end(key)
        return ref

    def _unknown_barcode_message(
        self,
        project_id: str,
        dataset_id: str,
        unknown: Sequence[str],
        labels: Mapping[str, SpotLabelInput],
    ) -> str:
        first = unknown[0]
        with self.db.read() as s:
            others = s.scalars(
                select(m.Dataset.dataset_id)
                .join(m.Spot, m.Spot.dataset_pk == m.Dataset.id)
                .where(
                    m.Dataset.project_id == project_id,
                    m.Dataset.dataset_id != dataset_id,
                    m.Spot.barcode == first,
                )
                .order_by(m.Dataset.dataset_id)
            ).all()
        where = f" (it is a spot of dataset {', '.join(others)})" if others else ""
        more = f"; {len(unknown) - 1} more unknown barcodes" if len(unknown) > 1 else ""
        return f"{labels[first].row}: barcode {first!r} is not a spot of dataset {dataset_id!r}{where}{more}"

    def import_loupe_csv(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        data: bytes,
        *,
        annotator: str,
        annotator_role: str = "annotator",
        add_missing_classes: bool = False,
        queryset_id: str = "",
        create_annotator: bool = True,
    ) -> BatchResult:
        """Import a Loupe category CSV as one label batch (``help`` rows are placeholders).

        Raises:
            InvalidArgument: see :func:`loupe.parse_loupe_csv` and :meth:`submit_labels`.
            NotFound: unknown project or dataset.
        """
        parsed = parse_loupe_csv(data)
        if parsed.n_empty:
            log.info("Loupe import %s/%s batch %s: %d row(s) with an empty label skipped",
                     project_id, dataset_id, batch_id, parsed.n_empty)
        result = self.submit_labels(
            project_id,
            dataset_id,
            batch_id,
            parsed.labels,
            annotator=annotator,
            annotator_role=annotator_role,
            source="loupe_csv",
            add_missing_classes=add_missing_classes,
            queryset_id=queryset_id,
            n_placeholders=len(parsed.placeholders),
            create_annotator=create_annotator,
        )
        return dataclasses.replace(result, n_empty=parsed.n_empty)

    # consensus, exports ---------------------------------------------------------------------
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

    def consensus(self, project_id: str, *, dataset_id: str = "") -> ConsensusResult:
        """The current consensus labels (items are ``(dataset, barcode)``)."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            if dataset_id:
                self._dataset(s, project_id, dataset_id)
            votes = self._votes(s, project_id, dataset_id=dataset_id)
        return compute_consensus(votes, project.consensus)

    def labels_snapshot(self, project_id: str, label_version: int) -> dict[str, Any]:
        """The consensus training labels as of ``label_version``, computed from scratch.

        Only label events up to that version count, so the result never changes. See
        :func:`snapshot.snapshot_document` for the format; the relay builds the same
        document incrementally (:class:`snapshot.SnapshotBuilder`).
        """
        with self.db.read() as s:
            project = self._project(s, project_id)
            votes = self._votes(s, project_id, max_version=label_version)
        result = compute_consensus(votes, project.consensus)
        return snapshot_document(
            project_id,
            label_version,
            project.consensus,
            self.classes_at(project_id, label_version),
            result,
            label_batches(self.db, project_id, label_version),
        )

    # what the snapshot builder reads
    def consensus_rule(self, project_id: str) -> str:
        """The project's consensus rule."""
        with self.db.read() as s:
            return self._project(s, project_id).consensus

    def snapshot_inputs(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> tuple[list[Vote], list[tuple[str, str]]]:
        """Label events with ``after_version < label_version <= up_to_version`` (commit order),
        and the class schema as of ``up_to_version`` — what a snapshot builder needs."""
        with self.db.read() as s:
            votes = (
                self._votes(s, project_id, min_version=after_version, max_version=up_to_version)
                if up_to_version > after_version
                else []
            )
            return votes, self._classes_at(s, project_id, up_to_version)

    def snapshot_batches(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> list[tuple[int, str]]:
        """The label batches in ``(after_version, up_to_version]`` (see :mod:`.history`)."""
        return label_batches(self.db, project_id, up_to_version, after_version=after_version)

    def classes_at(self, project_id: str, label_version: int) -> list[tuple[str, str]]:
        """``(name, colour)`` of the class schema as of a label version, in order."""
        with self.db.read() as s:
            return self._classes_at(s, project_id, label_version)

    def _classes_at(self, s: Session, project_id: str, label_version: int) -> list[tuple[str, str]]:
        C = m.ProjectClass.__table__
        return [
            (name, color)
            for name, color in s.execute(
                select(C.c.name, C.c.color)
                .where(C.c.project_id == project_id, C.c.since_version <= label_version)
                .order_by(C.c.position)
            )
        ]

    def embeddings_uris(self, project_id: str) -> list[str]:
        """The latest embeddings URI of each dataset of a project that has one (by dataset id)."""
        with self.db.read() as s:
            return list(
                s.scalars(
                    select(m.Dataset.embeddings_uri)
                    .where(
                        m.Dataset.project_id == project_id,
                        m.Dataset.embeddings_uri != "",
                        m.Dataset.removed_at.is_(None),  # RemoveDataset: out of the pool
                    )
                    .order_by(m.Dataset.dataset_id)
                )
            )

    def export_labels(
        self, project_id: str, dataset_id: str, *, group: str = ""
    ) -> tuple[bytes, int]:
        """The consensus labels of a dataset as a Loupe CSV ``Barcode,<group>``."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            dataset = self._dataset(s, project_id, dataset_id)
            assert dataset is not None
            votes = self._votes(s, project_id, dataset_id=dataset_id)
            order = self._spot_order(s, dataset.id)
        result = compute_consensus(votes, project.consensus)
        labels = {barcode: c.label for (_ds, barcode), c in result.labels.items()}
        return labels_csv(labels, group=_group(group, DEFAULT_GROUP), order=order)

    def export_query_set(
        self, project_id: str, dataset_id: str, *, group: str = "", queryset_id: str = ""
    ) -> tuple[bytes, int]:
        """A query set's spots of a dataset, each marked ``help``, as a Loupe CSV."""
        record = self.get_query_set(project_id, queryset_id)
        with self.db.read() as s:
            dataset = self._dataset(s, project_id, dataset_id)
            assert dataset is not None
            order = self._spot_order(s, dataset.id)
        barcodes = [q.barcode for q in record.spots if q.dataset in ("", dataset_id)]
        return query_set_csv(barcodes, group=_group(group, DEFAULT_GROUP), order=order)

    def export_predictions(
        self, project_id: str, dataset_id: str, *, group: str = "", queryset_id: str = ""
    ) -> tuple[bytes, int]:
        """Predicted classes of a dataset with the query spots marked ``help``.

        Raises:
            FailedPrecondition: no query set with predictions yet, or no predictions loader wired.
        """
        record = self.get_query_set(project_id, queryset_id)
        if not record.predictions_uri:
            raise FailedPrecondition(
                f"query set {record.queryset_id!r} carries no predictions (cold start?)"
            )
        if self.predictions_loader is None:
            raise FailedPrecondition(
                "the predictions export is not wired to a predictions reader yet"
            )
        with self.db.read() as s:
            dataset = self._dataset(s, project_id, dataset_id)
            assert dataset is not None
            order = self._spot_order(s, dataset.id)
        predictions = self.predictions_loader(record.predictions_uri, dataset_id)
        barcodes = [q.barcode for q in record.spots if q.dataset in ("", dataset_id)]
        return predictions_csv(
            predictions, barcodes, group=_group(group, DEFAULT_PREDICTIONS_GROUP), order=order
        )

    def _spot_order(self, s: Session, dataset_pk: int) -> list[str]:
        return list(
            s.scalars(
                select(m.Spot.barcode).where(m.Spot.dataset_pk == dataset_pk).order_by(m.Spot.id)
            )
        )

    # query sets -----------------------------------------------------------------------------
    def record_query_set(self, record: QuerySetRecord, event_id: str) -> bool:
        """Store a query set from ``queryset.ready`` and open its round.

        Returns:
            False when it is a duplicate (same event id or query-set id) or the project is
            unknown (logged); True when stored.
        """
        now = _now()
        try:
            with self.db.write() as s:
                if s.get(m.Project, record.project_id) is None:
                    log.warning(
                        "query set %s for unknown project %s ignored",
                        record.queryset_id,
                        record.project_id,
                    )
                    return False
                seen = s.scalar(
                    select(m.QuerySet.id).where(
                        (m.QuerySet.event_id == event_id)
                        | and_(
                            m.QuerySet.project_id == record.project_id,
                            m.QuerySet.queryset_id == record.queryset_id,
                        )
                    )
                )
                if seen is not None:
                    return False
                qs = m.QuerySet(
                    project_id=record.project_id,
                    queryset_id=record.queryset_id,
                    event_id=event_id,
                    round=record.round,
                    strategy=record.strategy,
                    model_version=record.model_version,
                    label_version=record.label_version,
                    queryset_uri=record.queryset_uri,
                    predictions_uri=record.predictions_uri,
                    metrics=dict(record.metrics),
                    stopping=dict(record.stopping),
                    created_at=record.created_at or now,
                )
                s.add(qs)
                s.flush()
                if record.spots:
                    s.execute(
                        insert(m.QuerySetSpot.__table__),
                        [
                            {
                                "queryset_pk": qs.id,
                                "position": i,
                                "dataset_id": q.dataset,
                                "barcode": q.barcode,
                                "score": q.score,
                                "reason": q.reason,
                            }
                            for i, q in enumerate(record.spots)
                        ],
                    )
                held = s.get(m.Round, (record.project_id, record.round))
                if held is None:
                    s.add(
                        m.Round(
                            project_id=record.project_id,
                            round=record.round,
                            queryset_pk=qs.id,
                            label_version=record.label_version,
                            started_at=now,
                        )
                    )
                else:  # a re-issued query set for the same round replaces the round's query set
                    held.queryset_pk = qs.id
        except IntegrityError:
            return False
        return True

    def get_query_set(self, project_id: str, queryset_id: str = "") -> QuerySetRecord:
        """A query set (the latest if ``queryset_id`` is empty). Raises :class:`NotFound`."""
        with self.db.read() as s:
            self._project(s, project_id)
            query = select(m.QuerySet).where(m.QuerySet.project_id == project_id)
            if queryset_id:
                query = query.where(m.QuerySet.queryset_id == queryset_id)
            qs = s.scalars(query.order_by(m.QuerySet.id.desc()).limit(1)).first()
            if qs is None:
                what = f"query set {queryset_id!r} not found" if queryset_id else "no query set yet"
                raise NotFound(f"{what} in project {project_id!r}")
            return self._query_set_record(s, qs)

    def list_query_sets(
        self, project_id: str, *, after: int = 0
    ) -> list[tuple[int, QuerySetRecord]]:
        """``(sequence, query set)`` of a project in arrival order, those after ``after`` only."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.QuerySet)
                .where(m.QuerySet.project_id == project_id, m.QuerySet.id > after)
                .order_by(m.QuerySet.id)
            ).all()
            return [(qs.id, self._query_set_record(s, qs)) for qs in rows]

    def _query_set_record(self, s: Session, qs: m.QuerySet) -> QuerySetRecord:
        spots = s.execute(
            select(
                m.QuerySetSpot.barcode,
                m.QuerySetSpot.score,
                m.QuerySetSpot.dataset_id,
                m.QuerySetSpot.reason,
            )
            .where(m.QuerySetSpot.queryset_pk == qs.id)
            .order_by(m.QuerySetSpot.position)
        )
        return QuerySetRecord(
            queryset_id=qs.queryset_id,
            project_id=qs.project_id,
            round=qs.round,
            strategy=qs.strategy,
            model_version=qs.model_version,
            spots=tuple(
                QuerySpot(barcode=b, score=sc, dataset=d, reason=r) for b, sc, d, r in spots
            ),
            label_version=qs.label_version,
            queryset_uri=qs.queryset_uri,
            predictions_uri=qs.predictions_uri,
            metrics=qs.metrics or {},
            stopping=qs.stopping or {},
            created_at=_utc(qs.created_at),
        )

    # status, agreement ----------------------------------------------------------------------
    def status(self, project_id: str) -> ProjectStatus:
        """Round, labels per class, latest model metrics, stopping signal, pending events."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            classes = [c.name for c in self._classes(s, project_id)]
            round_no = (
                s.scalar(select(func.max(m.Round.round)).where(m.Round.project_id == project_id))
                or 0
            )
            latest = s.scalars(
                select(m.QuerySet)
                .where(m.QuerySet.project_id == project_id)
                .order_by(m.QuerySet.id.desc())
                .limit(1)
            ).first()
            n_spots = (
                s.scalar(
                    select(func.coalesce(func.sum(m.Dataset.n_in_tissue), 0)).where(
                        m.Dataset.project_id == project_id, m.Dataset.removed_at.is_(None)
                    )
                )
                or 0
            )
            pending = (
                s.scalar(
                    select(func.count())
                    .select_from(m.Outbox)
                    .where(m.Outbox.project_id == project_id, m.Outbox.published_at.is_(None))
                )
                or 0
            )
            asked = (
                s.scalar(
                    select(func.count())
                    .select_from(m.QuerySetSpot)
                    .where(m.QuerySetSpot.queryset_pk == latest.id)
                )
                if latest
                else 0
            )
            votes = self._votes(s, project_id)
        result = compute_consensus(votes, project.consensus)
        per_class = dict.fromkeys(classes, 0)
        for label in result.labels.values():
            per_class[label.label] = per_class.get(label.label, 0) + 1
        answered = latest is not None and latest.label_version == project.label_version
        return ProjectStatus(
            project_id=project_id,
            round=int(round_no),
            labelled_per_class=per_class,
            n_labelled=len(result.labels),
            n_spots=int(n_spots),
            label_version=project.label_version,
            latest_model_version=latest.model_version if latest else "",
            latest_metrics=(latest.metrics or {}) if latest else {},
            stopping=(latest.stopping or {}) if latest else {},
            n_disputed=sum(1 for c in result.labels.values() if c.disputed),
            pending_events=int(pending),
            notice=_classes_notice(per_class, int(asked or 0) if answered else None),
        )

    def agreement(self, project_id: str, dataset_id: str = "") -> AgreementReport:
        """Fleiss' kappa, Cohen's kappa per annotator pair, disputed spots, DS reliabilities."""
        with self.db.read() as s:
            self._project(s, project_id)
            if dataset_id:
                self._dataset(s, project_id, dataset_id)
            votes = self._votes(s, project_id, dataset_id=dataset_id)
            rule = self._project(s, project_id).consensus
            class_names = tuple(c.name for c in self._classes(s, project_id))
        per_item = latest_votes(votes)
        confusions = rater_confusions(per_item, compute_consensus(votes, rule).labels, class_names)
        fleiss, n_multi = fleiss_kappa(per_item)
        disputed = sorted(
            item for item, v in per_item.items() if len({x.label for x in v.values()}) > 1
        )
        _labels, reliability = dawid_skene(per_item)
        return AgreementReport(
            fleiss_kappa=fleiss,
            cohen=tuple(pairwise_cohen(per_item)),
            n_spots_multi_rated=n_multi,
            n_disputed=len(disputed),
            disputed=tuple(
                barcode if dataset_id else f"{ds}/{barcode}" for ds, barcode in disputed
            ),
            reliability=reliability,
            rater_confusion=tuple(confusions),
            confusion_classes=class_names,
        )

    # outbox ---------------------------------------------------------------------------------
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

    def pending_outbox(self, limit: int = 100) -> list[OutboxRow]:
        """Unpublished outbox rows, oldest first."""
        ob = m.Outbox.__table__
        with self.db.read() as s:
            rows = s.execute(
                select(
                    ob.c.id,
                    ob.c.project_id,
                    ob.c.topic,
                    ob.c.event_id,
                    ob.c.payload,
                    ob.c.label_version,
                    ob.c.attempts,
                )
                .where(ob.c.published_at.is_(None))
                .order_by(ob.c.id)
                .limit(limit)
            ).all()
        return [
            OutboxRow(
                id=r.id,
                project_id=r.project_id,
                topic=r.topic,
                event_id=r.event_id,
                payload=bytes(r.payload),
                label_version=r.label_version,
                attempts=r.attempts,
            )
            for r in rows
        ]

    def mark_published(self, row_ids: Sequence[int]) -> None:
        """Mark outbox rows published (idempotent)."""
        if not row_ids:
            return
        ob = m.Outbox.__table__
        with self.db.write() as s:
            s.execute(
                update(ob)
                .where(ob.c.id.in_(list(row_ids)), ob.c.published_at.is_(None))
                .values(published_at=_now())
            )

    def record_outbox_failure(self, row_id: int, error: str) -> None:
        """Count a failed publish attempt and keep its error for operators."""
        ob = m.Outbox.__table__
        with self.db.write() as s:
            s.execute(
                update(ob)
                .where(ob.c.id == row_id)
                .values(attempts=ob.c.attempts + 1, last_error=error[:2000])
            )

    @contextmanager
    def relay_lock(self) -> Iterator[bool]:
        """Whether this process may relay now: on PostgreSQL one replica at a time (advisory lock)."""
        if self.db.dialect != "postgresql":
            yield True
            return
        with self.db.engine.connect() as conn:
            held = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _RELAY_LOCK}).scalar()
            )
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _RELAY_LOCK})
                    conn.commit()

    def pending_count(self) -> int:
        """Outbox rows not yet published (all projects)."""
        with self.db.read() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(m.Outbox)
                    .where(m.Outbox.published_at.is_(None))
                )
                or 0
            )

    # helpers --------------------------------------------------------------------------------
    # recovery: UpdateProject, RemoveDataset ----------------------------------------------
    def update_project(
        self, project_id: str, config: LoopSettings, *, changed_by: str, reason: str = ""
    ) -> ProjectInfo:
        """Replace a project's loop config; the next ``labels.committed`` carries it.

        The change is recorded (before, after, who, when, why, from which label version);
        an unchanged config records nothing.

        Raises:
            NotFound: no such project.
            InvalidArgument: a bad config field (named), or a reason over 2000 characters.
        """
        config.validate()
        if len(reason) > 2000:
            raise InvalidArgument("reason: longer than 2000 characters")
        with self.db.write() as s:
            project = self._project(s, project_id, lock=True)
            before = _settings(project)
            if before != config:
                for name, value in config.__dict__.items():
                    setattr(project, name, value)
                s.add(
                    m.ProjectConfigChange(
                        project_id=project_id,
                        changed_by=changed_by,
                        changed_at=_now(),
                        reason=reason,
                        before=dict(before.__dict__),
                        after=dict(config.__dict__),
                        from_label_version=project.label_version + 1,
                    )
                )
                log.info("project %s: loop config changed by %s: %s", project_id, changed_by,
                         {k: v for k, v in config.__dict__.items() if before.__dict__[k] != v})
        self._project_meta_cache.pop(project_id, None)
        return self.get_project(project_id)

    def config_history(self, project_id: str) -> list[ConfigChange]:
        """Every UpdateProject change of a project, oldest first."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.ProjectConfigChange)
                .where(m.ProjectConfigChange.project_id == project_id)
                .order_by(m.ProjectConfigChange.id)
            ).all()
            return [
                ConfigChange(
                    before=_settings_from_json(r.before),
                    after=_settings_from_json(r.after),
                    changed_by=r.changed_by,
                    changed_at=_utc(r.changed_at),
                    reason=r.reason,
                    from_label_version=r.from_label_version,
                )
                for r in rows
            ]

    def remove_dataset(
        self, project_id: str, dataset_id: str, *, removed_by: str, reason: str = ""
    ) -> DatasetInfo:
        """Take a dataset out of the pool (soft): its spots and labels stay in the history.

        Later label batches no longer carry its embeddings, so training, prediction and
        query sets leave it out; labels for it are refused. Removing it again is a no-op.

        Raises:
            NotFound: no such project or dataset.
        """
        with self.db.write() as s:
            self._project(s, project_id, lock=True)
            d = self._dataset(s, project_id, dataset_id)
            assert d is not None
            if d.removed_at is None:
                d.removed_at = _now()
                d.removed_by = removed_by
                log.info("project %s: dataset %s removed from the pool by %s (%s)", project_id,
                         dataset_id, removed_by, reason or "no reason given")
        self._dataset_cache.pop((project_id, dataset_id), None)
        return self.get_dataset(project_id, dataset_id)

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


def _classes_notice(per_class: Mapping[str, int], asked: int | None) -> str:
    """GetStatus' notice while the labels cover too few classes for a model.

    ``asked``: the size of the query set chosen on the newest labels, None while it is
    still being chosen.
    """
    given = sum(1 for n in per_class.values() if n)
    if not 0 < given < MIN_TRAINING_CLASSES:
        return ""
    need = f"need labels of at least {MIN_TRAINING_CLASSES} classes"
    return f"{need}; choosing more spots" if asked is None else f"{need}; asking {asked} more spots"


def _validated_classes(
    classes: Sequence[ClassSpec], *, start: int, field_name: str
) -> list[ClassSpec]:
    specs: list[ClassSpec] = []
    seen: set[str] = set()
    for i, given in enumerate(classes):
        spec = given.validated(f"{field_name}[{i}]", start + i)
        if spec.name in seen:
            raise InvalidArgument(f"{field_name}[{i}]: {spec.name!r} is given twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _near_class(label: str, classes: Iterable[str]) -> str | None:
    """An existing class ``label`` differs from only in case or spacing, if any."""
    key = " ".join(label.split()).casefold()
    return next((c for c in classes if c != label and " ".join(c.split()).casefold() == key), None)


def _dedupe(labels: Iterable[SpotLabelInput]) -> dict[str, SpotLabelInput]:
    """Barcode → label of a batch; the same label twice is fine, two different ones are not."""
    unique: dict[str, SpotLabelInput] = {}
    for item in labels:
        barcode, label = item.barcode.strip(), item.label.strip()
        if not barcode:
            raise InvalidArgument(f"{item.row}: empty barcode")
        if not label:
            raise InvalidArgument(f"{item.row}: empty label for barcode {barcode!r}")
        if label.lower() == HELP_LABEL:
            raise InvalidArgument(f"{item.row}: {HELP_LABEL!r} is Loupe's placeholder, not a label")
        held = unique.get(barcode)
        if held is not None:
            if held.label != label:
                raise InvalidArgument(
                    f"{item.row}: barcode {barcode!r} is labelled {label!r} here but {held.label!r} at {held.row}"
                )
            continue
        unique[barcode] = SpotLabelInput(barcode=barcode, label=label, row=item.row)
    return unique


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


def _settings_from_json(values: Mapping[str, object]) -> LoopSettings:
    """Settings recorded in the history; fields added since take their defaults."""
    known = LoopSettings().__dict__
    return LoopSettings(**{**known, **{k: v for k, v in values.items() if k in known}})  # type: ignore[arg-type]


def _dataset_info(d: m.Dataset) -> DatasetInfo:
    return DatasetInfo(
        project_id=d.project_id,
        dataset_id=d.dataset_id,
        kind=d.kind,  # type: ignore[arg-type]
        n_spots=d.n_spots,
        n_in_tissue=d.n_in_tissue,
        slide_uri=d.slide_uri,
        spatial_uri_prefix=d.spatial_uri_prefix,
        expression_uri=d.expression_uri,
        embeddings_uri=d.embeddings_uri,
        registered_at=_utc(d.registered_at),
        removed_at=_utc(d.removed_at) if d.removed_at is not None else None,
        removed_by=d.removed_by or "",
        embedding_model=d.embedding_model or "",
        embedding_model_version=d.embedding_model_version or "",
        embedding_dim=d.embedding_dim or 0,
    )


def _group(given: str, default: str) -> str:
    group = (given or default).strip()
    if not group or not group.isprintable():
        raise InvalidArgument(f"group_name: {given!r} is not a printable name")
    return group


def _safe(name: str) -> str:
    return _SAFE_NAME.sub("_", name) or "file"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
