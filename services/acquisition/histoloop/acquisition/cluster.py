"""Distance, k-means, k-center and typicality kernels shared by every strategy.

Everything here works on float32 matrices, computes squared Euclidean distances with
the ``||a||² − 2·a·b + ||b||²`` identity in row blocks (so BLAS does the work and no
full ``n × m`` distance matrix is ever held), and draws all randomness from a
:class:`numpy.random.Generator` so that a seed fixes the result.

Peak extra memory stays well below the size of the input: the largest temporaries are
one distance block (``_BLOCK_BYTES``), a k-means fitting sample and a candidate buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

__all__ = [
    "KMeansResult",
    "as_float32",
    "closest_per_cluster",
    "kcenter_greedy",
    "kmeans",
    "nearest_centres",
    "row_sq_norms",
    "sq_distances",
    "typicality",
]

log = logging.getLogger(__name__)

_BLOCK_BYTES = 32 << 20  # one distance block: 32 MiB of float32
_NORM_BLOCK = 16384  # rows per block when computing squared norms


def as_float32(X: np.ndarray) -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 array, copying only when needed.

    Args:
        X: Any 2-D array-like.

    Returns:
        The same object when it is already C-contiguous float32, else a converted copy.
    """
    return np.ascontiguousarray(X, dtype=np.float32)


def row_sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of every row, computed in blocks.

    Args:
        X: ``(n, d)`` float32 matrix.

    Returns:
        ``(n,)`` float32 vector of ``||x_i||²``.
    """
    n = X.shape[0]
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _NORM_BLOCK):
        block = X[start : start + _NORM_BLOCK]
        out[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
    return out


def sq_distances(
    A: np.ndarray,
    B: np.ndarray,
    a_sq: np.ndarray | None = None,
    b_sq: np.ndarray | None = None,
) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``A`` and ``B``.

    Uses one matrix product; the result is clipped at 0 (float32 cancellation can make
    tiny distances slightly negative). Call it on blocks; it allocates ``len(A) × len(B)``.

    Args:
        A: ``(na, d)`` float32.
        B: ``(nb, d)`` float32.
        a_sq: Pre-computed ``row_sq_norms(A)``.
        b_sq: Pre-computed ``row_sq_norms(B)``.

    Returns:
        ``(na, nb)`` float32 matrix of squared distances.
    """
    if a_sq is None:
        a_sq = row_sq_norms(A)
    if b_sq is None:
        b_sq = row_sq_norms(B)
    D = A @ B.T
    D *= -2.0
    D += a_sq[:, None]
    D += b_sq[None, :]
    np.maximum(D, 0.0, out=D)
    return D


def _rows_per_block(m: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(1, m)))


def nearest_centres(
    X: np.ndarray,
    C: np.ndarray,
    *,
    x_sq: np.ndarray | None = None,
    c_sq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and squared distance to, the nearest row of ``C`` for every row of ``X``.

    Args:
        X: ``(n, d)`` float32 points.
        C: ``(m, d)`` float32 centres (``m ≥ 1``).
        x_sq: Pre-computed ``row_sq_norms(X)``.
        c_sq: Pre-computed ``row_sq_norms(C)``.

    Returns:
        ``(labels, sq_dist)``: ``(n,)`` int64 and ``(n,)`` float32.
    """
    n, m = X.shape[0], C.shape[0]
    if x_sq is None:
        x_sq = row_sq_norms(X)
    if c_sq is None:
        c_sq = row_sq_norms(C)
    labels = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=np.float32)
    step = _rows_per_block(m)
    for start in range(0, n, step):
        stop = min(n, start + step)
        D = sq_distances(X[start:stop], C, x_sq[start:stop], c_sq)
        arg = D.argmin(axis=1)
        labels[start:stop] = arg
        best[start:stop] = D[np.arange(stop - start), arg]
    return labels, best


def _update_min_sq(
    X: np.ndarray,
    x_sq: np.ndarray,
    centre_rows: np.ndarray,
    min_sq: np.ndarray,
) -> None:
    """Lower ``min_sq`` in place with the distances to ``X[centre_rows]``."""
    C = X[np.asarray(centre_rows, dtype=np.int64)]
    c_sq = x_sq[np.asarray(centre_rows, dtype=np.int64)]
    n = X.shape[0]
    c_step = max(1, min(len(C), 2048))
    for c0 in range(0, len(C), c_step):
        Cb, cb_sq = C[c0 : c0 + c_step], c_sq[c0 : c0 + c_step]
        step = _rows_per_block(len(Cb))
        for start in range(0, n, step):
            stop = min(n, start + step)
            D = sq_distances(X[start:stop], Cb, x_sq[start:stop], cb_sq)
            np.minimum(min_sq[start:stop], D.min(axis=1), out=min_sq[start:stop])


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32 cluster centres.
        labels: ``(n,)`` int64 cluster of every point.
        sq_distances: ``(n,)`` float32 squared distance of every point to its centre.
        n_iter: Lloyd iterations run.
    """

    centroids: np.ndarray
    labels: np.ndarray
    sq_distances: np.ndarray
    n_iter: int


def _kmeans_pp(X: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Plain k-means++ (D² sampling, one candidate per step); returns row indices."""
    n = X.shape[0]
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d = x_sq - 2.0 * (X @ X[chosen[0]]) + x_sq[chosen[0]]
    np.maximum(d, 0.0, out=d)
    for j in range(1, k):
        cum = np.cumsum(d, dtype=np.float64)
        total = cum[-1]
        if total <= 0.0:  # every point coincides with a centre: pick any new row
            rest = np.setdiff1d(np.arange(n), chosen[:j])
            chosen[j] = rest[rng.integers(len(rest))] if len(rest) else chosen[0]
        else:
            chosen[j] = min(int(np.searchsorted(cum, rng.random() * total, side="right")), n - 1)
        dj = x_sq - 2.0 * (X @ X[chosen[j]]) + x_sq[chosen[j]]
        np.minimum(d, np.maximum(dj, 0.0), out=d)
    return chosen


def _centroid_sums(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    onehot = sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ X, dtype=np.float32)
    counts = np.bincount(labels, minlength=k).astype(np.float32)
    return sums, counts


def kmeans(
    X: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    n_iter: int = 25,
    tol: float = 1e-4,
    max_fit_samples: int | None = None,
    x_sq: np.ndarray | None = None,
) -> KMeansResult:
    """Fast Lloyd k-means with k-means++ seeding, in float32 BLAS blocks.

    When ``max_fit_samples`` is smaller than ``n``, centres are fitted on a random
    subsample of that size and every point is then assigned in one blocked pass; this
    keeps cohort-scale pools (10⁵–10⁶ rows) within a second or two while the centres
    remain those of the full distribution.

    Args:
        X: ``(n, d)`` points (converted to float32).
        k: Number of clusters; clipped to ``n``.
        rng: Source of randomness (seeding and subsampling).
        n_iter: Maximum Lloyd iterations.
        tol: Stop when the total squared centre shift is below ``tol`` × mean feature
            variance × ``k``.
        max_fit_samples: Fit on at most this many rows (``None``: all rows).
        x_sq: Pre-computed ``row_sq_norms(X)``.

    Returns:
        A :class:`KMeansResult` covering every row of ``X``.
    """
    X = as_float32(X)
    n = X.shape[0]
    k = int(min(k, n))
    if x_sq is None:
        x_sq = row_sq_norms(X)
    if max_fit_samples is not None and n > max_fit_samples:
        fit_rows = np.sort(rng.choice(n, size=max_fit_samples, replace=False))
        Xf, xf_sq = X[fit_rows], x_sq[fit_rows]
    else:
        Xf, xf_sq = X, x_sq
    C = Xf[_kmeans_pp(Xf, xf_sq, k, rng)].copy()
    mean = Xf.mean(axis=0, dtype=np.float64)
    variance = max(float(xf_sq.mean()) - float(mean @ mean), 0.0) / max(1, X.shape[1])
    threshold = tol * variance * k
    iterations = 0
    for _ in range(n_iter):
        iterations += 1
        labels, d = nearest_centres(Xf, C, x_sq=xf_sq)
        sums, counts = _centroid_sums(Xf, labels, k)
        empty = np.flatnonzero(counts == 0)
        newC = sums / np.maximum(counts, 1.0)[:, None]
        if len(empty):  # re-seed empty clusters with the worst-fitted points
            far = np.argsort(-d, kind="stable")[: len(empty)]
            newC[empty[: len(far)]] = Xf[far]
        shift = float(((newC - C) ** 2).sum())
        C = newC.astype(np.float32, copy=False)
        if shift <= threshold and not len(empty):
            break
    labels, d = nearest_centres(X, C, x_sq=x_sq)
    return KMeansResult(centroids=C, labels=labels, sq_distances=d, n_iter=iterations)


def closest_per_cluster(labels: np.ndarray, sq_dist: np.ndarray, k: int) -> np.ndarray:
    """Row closest to its centre in each cluster.

    Args:
        labels: ``(n,)`` cluster of every row.
        sq_dist: ``(n,)`` squared distance of every row to its centre.
        k: Number of clusters.

    Returns:
        ``(k,)`` int64 row index per cluster, ``-1`` for an empty cluster. Rows are
        distinct because every row belongs to one cluster; ties go to the lowest index.
    """
    out = np.full(k, -1, dtype=np.int64)
    if len(labels) == 0:
        return out
    order = np.lexsort((np.arange(len(labels)), sq_dist, labels))
    sorted_labels = labels[order]
    first = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[sorted_labels[first]] = order[first]
    return out


def kcenter_greedy(
    X: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    centres: Sequence[int] | np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    x_sq: np.ndarray | None = None,
    buffer: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact greedy k-center (core-set) selection.

    Repeatedly picks the eligible row farthest from every centre so far. The result is
    the same as the textbook loop (one distance pass over ``X`` per pick), but most
    picks only touch a buffer of the ``buffer`` currently farthest rows: distances only
    ever shrink, so a buffered row whose exact distance is still at least the largest
    stale distance outside the buffer is the true farthest row. The whole matrix is
    revisited (one matrix product against all pending centres) only when the buffer
    runs dry, so ``X`` is streamed a few times instead of ``k`` times.

    Args:
        X: ``(n, d)`` float32 points.
        k: Number of rows to pick (clipped to the number of eligible rows).
        rng: Picks the first row when there are no initial centres.
        centres: Rows that are centres already (e.g. labelled spots).
        eligible: ``(n,)`` bool mask of rows that may be picked (default: all rows not
            in ``centres``).
        x_sq: Pre-computed ``row_sq_norms(X)``.
        buffer: Candidate buffer size.

    Returns:
        ``(indices, sq_dist)``: picked rows in pick order (int64) and each row's squared
        distance to the nearest centre when it was picked (``inf`` for a first pick
        without centres).
    """
    X = as_float32(X)
    n = X.shape[0]
    if x_sq is None:
        x_sq = row_sq_norms(X)
    centre_rows = np.asarray(centres if centres is not None else [], dtype=np.int64)
    elig = np.ones(n, dtype=bool) if eligible is None else np.array(eligible, dtype=bool)
    elig[centre_rows] = False
    k = int(min(k, int(elig.sum())))
    picked: list[int] = []
    picked_d: list[float] = []
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    min_sq = np.full(n, np.inf, dtype=np.float32)
    pending: list[int] = []
    if len(centre_rows):
        _update_min_sq(X, x_sq, centre_rows, min_sq)
    else:
        first = int(rng.choice(np.flatnonzero(elig)))
        picked.append(first)
        picked_d.append(float("inf"))
        pending.append(first)
        elig[first] = False
    refreshes = 0
    while len(picked) < k:
        if pending:
            _update_min_sq(X, x_sq, np.asarray(pending), min_sq)
            pending = []
            refreshes += 1
        score = np.where(elig, min_sq, -np.inf)
        n_left = int(elig.sum())
        size = min(buffer, n_left)
        if size < n_left:
            part = np.argpartition(score, n - size - 1)
            cand = part[n - size :]
            threshold = float(score[part[n - size - 1]])
        else:
            cand = np.flatnonzero(elig)
            threshold = -np.inf
        cd = score[cand].astype(np.float32)
        Xc, cq = X[cand], x_sq[cand]
        while len(picked) < k:
            j = int(np.argmax(cd))
            if cd[j] == -np.inf or cd[j] < threshold:
                break
            row = int(cand[j])
            picked.append(row)
            picked_d.append(float(cd[j]))
            pending.append(row)
            elig[row] = False
            dj = cq - 2.0 * (Xc @ X[row]) + x_sq[row]
            np.minimum(cd, np.maximum(dj, 0.0), out=cd)
            cd[j] = -np.inf
    log.debug("k-center greedy: %d picks, %d full passes over %d rows", k, refreshes, n)
    return np.asarray(picked, dtype=np.int64), np.asarray(picked_d, dtype=np.float32)


def typicality(
    X: np.ndarray,
    members: np.ndarray,
    candidates: np.ndarray,
    *,
    n_neighbors: int = 20,
    x_sq: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust typicality: inverse mean distance to the ``n_neighbors`` nearest members.

    Args:
        X: ``(n, d)`` float32 points.
        members: Rows forming the reference set (e.g. one cluster).
        candidates: Rows to score; each must also be in ``members`` (its zero
            self-distance is discarded).
        n_neighbors: Neighbours averaged (clipped to ``len(members) − 1``).
        x_sq: Pre-computed ``row_sq_norms(X)``.

    Returns:
        ``(len(candidates),)`` float64 typicality (higher = denser neighbourhood).
    """
    members = np.asarray(members, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    kk = int(min(n_neighbors, len(members) - 1))
    if kk <= 0:
        return np.ones(len(candidates), dtype=np.float64)
    if x_sq is None:
        x_sq = row_sq_norms(X)
    M, m_sq = X[members], x_sq[members]
    out = np.empty(len(candidates), dtype=np.float64)
    step = _rows_per_block(len(members))
    for start in range(0, len(candidates), step):
        rows = candidates[start : start + step]
        D = sq_distances(X[rows], M, x_sq[rows], m_sq)
        near = np.sqrt(np.partition(D, kk, axis=1)[:, : kk + 1], dtype=np.float64)
        mean = (near.sum(axis=1) - near.min(axis=1)) / kk
        out[start : start + len(rows)] = 1.0 / (mean + 1e-12)
    return out
