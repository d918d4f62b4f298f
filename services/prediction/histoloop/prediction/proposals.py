"""Click-to-region proposals from a project's stored predictions (the ProposeRegion RPC).

The annotator clicks one unit of a dataset; the proposal is :func:`propose_region` over
the dataset's units, with the classes of the latest predictions artifact (or of a given
model version) and the units' isotropic positions from the dataset's embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoloop.artifacts.base import ArtifactStore
from histoloop.datasets import read_anndata, read_predictions
from histoloop.errors import FailedPrecondition, NotFound
from histoloop.formats.embeddings import embeddings_prefix, parse_embeddings_key
from histoloop.models import latest_card
from histoloop.prediction.regions import propose_region
from histoloop.spatial import unit_positions

__all__ = ["DEFAULT_MAX_UNITS", "RegionProposal", "predictions_key", "propose_clicked_region"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UNITS = 5000
_SPOT_NEIGHBOURS = 6
"""Touching spots on the Visium hexagonal grid."""
_TILE_NEIGHBOURS = 8
"""Touching tiles on a square WSI grid, diagonals included."""


def predictions_key(project: str, model_version: str) -> str:
    """Key of the predictions artifact a model's ``model.trained`` produced."""
    return f"predictions/{project}/{model_version}.npz"


@dataclass(frozen=True)
class RegionProposal:
    """A proposed region: unit ids, the clicked one first."""

    units: Sequence[str]
    class_name: str
    model_version: str


def _has_artifacts(store: ArtifactStore, prefix: str) -> bool:
    return next(iter(store.list(prefix)), None) is not None


def propose_clicked_region(
    store: ArtifactStore,
    project: str,
    dataset: str,
    unit: str,
    *,
    model_version: str = "",
    max_units: int = 0,
    annotator: str = "",
) -> RegionProposal:
    """The connected region of units the model gives the clicked unit's class.

    With ``annotator`` the classes are that annotator's, as the model's per-annotator
    module predicted them (stored with the predictions).

    Args:
        store: The artifact store holding models, predictions and embeddings.
        project: Project id.
        dataset: Dataset id within the project.
        unit: The clicked unit's id (barcode or tile id).
        model_version: The model whose predictions to use; empty: the newest.
        max_units: Largest region; 0: :data:`DEFAULT_MAX_UNITS`.
        annotator: Whose view; empty: the consensus model's.

    Returns:
        The region's unit ids (clicked first, then breadth first), its class and the model.

    Raises:
        NotFound: unknown project, model version, dataset, unit or annotator (the message
            names the field).
        FailedPrecondition: no predictions of the dataset yet, units without positions, or
            ``annotator`` given and the model has no per-annotator module.
    """
    try:
        _, card = latest_card(store, project, model_version)
    except NotFound:
        if model_version:
            raise NotFound(
                f"model_version: project {project!r} has no model {model_version!r}"
            ) from None
        if not _has_artifacts(store, embeddings_prefix(project)):
            raise NotFound(
                f"project_id: no project {project!r} with data (no embeddings, no models)"
            ) from None
        raise FailedPrecondition(
            f"project {project!r} has no predictions yet: label the first query set "
            "and wait for the first model"
        ) from None
    key = predictions_key(project, card.version)
    if not store.exists(key):
        raise FailedPrecondition(
            f"model {card.version} of project {project!r} has no predictions yet; "
            "try again when predictions.ready is announced"
        )
    predictions = read_predictions(store, store.uri(key))
    every = predictions.predicted_as(annotator) if annotator else predictions.predicted
    rows = np.flatnonzero(predictions.datasets == dataset)
    if rows.size == 0:
        if not _has_artifacts(store, embeddings_prefix(project, dataset)):
            raise NotFound(f"dataset_id: project {project!r} has no dataset {dataset!r}")
        raise FailedPrecondition(
            f"dataset {dataset!r} has no predictions from model {card.version} yet"
        )
    barcodes = predictions.barcodes[rows].astype(str)
    clicked = np.flatnonzero(barcodes == unit)
    if clicked.size == 0:
        raise NotFound(f"unit: dataset {dataset!r} has no unit {unit!r}")
    uri = next(
        (u for u in card.embeddings_uris if parse_embeddings_key(u).dataset == dataset), None
    )
    if uri is None:
        raise FailedPrecondition(f"model {card.version} names no embeddings of dataset {dataset!r}")
    adata = read_anndata(store, uri)
    positions = unit_positions(adata)
    if positions is None:
        raise FailedPrecondition(
            f"dataset {dataset!r}: its units have no positions "
            "(array_row/array_col, grid_row/grid_col or obsm['spatial'])"
        )
    index = {str(b): i for i, b in enumerate(adata.obs_names)}
    missing = [b for b in barcodes if b not in index]
    if missing:
        raise FailedPrecondition(
            f"dataset {dataset!r}: {len(missing)} predicted units are not in its "
            f"embeddings (e.g. {missing[0]!r})"
        )
    k = _TILE_NEIGHBOURS if {"grid_row", "grid_col"} <= set(adata.obs.columns) else _SPOT_NEIGHBOURS
    predicted = every[rows]
    region = propose_region(
        positions[[index[b] for b in barcodes]],
        predicted,
        int(clicked[0]),
        k=k,
        max_units=max_units or DEFAULT_MAX_UNITS,
    )
    log.info(
        "region of %d units around %s/%s/%s (model %s%s)",
        len(region),
        project,
        dataset,
        unit,
        card.version,
        f", as {annotator}" if annotator else "",
    )
    return RegionProposal(
        units=[str(barcodes[i]) for i in region],
        class_name=str(predicted[clicked[0]]),
        model_version=card.version,
    )
