"""Data that travels between services as artifacts: embeddings, label snapshots, predictions.

Every service reads these through this module, so the formats have one definition.

- **Embeddings**: one AnnData (``.h5ad``) per dataset and model; ``obs`` is indexed by
  barcode with ``array_row``/``array_col`` (and pixel positions); ``obsm["X_morph"]`` holds
  image vectors, ``obsm["X_expr"]`` gene-expression features (either may be absent).
- **Predictions**: an ``.npz`` with barcodes, dataset ids, classes, probabilities and the
  model's hidden features for every spot of a project.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition, InvalidArgument
from histoloop.v1 import common_pb2

__all__ = [
    "Predictions",
    "feature_matrix",
    "neighbour_indices",
    "neighbour_means",
    "read_anndata",
    "read_predictions",
    "write_anndata",
    "write_predictions",
]


def write_anndata(store: ArtifactStore, key: str, adata: ad.AnnData) -> str:
    """Store an AnnData as ``.h5ad`` under ``key``; returns its URI."""
    buffer = io.BytesIO()
    adata.write_h5ad(buffer)
    store.put(key, buffer.getvalue(), content_type="application/x-hdf5")
    return store.uri(key)


def read_anndata(store: ArtifactStore, uri: str) -> ad.AnnData:
    """Load an ``.h5ad`` artifact by URI (checksum verified)."""
    data = store.get(store.key_from_uri(uri))
    return ad.read_h5ad(io.BytesIO(data))


def neighbour_indices(positions: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each spot's k nearest other spots (by array coordinates).

    Raises:
        InvalidArgument: positions are not (n, 2) or k is out of range.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise InvalidArgument(f"positions must be (n, 2), got {positions.shape}")
    if not 1 <= k < len(positions):
        raise InvalidArgument(f"spatial_neighbours must be between 1 and {len(positions) - 1}, got {k}")
    _, idx = cKDTree(positions).query(positions, k=k + 1)
    return idx[:, 1:]


def neighbour_means(x: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``[x, mean of each spot's neighbours' x]`` (n, 2d)."""
    return np.hstack([x, x[neighbours].mean(axis=1)]).astype(np.float32)


def feature_matrix(adata: ad.AnnData, features: int, spatial_neighbours: int = 0) -> np.ndarray:
    """The feature matrix a project's ``LoopConfig`` asks for, one row per ``adata.obs`` spot.

    Args:
        adata: a dataset's embeddings.
        features: a ``common_pb2.FeatureSet`` value (unspecified: whatever is there).
        spatial_neighbours: k for neighbour-mean features; 0 = off.

    Raises:
        FailedPrecondition: the features asked for are not in the embeddings.
    """
    blocks: list[np.ndarray] = []
    want_morph = features in (common_pb2.FEATURE_SET_MORPHOLOGY, common_pb2.FEATURE_SET_MULTIMODAL)
    want_expr = features in (common_pb2.FEATURE_SET_EXPRESSION, common_pb2.FEATURE_SET_MULTIMODAL)
    if features == common_pb2.FEATURE_SET_UNSPECIFIED:
        want_morph, want_expr = "X_morph" in adata.obsm, "X_expr" in adata.obsm
    for name, wanted in (("X_morph", want_morph), ("X_expr", want_expr)):
        if wanted:
            if name not in adata.obsm:
                raise FailedPrecondition(
                    f"embeddings have no {name}; the project asks for "
                    f"{common_pb2.FeatureSet.Name(features)}"
                )
            blocks.append(np.asarray(adata.obsm[name], dtype=np.float32))
    if not blocks:
        raise FailedPrecondition("embeddings hold no feature matrix (neither X_morph nor X_expr)")
    x = np.hstack(blocks)
    if spatial_neighbours:
        positions = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
        x = neighbour_means(x, neighbour_indices(positions, spatial_neighbours))
    return x


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

    @property
    def predicted(self) -> np.ndarray:
        """(n,) predicted class names."""
        return np.asarray(self.classes)[self.probabilities.argmax(axis=1)]


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
            member_probabilities=npz["member_probabilities"] if "member_probabilities" in npz else None,
            positions=npz["positions"] if "positions" in npz else None,
        )
