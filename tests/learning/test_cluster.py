"""The shared distance/k-means/k-center/typicality kernels."""

from __future__ import annotations

import numpy as np

from histoloop.acquisition import cluster


def _naive_kcenter(X: np.ndarray, k: int, centres: list[int]) -> list[int]:
    D = ((X[:, None, :].astype(np.float64) - X[None, centres, :]) ** 2).sum(-1).min(axis=1)
    picked: list[int] = []
    for _ in range(k):
        j = int(np.argmax(D))
        picked.append(j)
        D = np.minimum(D, ((X.astype(np.float64) - X[j]) ** 2).sum(-1))
    return picked


def test_kcenter_greedy_matches_the_textbook_loop_with_a_small_buffer() -> None:
    r = np.random.default_rng(0)
    X = r.standard_normal((3000, 16)).astype(np.float32) * r.uniform(0.5, 3, (3000, 1))
    X = X.astype(np.float32)
    centres = [5, 17, 900]
    expected = _naive_kcenter(X, 40, centres)
    for buffer in (4, 64, 5000):  # 4 forces many full passes; 5000 holds every row
        got, d = cluster.kcenter_greedy(X, 40, r, centres=centres, buffer=buffer)
        assert got.tolist() == expected
        assert np.all(np.diff(d) <= 1e-3)  # picked distances never grow


def test_kcenter_greedy_respects_eligibility_and_cold_start() -> None:
    r = np.random.default_rng(1)
    X = r.standard_normal((500, 4)).astype(np.float32)
    eligible = np.zeros(500, bool)
    eligible[100:200] = True
    got, d = cluster.kcenter_greedy(X, 30, np.random.default_rng(3), eligible=eligible)
    assert len(set(got.tolist())) == 30 and eligible[got].all()
    assert np.isinf(d[0])  # first pick without centres is random
    again, _ = cluster.kcenter_greedy(X, 30, np.random.default_rng(3), eligible=eligible)
    assert got.tolist() == again.tolist()
    few, _ = cluster.kcenter_greedy(X, 1000, r, eligible=eligible)
    assert len(few) == 100


def test_kmeans_recovers_separated_clusters_with_and_without_subsampling() -> None:
    r = np.random.default_rng(2)
    centres = r.standard_normal((5, 32)).astype(np.float32) * 20
    truth = r.integers(0, 5, 4000)
    X = (centres[truth] + r.standard_normal((4000, 32))).astype(np.float32)
    for fit in (None, 500):
        km = cluster.kmeans(X, 5, np.random.default_rng(0), max_fit_samples=fit)
        # a perfect partition: each found cluster is one true cluster
        pairs = {(int(a), int(b)) for a, b in zip(km.labels, truth, strict=True)}
        assert len(pairs) == 5
        reps = cluster.closest_per_cluster(km.labels, km.sq_distances, 5)
        assert sorted(truth[reps].tolist()) == [0, 1, 2, 3, 4]


def test_sq_distances_and_nearest_centres_agree_with_numpy() -> None:
    r = np.random.default_rng(3)
    A = r.standard_normal((50, 7)).astype(np.float32)
    B = r.standard_normal((9, 7)).astype(np.float32)
    D = cluster.sq_distances(A, B)
    ref = ((A[:, None] - B[None]) ** 2).sum(-1)
    np.testing.assert_allclose(D, ref, rtol=1e-4, atol=1e-4)
    labels, best = cluster.nearest_centres(A, B)
    assert labels.tolist() == ref.argmin(1).tolist()
    np.testing.assert_allclose(best, ref.min(1), rtol=1e-4, atol=1e-4)


def test_typicality_is_highest_in_the_dense_core() -> None:
    r = np.random.default_rng(4)
    X = np.concatenate([r.standard_normal((200, 3)), [[6.0, 0, 0]]]).astype(np.float32)
    members = np.arange(201)
    typ = cluster.typicality(X, members, members, n_neighbors=10)
    assert typ[200] == typ.min()
    assert np.linalg.norm(X[int(np.argmax(typ))]) < 1.0
