"""Spatial neighbours/smoothing and the stopping signal."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.acquisition import RoundPredictions, agreement_kappa, recommend_stop
from histoloop.errors import InvalidArgument
from histoloop.spatial import (
    neighbour_indices,
    neighbour_mean_features,
    smooth_probabilities,
    visium_array_positions,
)


def _hex_grid(rows: int = 10, cols: int = 20) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    keep = (r + c) % 2 == 0  # Visium: even rows use even columns, odd rows odd columns
    return r[keep], c[keep]


def test_hexagonal_neighbours_are_the_six_touching_spots() -> None:
    row, col = _hex_grid()
    pos = visium_array_positions(row, col)
    nb = neighbour_indices(pos, 6)
    assert nb.shape == (len(row), 6) and nb.dtype == np.int64
    assert not (nb == np.arange(len(row))[:, None]).any()
    i = int(np.flatnonzero((row == 4) & (col == 8))[0])
    got = {(int(row[j]), int(col[j])) for j in nb[i]}
    assert got == {(4, 6), (4, 10), (3, 7), (3, 9), (5, 7), (5, 9)}
    edge = neighbour_indices(pos, 6, max_distance=2.01)
    corner = int(np.flatnonzero((row == 0) & (col == 0))[0])
    assert (edge[corner] == -1).sum() == 4  # only (0,2) and (1,1) touch the corner


def test_neighbour_indices_validates() -> None:
    pos = np.zeros((5, 2))
    with pytest.raises(InvalidArgument, match="k"):
        neighbour_indices(pos, 5)
    with pytest.raises(InvalidArgument, match="k"):
        neighbour_indices(pos, 0)
    with pytest.raises(InvalidArgument, match=r"\(n, 2\)"):
        neighbour_indices(np.zeros((5, 3)), 2)
    nb = neighbour_indices(pos, 4)  # coincident spots: still never the spot itself
    assert not (nb == np.arange(5)[:, None]).any()


def test_neighbour_mean_features_and_smoothing() -> None:
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    nb = np.array([[1, 2], [0, -1], [3, 0], [-1, -1]])
    F = neighbour_mean_features(X, nb)
    assert F.shape == (4, 6)
    np.testing.assert_allclose(F[0, 3:], (X[1] + X[2]) / 2)
    np.testing.assert_allclose(F[1, 3:], X[0])
    np.testing.assert_allclose(F[3, 3:], X[3])  # no neighbours: itself
    P = np.array([[1, 0], [0, 1], [0.5, 0.5], [1, 0]], dtype=np.float32)
    np.testing.assert_allclose(smooth_probabilities(P, nb, 0.0), P)
    S = smooth_probabilities(P, nb, 0.5)
    np.testing.assert_allclose(S.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(S[0], [0.5 * 1 + 0.5 * 0.25, 0.5 * 0.75])
    with pytest.raises(InvalidArgument, match="alpha"):
        smooth_probabilities(P, nb, 1.5)
    with pytest.raises(InvalidArgument, match="neighbours"):
        neighbour_mean_features(X, nb[:2])


def test_agreement_kappa_matches_sklearn() -> None:
    from sklearn.metrics import cohen_kappa_score

    r = np.random.default_rng(0)
    a = r.integers(0, 5, 1000)
    b = np.where(r.random(1000) < 0.8, a, r.integers(0, 5, 1000))
    assert agreement_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert agreement_kappa(np.zeros(5, int), np.zeros(5, int)) == 1.0


def test_recommend_stop_waits_for_stable_rounds() -> None:
    r = np.random.default_rng(1)
    base = r.integers(0, 4, 2000)
    P = np.full((2000, 4), 0.05)
    P[np.arange(2000), base] = 0.85

    def noisy(share: float) -> RoundPredictions:
        pred = base.copy()
        flip = r.random(2000) < share
        pred[flip] = (pred[flip] + 1) % 4
        return RoundPredictions(pred, P)

    assert "need 3 rounds" in recommend_stop([noisy(0.3), noisy(0.2)]).reason
    history = [noisy(0.3), noisy(0.2), noisy(0.2)]
    signal = recommend_stop(history)
    assert not signal.stop and signal.changed_share > 0.1 and "changing" in signal.reason
    history = [noisy(0.3), RoundPredictions(base, P), RoundPredictions(base, P), noisy(0.002)]
    signal = recommend_stop(history, max_change=0.01, min_kappa=0.95, patience=2)
    assert signal.stop and signal.kappa > 0.99 and len(signal.kappa_history) == 3
    assert 0 < signal.mean_uncertainty < 1
    strict = recommend_stop(history, max_uncertainty=0.01)
    assert not strict.stop and "uncertainty" in strict.reason
    assert not recommend_stop(history[:1]).stop
    with pytest.raises(InvalidArgument, match="same spots"):
        recommend_stop([RoundPredictions(base), RoundPredictions(base[:10])])
