"""ProbCover (Yehuda et al., NeurIPS 2022): cold start by maximum coverage of δ-balls.

In the low-budget regime the best first labels cover the data: every point within
distance δ of a labelled point is "covered", and greedy max coverage picks, one at a
time, the point whose δ-ball holds the most uncovered points. δ is the largest radius
whose balls stay *pure* for a share ``purity`` (the paper's α = 0.95) of the points,
purity being judged against k-means pseudo-labels: a ball is pure when no point of
another cluster lies inside it, i.e. when δ is below the point's distance to the
nearest point of another cluster. So δ is the ``1 − purity`` quantile of those
distances, computed exactly in blocks.

The points are in :func:`~histoloop.acquisition.diversity.diversity_space`, rows scaled
to unit length (the paper works with normalised self-supervised features).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from histoloop.errors import InvalidArgument

from . import cluster
from .diversity import diversity_space

__all__ = ["CoverPlan", "coverage_radius", "probcover_select"]

log = logging.getLogger(__name__)
_N_INIT = 3  # k-means restarts for the pseudo-labels (lowest inertia wins)


@dataclass(frozen=True)
class CoverPlan:
    """The result of :func:`probcover_select`.

    Attributes:
        rows: Chosen rows (into the full feature matrix), in pick order.
        gains: Points newly covered by each pick.
        delta: The ball radius used (in the unit-normalised diversity space).
        coverage: Share of the considered points covered after the picks.
    """

    rows: np.ndarray
    gains: np.ndarray
    delta: float
    coverage: float


def _unit_rows(features: np.ndarray) -> np.ndarray:
    Z = diversity_space(features)
    norms = np.sqrt(cluster.row_sq_norms(Z))
    norms[norms == 0] = 1.0
    Z /= norms[:, None]
    return Z


def coverage_radius(Z: np.ndarray, pseudo_labels: np.ndarray, purity: float) -> float:
    """Largest δ whose balls are pure for a share ``purity`` of the points.

    Args:
        Z: ``(m, d)`` float32 points.
        pseudo_labels: ``(m,)`` cluster of every point.
        purity: Required share of pure balls, in (0, 1).

    Returns:
        δ ≥ 0 (0 when the clusters touch everywhere).
    """
    m = Z.shape[0]
    z_sq = cluster.row_sq_norms(Z)
    nearest_other = np.full(m, np.inf, dtype=np.float64)
    step = max(1, (32 << 20) // (4 * max(1, m)))
    for start in range(0, m, step):
        stop = min(m, start + step)
        D = cluster.sq_distances(Z[start:stop], Z, z_sq[start:stop], z_sq)
        D[pseudo_labels[start:stop, None] == pseudo_labels[None, :]] = np.inf
        nearest_other[start:stop] = D.min(axis=1)
    finite = nearest_other[np.isfinite(nearest_other)]
    if len(finite) == 0:  # one cluster: every ball is pure
        return 2.0
    # strictly below the quantile, so that the share of pure balls is at least `purity`
    return float(np.sqrt(np.quantile(finite, 1.0 - purity, method="lower"))) * (1.0 - 1e-6)


def _ball_graph(Z: np.ndarray, delta: float) -> sparse.csr_matrix:
    """``A[i, j] = 1`` where ``‖z_i − z_j‖ ≤ δ`` (symmetric, diagonal included)."""
    m = Z.shape[0]
    z_sq = cluster.row_sq_norms(Z)
    step = max(1, (32 << 20) // (4 * max(1, m)))
    rows, cols = [], []
    limit = np.float32(delta * delta)
    for start in range(0, m, step):
        stop = min(m, start + step)
        D = cluster.sq_distances(Z[start:stop], Z, z_sq[start:stop], z_sq)
        D[np.arange(stop - start), np.arange(start, stop)] = 0.0
        r, c = np.nonzero(D <= limit)
        rows.append(r + start)
        cols.append(c)
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    return sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(m, m))


def probcover_select(
    features: np.ndarray,
    labelled: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    purity: float = 0.95,
    n_clusters: int = 0,
    delta: float = 0.0,
    max_points: int = 20_000,
) -> CoverPlan:
    """Greedy maximum coverage of δ-balls, the labelled points counting as covered.

    Args:
        features: ``(n, h)`` features of every spot.
        labelled: ``(n,)`` bool, spots that already have a label (their balls count as
            covered; they are never picked).
        k: Picks wanted; fewer are returned once every considered point is covered.
        rng: Randomness (k-means seeding and subsampling of large pools).
        purity: α for choosing δ, in (0, 1).
        n_clusters: k-means pseudo-classes for the purity estimate (0 = ``max(k, 2)``).
        delta: Fixed ball radius in the unit-normalised space (0 = from ``purity``).
        max_points: Pools larger than this are subsampled (labelled rows kept) for the
            coverage computation.

    Returns:
        A :class:`CoverPlan`.

    Raises:
        InvalidArgument: Out-of-range parameter or mismatched shapes.
    """
    if not 0.0 < purity < 1.0:
        raise InvalidArgument(f"purity must be in (0, 1), got {purity}")
    if n_clusters < 0 or delta < 0 or max_points < 2:
        raise InvalidArgument("n_clusters and delta must be ≥ 0 and max_points ≥ 2")
    labelled = np.asarray(labelled, dtype=bool)
    n = len(labelled)
    considered = np.arange(n)
    if n > max_points:
        lab = np.flatnonzero(labelled)[: max_points // 2]
        free = rng.choice(np.flatnonzero(~labelled), size=max_points - len(lab), replace=False)
        considered = np.sort(np.concatenate([lab, free]))
        log.debug("probcover: coverage over %d of %d spots", len(considered), n)
    Z = _unit_rows(np.asarray(features)[considered])
    if delta == 0.0:
        c = int(min(len(considered), n_clusters or max(k, 2)))
        fits = [
            cluster.kmeans(Z, c, rng, max_fit_samples=max(10_000, 100 * c)) for _ in range(_N_INIT)
        ]
        best = min(fits, key=lambda km: float(km.sq_distances.sum()))
        delta = coverage_radius(Z, best.labels, purity)
    A = _ball_graph(Z, delta)
    is_lab = labelled[considered]
    covered = np.asarray(A[np.flatnonzero(is_lab)].sum(axis=0)).ravel() > 0
    candidate = ~is_lab
    picks: list[int] = []
    gains: list[int] = []
    for _ in range(min(k, int(candidate.sum()))):
        counts = A @ (~covered).astype(np.float32)
        counts[~candidate] = -1.0
        top = int(np.argmax(counts))  # ties: lowest row
        if counts[top] <= 0:
            break
        picks.append(top)
        gains.append(int(counts[top]))
        candidate[top] = False
        covered[A.indices[A.indptr[top] : A.indptr[top + 1]]] = True
    return CoverPlan(
        rows=considered[np.asarray(picks, dtype=np.int64)],
        gains=np.asarray(gains, dtype=np.int64),
        delta=float(delta),
        coverage=float(covered.mean()) if len(covered) else 1.0,
    )
