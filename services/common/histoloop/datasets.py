"""Data that travels between services as artifacts: embeddings, label snapshots, predictions.

Every service reads these through this module, so the formats have one definition.

- **Embeddings**: one AnnData (``.h5ad``) per dataset and model; ``obs`` is indexed by
  barcode with ``array_row``/``array_col`` (and pixel positions); ``obsm["X_morph"]`` holds
  image vectors, ``obsm["X_expr"]`` gene-expression features (either may be absent).
- **Predictions**: an ``.npz`` with barcodes, dataset ids, classes, probabilities and the
  model's hidden features for every spot of a project; when the model has a per-annotator
  model, also each annotator's predicted class of every spot (``raters``,
  ``rater_predicted``), from which their disagreement (:func:`rater_disagreement`) follows.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition
from histoloop.formats.embeddings import OBSM_EXPR, OBSM_MORPH, embedding_dim
from histoloop.formats.models import rater_index
from histoloop.spatial import neighbour_indices, neighbour_mean_features, unit_positions
from histoloop.v1 import common_pb2

__all__ = [
    "Predictions",
    "feature_blocks",
    "feature_matrix",
    "read_anndata",
    "predicted_classes",
    "rater_disagreement",
    "read_predictions",
    "write_anndata",
    "write_predictions",
]


def write_anndata(store: ArtifactStore, key: str, adata: ad.AnnData) -> str:
    """Store an AnnData as ``.h5ad`` under ``key`` (via a temporary file); returns its URI."""
    with tempfile.TemporaryDirectory(prefix="histoloop-h5ad-") as tmp:
        path = Path(tmp) / "data.h5ad"
        adata.write_h5ad(path)
        store.put_file(
            key,
            path,
            content_type="application/x-hdf5",
            metadata={"n_obs": str(adata.n_obs), "dim": str(embedding_dim(adata.obsm))},
        )
    return store.uri(key)


def read_anndata(store: ArtifactStore, uri: str) -> ad.AnnData:
    """Load an ``.h5ad`` artifact by URI (checksum verified), fully into memory."""
    with tempfile.TemporaryDirectory(prefix="histoloop-h5ad-") as tmp:
        path = store.get_file(store.key_from_uri(uri), Path(tmp) / "data.h5ad")
        return ad.read_h5ad(path)


def feature_blocks(
    adata: ad.AnnData, features: int, spatial_neighbours: int = 0
) -> dict[str, np.ndarray]:
    """The feature blocks a project's ``LoopConfig`` asks for: ``{"image": …, "genes": …}``.

    Each block is one row per ``adata.obs`` spot; with ``spatial_neighbours`` = k > 0 each
    block becomes ``[block, mean of the k nearest spots' block]``.

    Args:
        adata: a dataset's embeddings.
        features: a ``common_pb2.FeatureSet`` value (unspecified: whatever is there).
        spatial_neighbours: k for neighbour-mean features; 0 = off.

    Raises:
        FailedPrecondition: the features asked for are not in the embeddings.
    """
    want_morph = features in (common_pb2.FEATURE_SET_MORPHOLOGY, common_pb2.FEATURE_SET_MULTIMODAL)
    want_expr = features in (common_pb2.FEATURE_SET_EXPRESSION, common_pb2.FEATURE_SET_MULTIMODAL)
    if features == common_pb2.FEATURE_SET_UNSPECIFIED:
        want_morph, want_expr = OBSM_MORPH in adata.obsm, OBSM_EXPR in adata.obsm
    neighbours = None
    if spatial_neighbours:
        positions = unit_positions(adata)
        if positions is None:
            raise FailedPrecondition(
                "spatial_neighbours: the dataset's units have no positions "
                "(array_row/array_col, grid_row/grid_col or obsm['spatial']); set it to 0"
            )
        neighbours = neighbour_indices(
            positions, min(spatial_neighbours, max(len(positions) - 1, 1))
        )
    blocks: dict[str, np.ndarray] = {}
    for key, name, wanted in (("image", OBSM_MORPH, want_morph), ("genes", OBSM_EXPR, want_expr)):
        if not wanted:
            continue
        if name not in adata.obsm:
            raise FailedPrecondition(
                f"embeddings have no {name}; the project asks for {common_pb2.FeatureSet.Name(features)}"
            )
        block = np.asarray(adata.obsm[name], dtype=np.float32)
        blocks[key] = block if neighbours is None else neighbour_mean_features(block, neighbours)
    if not blocks:
        raise FailedPrecondition("embeddings hold no feature matrix (neither X_morph nor X_expr)")
    return blocks


def feature_matrix(adata: ad.AnnData, features: int, spatial_neighbours: int = 0) -> np.ndarray:
    """:func:`feature_blocks` side by side (image block first), one row per spot."""
    return np.hstack(list(feature_blocks(adata, features, spatial_neighbours).values()))


@dataclass(frozen=True)
class Predictions:
    """A model's output for every spot of a project."""

    model_version: str
    classes: Sequence[str]
    datasets: np.ndarray
    """(n,) dataset id of each spot."""
    barcodes: np.ndarray
    """(n,) barcode of each spot."""
    probabilities: np.ndarray
    """(n, C) float32."""
    hidden: np.ndarray
    """(n, h) float32: the model's hidden features (diversity strategies use them)."""
    member_probabilities: np.ndarray | None = None
    """(M, n, C) for ensembles (BALD), else None."""
    positions: np.ndarray | None = None
    """(n, 2) array row/column of each spot (spatially compact query sets), else None."""
    raters: Sequence[str] = ()
    """Annotators the model's per-annotator model knows (empty: it has none)."""
    rater_predicted: np.ndarray | None = None
    """(R, n) int class index each of ``raters`` would give each spot, else None."""

    @property
    def predicted(self) -> np.ndarray:
        """(n,) predicted class names."""
        return np.asarray(self.classes)[self.probabilities.argmax(axis=1)]

    def predicted_as(self, annotator: str) -> np.ndarray:
        """(n,) class names as ``annotator`` would label the spots (their per-annotator model).

        Raises:
            FailedPrecondition: the model has no per-annotator model.
            NotFound: the model knows no such annotator (the message names ``annotator_id``).
        """
        index = rater_index(
            self.raters if self.rater_predicted is not None else (), annotator, self.model_version
        )
        assert self.rater_predicted is not None
        return np.asarray(self.classes)[self.rater_predicted[index]]

    @property
    def rater_disagreement(self) -> np.ndarray | None:
        """(n,) :func:`rater_disagreement` of the per-annotator predictions, else None."""
        return None if self.rater_predicted is None else rater_disagreement(self.rater_predicted)


def rater_disagreement(predicted: np.ndarray) -> np.ndarray:
    """``(n,)`` share of annotator pairs whose predicted classes differ, per spot (0 = all agree).

    Args:
        predicted: ``(R, n)`` class index each of ``R`` annotators gives each spot.
    """
    predicted = np.asarray(predicted)
    m = predicted.shape[0]
    if m < 2:
        return np.zeros(predicted.shape[1])
    differ = sum(
        (predicted[i] != predicted[j]).astype(np.float64) for i in range(m) for j in range(i + 1, m)
    )
    return differ / (m * (m - 1) / 2)


def predicted_classes(
    predictions: Predictions, dataset_id: str, annotator: str = ""
) -> dict[str, str]:
    """Barcode → predicted class of one dataset's spots, by the consensus model or as ``annotator``.

    Raises:
        FailedPrecondition: ``annotator`` given and the model has no per-annotator model.
        NotFound: ``annotator`` unknown to the model.
    """
    predicted = predictions.predicted_as(annotator) if annotator else predictions.predicted
    return {
        str(barcode): str(label)
        for dataset, barcode, label in zip(
            predictions.datasets, predictions.barcodes, predicted, strict=True
        )
        if str(dataset) == dataset_id
    }


def write_predictions(store: ArtifactStore, key: str, predictions: Predictions) -> str:
    """Store predictions as ``.npz`` under ``key``; returns its URI."""
    buffer = io.BytesIO()
    arrays = {
        "model_version": np.array(predictions.model_version),
        "classes": np.array(list(predictions.classes), dtype=str),
        "datasets": predictions.datasets.astype(str),
        "barcodes": predictions.barcodes.astype(str),
        "probabilities": predictions.probabilities.astype(np.float32),
        "hidden": predictions.hidden.astype(np.float32),
    }
    if predictions.member_probabilities is not None:
        arrays["member_probabilities"] = predictions.member_probabilities.astype(np.float32)
    if predictions.positions is not None:
        arrays["positions"] = predictions.positions.astype(np.float64)
    if predictions.rater_predicted is not None:
        arrays["raters"] = np.array(list(predictions.raters), dtype=str)
        arrays["rater_predicted"] = predictions.rater_predicted.astype(np.int16)
    np.savez_compressed(buffer, **arrays)
    store.put(key, buffer.getvalue(), content_type="application/x-npz")
    return store.uri(key)


def read_predictions(store: ArtifactStore, uri: str) -> Predictions:
    """Load predictions by URI."""
    with np.load(io.BytesIO(store.get(store.key_from_uri(uri))), allow_pickle=False) as npz:
        return Predictions(
            model_version=str(npz["model_version"]),
            classes=[str(c) for c in npz["classes"]],
            datasets=npz["datasets"],
            barcodes=npz["barcodes"],
            probabilities=npz["probabilities"],
            hidden=npz["hidden"],
            member_probabilities=npz["member_probabilities"]
            if "member_probabilities" in npz
            else None,
            positions=npz["positions"] if "positions" in npz else None,
            raters=[str(r) for r in npz["raters"]] if "raters" in npz else [],
            rater_predicted=npz["rater_predicted"].astype(np.int64)
            if "rater_predicted" in npz
            else None,
        )
