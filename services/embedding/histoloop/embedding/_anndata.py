"""Embeddings as AnnData (one per dataset and model), stored as .h5ad in the artifact store."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from histoloop.artifacts import ArtifactInfo, ArtifactStore
from histoloop.datasets import read_anndata, write_anndata
from histoloop.embedding._expression import ExpressionParams
from histoloop.errors import InvalidArgument

__all__ = ["H5AD_CONTENT_TYPE", "build_embedding_anndata", "read_embeddings", "write_embeddings"]

H5AD_CONTENT_TYPE = "application/x-hdf5"
_GEOMETRY = ("level", "x", "y", "size", "size0", "cx", "cy")
_DROP = ("chunk", "offset")


def build_embedding_anndata(
    index: pd.DataFrame,
    morph: np.ndarray | None,
    *,
    model_name: str,
    model_version: str = "",
    morph_aug: np.ndarray | None = None,
    expr: np.ndarray | None = None,
    expr_params: ExpressionParams | None = None,
    uns: dict[str, Any] | None = None,
) -> Any:
    """Build the embeddings AnnData of one dataset and model.

    Args:
        index: the patch index (``PatchSet.index``): ``id`` (barcode or tile id) and
            positions (``array_row``, ``array_col``, ``pxl_row_in_fullres``,
            ``pxl_col_in_fullres``, ``in_tissue`` for Visium; grid and level-0 geometry).
        morph: float32 (n, d) morphology vectors, rows in ``index`` order (clean view), or
            None for a dataset without an image (expression features only).
        model_name: embedding model name.
        model_version: its version.
        morph_aug: optional float32 (n_views, n, d) views (view 0 clean), as returned by
            :func:`embed_views`; stored as ``obsm["X_morph_aug"]`` with shape (n, n_views, d).
        expr: optional float32 (n, k) expression features, rows in ``index`` order.
        expr_params: the parameters that produced ``expr`` (stored for transfer).
        uns: more metadata for ``uns["embedding"]``.

    Returns:
        ``anndata.AnnData`` with ``obs`` indexed by barcode, ``obsm["X_morph"]``, optional
        ``obsm["X_morph_aug"]`` and ``obsm["X_expr"]``, ``obsm["spatial"]`` (x, y full-res
        pixels) for Visium, and ``uns["embedding"]`` / ``uns["expression"]``.

    Raises:
        InvalidArgument: shapes that do not match the index.
    """
    import anndata

    n = len(index)
    if morph is None and (morph_aug is not None or expr is None):
        raise InvalidArgument(
            "an embeddings AnnData needs morphology vectors or expression features"
        )
    if morph is not None:
        morph = np.asarray(morph, dtype=np.float32)
        if morph.ndim != 2 or morph.shape[0] != n:
            raise InvalidArgument(f"morph has shape {morph.shape}; expected ({n}, d)")
    if "id" not in index.columns:
        raise InvalidArgument("the patch index has no 'id' column")
    obs = index.drop(columns=[c for c in _DROP if c in index.columns]).copy()
    obs.index = pd.Index(obs.pop("id").astype(str).to_numpy(), name="barcode")
    if not obs.index.is_unique:
        raise InvalidArgument("patch ids are not unique")
    obsm: dict[str, np.ndarray] = {} if morph is None else {"X_morph": morph}
    if morph is not None and morph_aug is not None:
        morph_aug = np.asarray(morph_aug, dtype=np.float32)
        if morph_aug.ndim != 3 or morph_aug.shape[1:] != morph.shape:
            raise InvalidArgument(
                f"morph_aug has shape {morph_aug.shape}; expected (n_views, {n}, {morph.shape[1]})"
            )
        obsm["X_morph_aug"] = np.ascontiguousarray(morph_aug.transpose(1, 0, 2))
    if expr is not None:
        expr = np.asarray(expr, dtype=np.float32)
        if expr.ndim != 2 or expr.shape[0] != n:
            raise InvalidArgument(f"expr has shape {expr.shape}; expected ({n}, k)")
        obsm["X_expr"] = expr
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(obs.columns):
        obsm["spatial"] = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    meta: dict[str, Any] = {
        "model": model_name,
        "version": str(model_version),
        "dim": 0 if morph is None else int(morph.shape[1]),
        "n_views": int(morph_aug.shape[0]) if morph_aug is not None else 1,
    }
    meta.update(uns or {})
    adata_uns: dict[str, Any] = {"embedding": meta}
    if expr_params is not None:
        adata_uns["expression"] = expr_params.to_uns()
    return anndata.AnnData(obs=obs, obsm=obsm, uns=adata_uns)


def write_embeddings(store: ArtifactStore, key: str, adata: Any) -> ArtifactInfo:
    """Write an AnnData as ``.h5ad`` under ``key`` (immutable; see :func:`histoloop.datasets.write_anndata`).

    Raises:
        ArtifactExists: the key is taken.
    """
    write_anndata(store, key, adata)
    return store.stat(key)


def read_embeddings(store: ArtifactStore, key: str) -> Any:
    """Read an embeddings AnnData written by :func:`write_embeddings`.

    Raises:
        ArtifactNotFound: no such key.
    """
    return read_anndata(store, store.uri(key))
