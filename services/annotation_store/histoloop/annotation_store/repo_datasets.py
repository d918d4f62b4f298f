"""The repository's datasets room: registration and ingest, tiles, unit layout, removal.

Registering a dataset copies its inputs into the artifact store and stores its spots
(announced by ``dataset.registered`` through the outbox); WSI tiles from ``tiles.ready``
become units; the latest embeddings of each dataset are remembered for the label events.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Row, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from histoloop import events
from histoloop.annotation_store import models as m
from histoloop.annotation_store.convert import loop_settings_to_proto
from histoloop.annotation_store.domain import DatasetInfo, DatasetSpec, check_id
from histoloop.annotation_store.doors import check_spots_on_slide, slide_size
from histoloop.annotation_store.repo_base import PRODUCER, RepositoryBase, _now, _settings, _utc
from histoloop.annotation_store.units import TileUnit, Unit, UnitLayout
from histoloop.artifacts.base import ArtifactExists, InvalidKey
from histoloop.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from histoloop.formats.positions import (
    SCALEFACTORS_FILE,
    find_positions_file,
    parse_positions,
    parse_scalefactors,
)
from histoloop.v1 import common_pb2, events_pb2

__all__ = ["DatasetsMixin", "unit_rows"]

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.=+@-]")
_KIND_NAMES = {"visium": common_pb2.DATASET_KIND_VISIUM, "wsi": common_pb2.DATASET_KIND_WSI}


def unit_rows(s: Session, dataset_pk: int) -> Sequence[Row[str, float, float, float | None, bool]]:
    """``(barcode, pxl_col, pxl_row, extent, in_tissue)`` of a dataset's units, in row order."""
    return s.execute(
        select(m.Spot.barcode, m.Spot.pxl_col, m.Spot.pxl_row, m.Spot.extent, m.Spot.in_tissue)
        .where(m.Spot.dataset_pk == dataset_pk)
        .order_by(m.Spot.id)
    ).all()


class DatasetsMixin(RepositoryBase):
    """Datasets: ingest, WSI tiles, unit layout, embeddings URIs, removal from the pool."""

    def list_datasets(self, project_id: str) -> list[DatasetInfo]:
        """A project's datasets in registration order. Raises :class:`NotFound`."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.Dataset).where(m.Dataset.project_id == project_id).order_by(m.Dataset.id)
            ).all()
            return [_dataset_info(d) for d in rows]

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

    def set_embeddings(
        self,
        project_id: str,
        dataset_id: str,
        uri: str,
        event_id: str,
        *,
        model: str = "",
        model_version: str = "",
        dim: int = 0,
    ) -> bool:
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
            d.embedding_model, d.embedding_model_version, d.embedding_dim = (
                model,
                model_version,
                dim,
            )
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
            rows = unit_rows(s, d.id)
            kind, scale = d.kind, d.slide_scale or 1.0
            slide_uri, spatial = d.slide_uri, d.spatial_uri_prefix
        if kind == "wsi":
            if not rows:
                raise FailedPrecondition(
                    f"dataset {dataset_id!r}: its tiles are not known yet (tiling still running?)"
                )
            # add_tiles stores every tile's side (extent is empty only for spots)
            units = tuple(
                Unit(b, x, y, size or 0.0, "square", bool(t)) for b, x, y, size, t in rows
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

    def embeddings_uris(self, project_id: str) -> dict[str, str]:
        """Dataset id → latest embeddings URI of each dataset of a project that has one, in
        dataset-id order."""
        with self.db.read() as s:
            rows = s.execute(
                select(m.Dataset.dataset_id, m.Dataset.embeddings_uri)
                .where(
                    m.Dataset.project_id == project_id,
                    m.Dataset.embeddings_uri != "",
                    m.Dataset.removed_at.is_(None),  # RemoveDataset: out of the pool
                )
                .order_by(m.Dataset.dataset_id)
            )
            return {str(dataset): str(uri) for dataset, uri in rows}

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
                log.info(
                    "project %s: dataset %s removed from the pool by %s (%s)",
                    project_id,
                    dataset_id,
                    removed_by,
                    reason or "no reason given",
                )
        self._dataset_cache.pop((project_id, dataset_id), None)
        return self.get_dataset(project_id, dataset_id)


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


def _safe(name: str) -> str:
    return _SAFE_NAME.sub("_", name) or "file"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
