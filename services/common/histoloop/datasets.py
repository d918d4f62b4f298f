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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition
from histoloop.formats.embeddings import OBSM_EXPR, OBSM_MORPH, embedding_dim
from histoloop.spatial import neighbour_indices, neighbour_mean_features, unit_positions
from histoloop.v1 import common_pb2

__all__ = [
    "Predictions",
    "feature_blocks",
    "feature_matrix",
    "read_anndata",
    "read_predictions",
    "write_anndata",
    "write_predictions",
]


def write_anndata(store: ArtifactStore, key: str, adata: ad.AnnData) -> str:
    """Store an AnnData as ``.h5ad`` under ``key`` (via a temporary file); returns its URI."""
    with tempfile.TemporaryDirectory(prefix="histoloop-h5ad-") as tmp:
        path = Path(tmp) / "data.h5ad"
        adata.write_h5ad(path)
        store.put_file(key, path, content_type="application/x-hdf5",
                       metadata={"n_obs": str(adata.n_obs), "dim": str(embedding_dim(adata.obsm))})
    return store.uri(key)


def read_anndata(store: ArtifactStore, uri: str) -> ad.AnnData:
    """Load an ``.h5ad`` artifact by URI (checksum verified), fully into memory."""
    with tempfile.TemporaryDirectory(prefix="histoloop-h5ad-") as tmp:
        path = store.get_file(store.key_from_uri(uri), Path(tmp) / "data.h5ad")
        return ad.read_h5ad(path)


def feature_blocks(adata: ad.AnnData, features: int, spatial_neighbours: int = 0) -> dict[str, np.ndarray]:
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
            raise FailedPrecondition("spatial_neighbours: the dataset's units have no positions "
                                     "(array_row/array_col, grid_row/grid_col or obsm['spatial']); set it to 0")
        neighbours = neighbour_indices(positions, min(spatial_neighbours, max(len(positions) - 1, 1)))
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
