"""Unlabelled spots put to work: label spreading over the spatial and feature graphs.

Neighbouring spots on the slide, and spots with similar features, tend to share a class.
:func:`label_spreading` (Zhou et al., "Learning with local and global consistency",
NIPS 2003) spreads the few labels over a graph whose edges join each spot to its ``k``
nearest spots in feature space and, where positions are known, to its nearest spots on
the slide; :func:`pseudo_labels` keeps the unlabelled spots whose spread class is
confident enough, and the head is trained on the labels plus those pseudo-labels
(self-training with a confidence threshold). By default every label starts with the same
mass; ``balanced`` gives every class the same mass instead, which keeps a class with few
labels from being swamped but, on DLPFC 151510 and HER2+ A1, left almost no spot above a
0.9 threshold (0 of 238 on A1 with 10–160 labels), while one unit per label gave
pseudo-labels that were 97–100 % right at 0.9 (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from histoloop.errors import InvalidArgument

__all__ = [
    "SemiSupervised",
    "combined_graph",
    "label_spreading",
    "pseudo_label_rows",
    "pseudo_labels",
]


@dataclass(frozen=True)
class SemiSupervised:
    """Settings of the pseudo-labelling step.

    Attributes:
        threshold: Smallest spread confidence (share of the spot's class mass) for a
            pseudo-label; 0 = off.
        feature_neighbours: ``k`` of the feature-space kNN graph.
        spatial_neighbours: Nearest spots on the slide joined to each spot (needs positions).
        alpha: Share of a spot's class mass that comes from its neighbours (0..1).
        iterations: Spreading iterations.
        max_share: At most this many pseudo-labels per real label (most confident first).
        balanced: Spread equal mass per class rather than per label.
    """

    threshold: float = 0.9
    feature_neighbours: int = 10
    spatial_neighbours: int = 6
    alpha: float = 0.9
    iterations: int = 30
    max_share: float = 5.0
    balanced: bool = False

    def validate(self) -> SemiSupervised:
        """Raise :class:`InvalidArgument` naming a bad field; returns self."""
        if not 0.0 <= self.threshold < 1.0:
            raise InvalidArgument(f"threshold must be in [0, 1), got {self.threshold}")
        if self.feature_neighbours < 0 or self.spatial_neighbours < 0:
            raise InvalidArgument("feature_neighbours and spatial_neighbours must be ≥ 0")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidArgument(f"alpha must be in (0, 1), got {self.alpha}")
        if self.iterations < 1 or self.max_share <= 0:
            raise InvalidArgument("iterations must be ≥ 1 and max_share > 0")
        return self


def combined_graph(
    features: np.ndarray,
    positions: np.ndarray | None,
    *,
    feature_neighbours: int = 10,
    spatial_neighbours: int = 6,
) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency: kNN in feature space ∪ nearest spots on the slide.

    Args:
        features: ``(n, d)`` standardised features.
        positions: ``(n, 2)`` spot positions, or None (feature graph only).
        feature_neighbours: ``k`` in feature space (0 = none).
        spatial_neighbours: ``k`` on the slide (0 = none).

    Returns:
        ``(n, n)`` CSR matrix without self-loops.
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    blocks = []
    for data, k in ((features, feature_neighbours), (positions, spatial_neighbours)):
        if data is None or k <= 0 or n < 2:
            continue
        k = min(k, n - 1)
        idx = (
            NearestNeighbors(n_neighbors=k + 1)
            .fit(data)
            .kneighbors(data, return_distance=False)[:, 1:]
        )
        rows = np.repeat(np.arange(n), k)
        blocks.append(sp.csr_matrix((np.ones(n * k), (rows, idx.ravel())), shape=(n, n)))
    if not blocks:
        raise InvalidArgument("label spreading needs a feature or a spatial graph (both k are 0)")
    W = sum(blocks[1:], blocks[0])
    W = ((W + W.T) > 0).astype(np.float64)
    W.setdiag(0)
    W.eliminate_zeros()
    return W.tocsr()


def label_spreading(
    graph: sp.spmatrix,
    labelled: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    alpha: float = 0.9,
    iterations: int = 30,
    balanced: bool = True,
) -> np.ndarray:
    """Class mass per spot after spreading the labels over ``graph``.

    ``F ← α·S·F + (1 − α)·Y`` with ``S = D^-½ W D^-½`` and ``Y`` one-hot labels scaled so
    that every class starts with the same total mass.

    Args:
        graph: ``(n, n)`` symmetric adjacency.
        labelled: ``(n,)`` bool.
        y: ``(n,)`` class index where labelled (other entries ignored).
        n_classes: Number of classes.
        alpha: Neighbours' share (0..1).
        iterations: Iterations.
        balanced: Give every class the same starting mass (else one unit per label).

    Returns:
        ``(n, C)`` float64, each row summing to 1 (uniform where nothing reached the spot).
    """
    n = graph.shape[0]
    labelled = np.asarray(labelled, bool)
    if labelled.shape != (n,) or np.shape(y) != (n,):
        raise InvalidArgument(f"labelled and y must be ({n},)")
    Y = np.zeros((n, n_classes))
    rows = np.flatnonzero(labelled)
    Y[rows, np.asarray(y)[rows]] = 1.0
    if balanced:
        mass = Y.sum(axis=0)
        Y[:, mass > 0] /= mass[mass > 0]
    deg = np.asarray(graph.sum(axis=1)).ravel()
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    S = sp.diags(inv) @ graph @ sp.diags(inv)
    F = Y.copy()
    for _ in range(iterations):
        F = alpha * (S @ F) + (1 - alpha) * Y
    total = F.sum(axis=1, keepdims=True)
    out = np.full_like(F, 1.0 / n_classes)
    reached = total[:, 0] > 0
    out[reached] = F[reached] / total[reached]
    return out


def pseudo_labels(
    spread: np.ndarray, labelled: np.ndarray, threshold: float, *, max_count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Unlabelled spots whose spread class is confident: ``(rows, classes)``, most confident first.

    Args:
        spread: ``(n, C)`` from :func:`label_spreading`.
        labelled: ``(n,)`` bool; labelled spots are never pseudo-labelled.
        threshold: Smallest confidence kept.
        max_count: At most this many (None = no cap).

    Returns:
        Row indices and their class indices (int64).
    """
    conf = spread.max(axis=1)
    cls = spread.argmax(axis=1)
    rows = np.flatnonzero(~np.asarray(labelled, bool) & (conf >= threshold))
    rows = rows[np.argsort(-conf[rows], kind="stable")]
    if max_count is not None:
        rows = rows[:max_count]
    return rows.astype(np.int64), cls[rows].astype(np.int64)


def pseudo_label_rows(
    features: np.ndarray,
    positions: np.ndarray | None,
    labelled_rows: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...] | list[str],
    settings: SemiSupervised,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels for one dataset: rows and class names to train on beside the real labels.

    Args:
        features: ``(n, d)`` features of every spot of the dataset (standardised).
        positions: ``(n, 2)`` spot positions, or None.
        labelled_rows: Rows with a label.
        labels: Their class names.
        classes: The project's classes (output order).
        settings: Threshold, graph sizes, spreading.

    Returns:
        ``(rows, class names)`` of confident unlabelled spots, at most ``max_share`` per label.
    """
    settings.validate()
    n = len(features)
    index = {c: i for i, c in enumerate(classes)}
    labelled = np.zeros(n, bool)
    labelled[labelled_rows] = True
    y = np.zeros(n, np.int64)
    y[labelled_rows] = [index[str(v)] for v in labels]
    if settings.threshold <= 0 or len(labelled_rows) == 0 or n < 3:
        return np.empty(0, np.int64), np.empty(0, dtype=object)
    graph = combined_graph(
        features,
        positions,
        feature_neighbours=settings.feature_neighbours,
        spatial_neighbours=settings.spatial_neighbours if positions is not None else 0,
    )
    spread = label_spreading(
        graph,
        labelled,
        y,
        len(classes),
        alpha=settings.alpha,
        iterations=settings.iterations,
        balanced=settings.balanced,
    )
    rows, cls = pseudo_labels(
        spread, labelled, settings.threshold, max_count=int(settings.max_share * len(labelled_rows))
    )
    return rows, np.asarray(classes, dtype=object)[cls]
