"""Spatial context on the Visium array: neighbours, neighbour-mean features, smoothing.

Neighbouring spots usually share a tissue class. Appending the mean of the neighbours'
features to each spot's own features, and smoothing predicted probabilities over the
spot graph, both exploit that.

Visium ``array_row``/``array_col`` live on a hexagonal lattice whose row step is √3
times the column step; :func:`visium_array_positions` converts them to isotropic
coordinates in which the six touching spots are all at distance 2. Pixel coordinates
(``obsm['spatial']``) are isotropic already.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from histoloop.errors import InvalidArgument

__all__ = [
    "neighbour_indices",
    "neighbour_mean_features",
    "smooth_probabilities",
    "unit_positions",
    "visium_array_positions",
]


def unit_positions(adata: object) -> np.ndarray | None:
    """Isotropic positions of a dataset's units, whatever their kind, or None.

    Visium/ST spots: ``obs["array_row"/"array_col"]`` (:func:`visium_array_positions`);
    WSI grid tiles: ``obs["grid_row"/"grid_col"]`` (a square grid); otherwise
    ``obsm["spatial"]`` pixels; None when the dataset has none of them.

    Args:
        adata: An AnnData (anything with ``obs`` and ``obsm``).

    Returns:
        ``(n, 2)`` float64, or None.
    """
    obs = adata.obs  # type: ignore[attr-defined]
    if {"array_row", "array_col"} <= set(obs.columns):
        return visium_array_positions(obs["array_row"].to_numpy(), obs["array_col"].to_numpy())
    if {"grid_row", "grid_col"} <= set(obs.columns):
        return np.stack(
            [obs["grid_col"].to_numpy(np.float64), obs["grid_row"].to_numpy(np.float64)], axis=1
        )
    obsm = adata.obsm  # type: ignore[attr-defined]
    if "spatial" in obsm:
        return np.asarray(obsm["spatial"], dtype=np.float64)[:, :2]
    return None


def visium_array_positions(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Isotropic ``(x, y)`` coordinates from Visium array row/column indices.

    Args:
        array_row: ``(n,)`` array rows.
        array_col: ``(n,)`` array columns.

    Returns:
        ``(n, 2)`` float64 ``(col, row·√3)``; touching spots are 2 apart.
    """
    row = np.asarray(array_row, dtype=np.float64)
    col = np.asarray(array_col, dtype=np.float64)
    if row.shape != col.shape or row.ndim != 1:
        raise InvalidArgument("array_row and array_col must be 1-D of the same length")
    return np.stack([col, row * np.sqrt(3.0)], axis=1)


def neighbour_indices(
    positions: np.ndarray, k: int, *, max_distance: float | None = None
) -> np.ndarray:
    """The ``k`` nearest other spots of every spot.

    Args:
        positions: ``(n, 2)`` coordinates (see :func:`visium_array_positions`).
        k: Neighbours per spot, ``1 ≤ k < n``.
        max_distance: If given, neighbours farther than this are replaced by ``-1``
            (e.g. at the tissue edge).

    Returns:
        ``(n, k)`` int64 neighbour rows, nearest first, never the spot itself
        (ties broken by row index).

    Raises:
        InvalidArgument: Bad shape or ``k``.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise InvalidArgument(f"positions must be (n, 2), got shape {pos.shape}")
    n = pos.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < n:
        raise InvalidArgument(f"k must be an integer in [1, {n - 1}], got {k!r}")
    if not np.isfinite(pos).all():
        raise InvalidArgument("positions contain NaN or infinite values")
    dist, idx = cKDTree(pos).query(pos, k=k + 1)
    rows = np.arange(n)[:, None]
    # drop the spot itself (not necessarily first when positions coincide)
    keep = idx != rows
    too_many = keep.sum(axis=1) > k
    keep[too_many, -1] = False
    out = idx[keep].reshape(n, k).astype(np.int64)
    if max_distance is not None:
        d = dist[keep].reshape(n, k)
        out[d > max_distance] = -1
    return out


def _neighbour_mean(values: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    nb = np.asarray(neighbours, dtype=np.int64)
    if nb.ndim != 2 or nb.shape[0] != values.shape[0]:
        raise InvalidArgument(f"neighbours must be ({values.shape[0]}, k), got shape {nb.shape}")
    if nb.size and nb.max() >= values.shape[0]:
        raise InvalidArgument("neighbour index out of range")
    valid = nb >= 0
    gathered = values[np.where(valid, nb, 0)] * valid[..., None]
    count = valid.sum(axis=1, keepdims=True)
    mean = gathered.sum(axis=1) / np.maximum(count, 1)
    # spots without any neighbour keep their own value
    return np.where(count > 0, mean, values)


def neighbour_mean_features(X: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Concatenate each spot's features with the mean of its neighbours' features.

    Args:
        X: ``(n, d)`` features.
        neighbours: ``(n, k)`` from :func:`neighbour_indices` (``-1`` = none).

    Returns:
        ``(n, 2d)`` float32 ``[X, mean of neighbours' X]``; a spot without neighbours
        uses its own features as the mean.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise InvalidArgument(f"X must be (n, d), got shape {X.shape}")
    return np.hstack([X, _neighbour_mean(X, neighbours).astype(np.float32)])


def smooth_probabilities(P: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """One step of graph smoothing: ``(1 − α)·P + α·mean of the neighbours' P``.

    Args:
        P: ``(n, C)`` class probabilities.
        neighbours: ``(n, k)`` from :func:`neighbour_indices`.
        alpha: Smoothing weight in [0, 1] (0 = unchanged).

    Returns:
        ``(n, C)`` float32 probabilities (rows sum to 1).
    """
    P = np.asarray(P, dtype=np.float32)
    if P.ndim != 2:
        raise InvalidArgument(f"P must be (n, C), got shape {P.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * P + alpha * _neighbour_mean(P, neighbours)
    out /= np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32, copy=False)
