"""The overlay of one dataset for the browser workspace: every unit as columns.

:func:`unit_layer` gathers, for each spot or tile of a dataset, where it is (centre and
size in slide or Space Ranger full-res pixels), its consensus label, the caller's own
latest label, the latest predictions (class and uncertainty), whether annotators dispute
it and its place in the latest query set — one pass over the database and at most one
predictions artifact, so that 100,000 tiles cost a few array columns, not 100,000 objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from histoloop.annotation_store.consensus import compute_consensus, latest_votes
from histoloop.annotation_store.domain import QuerySetRecord
from histoloop.annotation_store.repo_base import Lru
from histoloop.annotation_store.repo_datasets import unit_rows
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import HistoloopError, NotFound
from histoloop.formats.positions import SCALEFACTORS_FILE, parse_scalefactors

__all__ = ["UnitLayerData", "unit_layer"]

log = logging.getLogger(__name__)

_VISIUM_SPOT_TO_PITCH = 55.0 / 100.0
"""Visium spots are 55 µm across on a 100 µm centre-to-centre grid."""
_CACHE = 8


@dataclass
class UnitLayerData:
    """Columns of a dataset's units (index ``i`` of each array is unit ``i``)."""

    project_id: str
    dataset_id: str
    kind: str
    slide_uri: str
    spatial_uri_prefix: str
    slide_scale: float
    coordinates: str
    """``slide`` (level-0 slide px) or ``fullres`` (Space Ranger full-res px; no slide)."""
    classes: list[str]
    class_colors: list[str]
    caller: str
    unit_ids: list[str] = field(default_factory=list)
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    in_tissue: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    consensus: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    mine: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    uncertainty: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    disputed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    query_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    queryset_id: str = ""
    round: int = 0
    model_version: str = ""
    votes: list[tuple[int, str, int]] = field(default_factory=list)
    """``(unit index, annotator, class index)`` of every disputed unit's latest labels."""


def _predicted(
    store: ArtifactStore, uri: str, dataset_id: str
) -> tuple[str, dict[str, tuple[str, float]]]:
    """Model version and (predicted class, uncertainty) per barcode of one dataset (cached by URI)."""
    key = (uri, dataset_id)
    cached = _PREDICTED.get(key)
    if cached is not None:
        assert isinstance(cached, tuple)
        return cached
    from histoloop.datasets import read_predictions  # numpy/anndata only when drawn

    predictions = read_predictions(store, uri)
    mask = predictions.datasets.astype(str) == dataset_id
    probabilities = predictions.probabilities[mask]
    classes = np.asarray(predictions.classes)
    best = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    uncertainty = 1.0 - probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    table = {
        str(b): (str(classes[c]), float(u))
        for b, c, u in zip(predictions.barcodes[mask], best, uncertainty, strict=True)
    }
    value = (predictions.model_version, table)
    _PREDICTED.put(key, value)
    return value


def _spot_diameter(store: ArtifactStore, spatial_uri_prefix: str, pxl: np.ndarray) -> float:
    """``spot_diameter_fullres`` from the copied scale factors, else 55/100 of the spot pitch."""
    if spatial_uri_prefix:
        try:
            key = store.key_from_uri(spatial_uri_prefix).rstrip("/") + "/" + SCALEFACTORS_FILE
            return parse_scalefactors(store.get(key), source=key).spot_diameter_fullres
        except (HistoloopError, OSError) as exc:
            log.info(
                "no spot diameter in %s (%s); estimating it from the spot pitch",
                spatial_uri_prefix,
                exc,
            )
    if len(pxl) < 2:
        return 1.0
    sample = pxl[: min(len(pxl), 2000)]
    d = np.sqrt(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(axis=1)) * _VISIUM_SPOT_TO_PITCH)


@dataclass(frozen=True)
class _Units:
    """A dataset's units (immutable once registered)."""

    ids: list[str]
    pxl: np.ndarray
    extent: np.ndarray
    """A tile's side (WSI units; 0 for spots)."""
    in_tissue: np.ndarray
    index: dict[str, int]


@dataclass(frozen=True)
class _Labels:
    """Consensus and every annotator's latest label, as of one label version."""

    consensus: dict[str, tuple[str, bool]]
    """barcode → (consensus label, disputed)."""
    latest: dict[str, dict[str, str]]
    """barcode → annotator → their latest label."""


@dataclass
class _Columns:
    """Label columns of one dataset as of one label version (``mine`` filled per caller)."""

    consensus: np.ndarray
    disputed: np.ndarray
    votes: list[tuple[int, str, int]]
    mine: dict[str, np.ndarray] = field(default_factory=dict)


def _label_columns(units: _Units, labels: _Labels, class_index: dict[str, int]) -> _Columns:
    n = len(units.ids)
    columns = _Columns(consensus=np.full(n, -1, np.int32), disputed=np.zeros(n, bool), votes=[])
    for barcode, (label, disputed) in labels.consensus.items():
        i = units.index.get(barcode)
        if i is not None:
            columns.consensus[i] = class_index.get(label, -1)
            columns.disputed[i] = disputed
            if disputed:
                for annotator, vote in sorted(labels.latest.get(barcode, {}).items()):
                    columns.votes.append((i, annotator, class_index.get(vote, -1)))
    return columns


_UNITS = Lru(_CACHE)
_COLUMNS = Lru(_CACHE)
_LABELS = Lru(_CACHE)
_PREDICTED = Lru(_CACHE)


def unit_layer(
    repo: AnnotationRepository,
    project_id: str,
    dataset_id: str,
    *,
    caller: str,
    header_only: bool = False,
) -> UnitLayerData:
    """Every unit of a dataset with labels, predictions, disputes and query order.

    Units are cached per dataset row and labels per label version, so only the first
    request after a commit recomputes the consensus.

    Args:
        repo: the annotation store's repository (database and artifact store).
        project_id: the project.
        dataset_id: one of its datasets.
        caller: the annotator whose own labels fill ``mine``.
        header_only: only describe the dataset and slide (no unit columns).

    Raises:
        NotFound: the project or dataset does not exist.
    """
    with repo.db.read() as s:
        project = repo._project(s, project_id)
        dataset = repo._dataset(s, project_id, dataset_id)
        assert dataset is not None
        classes = repo._classes(s, project_id)
        layer = UnitLayerData(
            project_id=project_id,
            dataset_id=dataset_id,
            kind=dataset.kind,
            slide_uri=dataset.slide_uri,
            spatial_uri_prefix=dataset.spatial_uri_prefix,
            slide_scale=dataset.slide_scale or 1.0,
            coordinates="slide" if dataset.slide_uri else "fullres",
            classes=[c.name for c in classes],
            class_colors=[c.color for c in classes],
            caller=caller,
        )
        if header_only:
            return layer
        units_key = (repo.db, dataset.id, dataset.registered_at, dataset.n_spots)
        units = _UNITS.get(units_key)
        if units is None:
            spots = unit_rows(s, dataset.id)
            ids = [b for b, *_rest in spots]
            units = _Units(
                ids=ids,
                pxl=np.array([(c, r) for _b, c, r, _e, _t in spots], dtype=np.float64).reshape(
                    len(spots), 2
                ),
                extent=np.array([e or 0.0 for _b, _c, _r, e, _t in spots], dtype=np.float64),
                in_tissue=np.array([bool(t) for *_rest, t in spots], dtype=bool),
                index={b: i for i, b in enumerate(ids)},
            )
            _UNITS.put(units_key, units)
        labels_key = (repo.db, project_id, dataset_id, project.label_version, project.consensus)
        labels = _LABELS.get(labels_key)
        if labels is None:
            votes = repo._votes(s, project_id, dataset_id=dataset_id)
            result = compute_consensus(votes, project.consensus)
            labels = _Labels(
                consensus={b: (c.label, c.disputed) for (_ds, b), c in result.labels.items()},
                latest={
                    b: {a: v.label for a, v in by.items()}
                    for (_ds, b), by in latest_votes(votes).items()
                },
            )
            _LABELS.put(labels_key, labels)
        tile_size = dataset.tile_size
    assert isinstance(units, _Units) and isinstance(labels, _Labels)
    n = len(units.ids)
    index = units.index
    class_index = {name: i for i, name in enumerate(layer.classes)}
    scale = layer.slide_scale if layer.coordinates == "slide" else 1.0
    layer.unit_ids = units.ids
    layer.x = (units.pxl[:, 0] * scale).astype(np.float32)
    layer.y = (units.pxl[:, 1] * scale).astype(np.float32)
    if layer.kind == "visium":
        side = _spot_diameter(repo.artifacts, layer.spatial_uri_prefix, units.pxl) * scale
        layer.size = np.full(n, side, dtype=np.float32)
    else:  # each tile's own side, as tiling cut it (level-0 px)
        sides = np.where(units.extent > 0, units.extent, float(tile_size or 1))
        layer.size = (sides * scale).astype(np.float32)
    layer.in_tissue = units.in_tissue

    columns_key = (labels_key, units_key, tuple(layer.classes))
    columns = _COLUMNS.get(columns_key)
    if columns is None:
        columns = _label_columns(units, labels, class_index)
        _COLUMNS.put(columns_key, columns)
    assert isinstance(columns, _Columns)
    layer.consensus, layer.disputed, layer.votes = (
        columns.consensus,
        columns.disputed,
        columns.votes,
    )
    mine = columns.mine.get(caller)
    if mine is None:
        mine = np.full(n, -1, np.int32)
        for barcode, by_annotator in labels.latest.items():
            label = by_annotator.get(caller)
            i = index.get(barcode)
            if label is not None and i is not None:
                mine[i] = class_index.get(label, -1)
        columns.mine[caller] = mine
    layer.mine = mine
    layer.predicted = np.full(n, -1, np.int32)
    layer.uncertainty = np.full(n, -1.0, np.float32)
    layer.query_rank = np.zeros(n, np.uint32)
    try:
        record: QuerySetRecord | None = repo.get_query_set(project_id)
    except NotFound:
        record = None
    if record is not None:
        layer.queryset_id, layer.round = record.queryset_id, record.round
        rank = 0
        for spot in record.spots:
            if spot.dataset not in ("", dataset_id):
                continue
            rank += 1
            i = index.get(spot.barcode)
            if i is not None:
                layer.query_rank[i] = rank
        if record.predictions_uri:
            layer.model_version, table = _predicted(
                repo.artifacts, record.predictions_uri, dataset_id
            )
            for barcode, (label, uncertainty) in table.items():
                i = index.get(barcode)
                if i is not None:
                    layer.predicted[i] = class_index.get(label, -1)
                    layer.uncertainty[i] = uncertainty
    return layer
