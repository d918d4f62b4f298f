"""Acquisition strategies on data where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.acquisition import (
    STRATEGIES,
    QueryContext,
    UnknownStrategy,
    get_strategy,
    list_strategies,
    uncertainty,
)
from histoloop.acquisition.diversity import diversity_space
from histoloop.errors import FailedPrecondition, InvalidArgument


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _blobs(n_per: int, centres: np.ndarray, spread: float, seed: int = 0):
    r = _rng(seed)
    X = np.concatenate([c + spread * r.standard_normal((n_per, centres.shape[1])) for c in centres])
    return X.astype(np.float32), np.repeat(np.arange(len(centres)), n_per)


def _random_ctx(n: int = 400, c: int = 5, h: int = 8, seed: int = 0, **kw) -> QueryContext:
    r = _rng(seed)
    return QueryContext(
        features=r.standard_normal((n, h)).astype(np.float32),
        labelled=kw.pop("labelled", r.random(n) < 0.2),
        probabilities=_softmax(r.standard_normal((n, c)) * 2),
        positions=r.uniform(0, 100, (n, 2)),
        **kw,
    )


# ---------------------------------------------------------------- uncertainty


def test_uncertainty_measures_are_normalised() -> None:
    P = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=np.float32)
    for measure in ("least_confidence", "margin", "entropy"):
        u = uncertainty(P, measure)
        assert u[0] == pytest.approx(1.0, abs=1e-5)
        assert u[1] == pytest.approx(0.0, abs=1e-5)


def test_entropy_picks_the_flattest_distribution() -> None:
    P = np.array(
        [[0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.6, 0.2, 0.2], [0.5, 0.5, 0.0]],
        dtype=np.float32,
    )
    ctx = QueryContext(features=np.zeros((4, 2)), labelled=np.zeros(4, bool), probabilities=P)
    sel = get_strategy("entropy").select(ctx, 1, _rng())
    assert sel.indices.tolist() == [1]
    assert get_strategy("entropy").select(ctx, 4, _rng()).indices.tolist() == [1, 2, 3, 0]


def test_margin_and_least_confidence_order_differently() -> None:
    # a: close top two (margin's favourite); b: lowest top probability (LC's favourite)
    P = np.array([[0.5, 0.49, 0.01], [0.4, 0.3, 0.3], [0.8, 0.1, 0.1]], dtype=np.float32)
    ctx = QueryContext(features=np.zeros((3, 2)), labelled=np.zeros(3, bool), probabilities=P)
    assert get_strategy("margin").select(ctx, 3, _rng()).indices.tolist() == [0, 1, 2]
    assert get_strategy("least_confidence").select(ctx, 3, _rng()).indices.tolist() == [1, 0, 2]
    lc = uncertainty(P, "least_confidence")
    assert lc[1] == pytest.approx((1 - 0.4) * 3 / 2, abs=1e-6)
    assert uncertainty(P, "margin")[0] == pytest.approx(0.99, abs=1e-6)


def test_bald_picks_disagreement_not_shared_doubt() -> None:
    members = np.array(
        [
            [[0.5, 0.5], [0.99, 0.01], [0.9, 0.1]],
            [[0.5, 0.5], [0.01, 0.99], [0.9, 0.1]],
            [[0.5, 0.5], [0.99, 0.01], [0.9, 0.1]],
            [[0.5, 0.5], [0.01, 0.99], [0.9, 0.1]],
        ],
        dtype=np.float32,
    )
    ctx = QueryContext(
        features=np.zeros((3, 2)),
        labelled=np.zeros(3, bool),
        probabilities=members.mean(axis=0),
        member_probabilities=members,
    )
    sel = get_strategy("bald").select(ctx, 1, _rng())
    assert sel.indices.tolist() == [1]  # spot 0 is equally uncertain for everyone: MI = 0
    assert get_strategy("bald").select(ctx, 3, _rng()).scores[-1] == pytest.approx(0, abs=1e-5)


def test_bald_without_members_is_an_argument_error() -> None:
    with pytest.raises(InvalidArgument, match="ensemble"):
        get_strategy("bald").select(_random_ctx(), 3, _rng())


# ---------------------------------------------------------------- diversity


def test_kcenter_covers_outliers() -> None:
    r = _rng(1)
    blob = r.standard_normal((200, 5)).astype(np.float32)
    outliers = np.array([[50, 0, 0, 0, 0], [0, 60, 0, 0, 0], [0, 0, -70, 0, 0]], np.float32)
    X = np.concatenate([blob, outliers])
    labelled = np.zeros(len(X), bool)
    labelled[0] = True
    ctx = QueryContext(features=X, labelled=labelled, probabilities=_softmax(np.zeros((len(X), 3))))
    sel = get_strategy("coreset").select(ctx, 3, _rng())
    assert sorted(sel.indices.tolist()) == [200, 201, 202]
    assert sel.indices[0] == 202  # the farthest first


def test_kmeans_picks_one_per_well_separated_cluster() -> None:
    centres = np.eye(6, 10, dtype=np.float32) * 40
    X, truth = _blobs(50, centres, 1.0)
    ctx = QueryContext(features=X, labelled=np.zeros(len(X), bool))
    for name in ("kmeans", "coldstart_kmeans"):
        sel = get_strategy(name).select(ctx, 6, _rng(3))
        assert sorted(truth[sel.indices].tolist()) == list(range(6))
        # closest to each centroid of the standardised space the strategies work in
        Z = diversity_space(X)
        means = np.stack([Z[truth == c].mean(axis=0) for c in range(6)])
        dist = np.linalg.norm(Z - means[truth], axis=1)
        picked = dist[sel.indices]
        assert all(
            (dist[truth == truth[i]] < d).mean() < 0.1
            for i, d in zip(sel.indices, picked, strict=True)
        )


def test_activevisium_never_returns_labelled_and_returns_exactly_k() -> None:
    n = 2000
    ctx = _random_ctx(n=n, seed=5)
    # make the labelled spots the most uncertain of all: they must still be skipped
    P = ctx.probabilities.copy()
    P[ctx.labelled] = 1.0 / P.shape[1]
    ctx = QueryContext(features=ctx.features, labelled=ctx.labelled, probabilities=P)
    for k in (1, 17, 100):
        sel = get_strategy("activevisium").select(ctx, k, _rng())
        assert len(sel) == k and len(np.unique(sel.indices)) == k
        assert not ctx.labelled[sel.indices].any()
    # a pool smaller than k is enlarged to k
    tiny = get_strategy("activevisium", top_fraction=0.001).select(ctx, 50, _rng())
    assert len(tiny) == 50 and not ctx.labelled[tiny.indices].any()
    # decaying pools still return k
    late = QueryContext(**{**ctx.__dict__, "round": 10})
    assert len(get_strategy("activevisium", decay=0.5).select(late, 30, _rng())) == 30


def test_activevisium_restricts_to_the_uncertain_pool() -> None:
    n = 1000
    r = _rng(2)
    P = _softmax(r.standard_normal((n, 4)) * 4)
    ctx = QueryContext(
        features=r.standard_normal((n, 6)), labelled=np.zeros(n, bool), probabilities=P
    )
    sel = get_strategy("activevisium", top_fraction=0.05).select(ctx, 10, _rng())
    pool = np.argsort(-uncertainty(P, "entropy"), kind="stable")[:50]
    assert set(sel.indices.tolist()) <= set(pool.tolist())


def test_activevisium_returns_all_unlabelled_when_fewer_than_k() -> None:
    ctx = _random_ctx(n=50, labelled=np.arange(50) >= 7)
    sel = get_strategy("activevisium").select(ctx, 20, _rng())
    assert sorted(sel.indices.tolist()) == list(range(7))


def test_hybrid_has_no_duplicates_and_respects_the_share() -> None:
    ctx = _random_ctx(n=600, seed=7)
    sel = get_strategy("hybrid", share=0.7).select(ctx, 10, _rng())
    assert len(sel) == 10 and len(set(sel.indices.tolist())) == 10
    assert not ctx.labelled[sel.indices].any()
    u = uncertainty(ctx.probabilities)
    unl = ctx.unlabelled
    top7 = unl[np.argsort(-u[unl], kind="stable")[:7]]
    assert sel.indices[:7].tolist() == top7.tolist()
    assert not set(sel.indices[7:].tolist()) & set(top7.tolist())


def test_typiclust_picks_typical_spots_of_distinct_clusters() -> None:
    centres = np.eye(4, 16, dtype=np.float32) * 30
    X, truth = _blobs(80, centres, 1.0, seed=4)
    X = np.concatenate([X, centres[:1] + 12.0])  # an outlier near cluster 0
    truth = np.r_[truth, 0]
    ctx = QueryContext(features=X, labelled=np.zeros(len(X), bool))
    sel = get_strategy("typiclust").select(ctx, 4, _rng(1))
    assert sorted(truth[sel.indices].tolist()) == [0, 1, 2, 3]
    assert len(X) - 1 not in sel.indices
    dist = np.linalg.norm(X[sel.indices] - centres[truth[sel.indices]], axis=1)
    assert dist.max() < 5.0  # blob radius is ≈ 4 in 16-d: typical = near the centre


def test_typiclust_goes_to_uncovered_clusters_first() -> None:
    centres = np.eye(3, 8, dtype=np.float32) * 30
    X, truth = _blobs(60, centres, 1.0, seed=8)
    labelled = np.zeros(len(X), bool)
    labelled[truth == 0] = np.arange(60) < 3  # cluster 0 is covered
    ctx = QueryContext(features=X, labelled=labelled)
    sel = get_strategy("typiclust").select(ctx, 2, _rng())
    assert sorted(truth[sel.indices].tolist()) == [1, 2]


def test_random_works_at_cold_start_and_model_strategies_do_not() -> None:
    ctx = QueryContext(features=np.zeros((30, 2)), labelled=np.zeros(30, bool))
    assert len(get_strategy("random").select(ctx, 5, _rng())) == 5
    for name in ("entropy", "margin", "least_confidence", "activevisium", "hybrid", "bald"):
        with pytest.raises(FailedPrecondition, match="cold-start"):
            get_strategy(name).select(ctx, 5, _rng())


# ---------------------------------------------------------------- options


def test_adjudication_share_puts_disputed_labelled_spots_first() -> None:
    n = 300
    labelled = np.zeros(n, bool)
    labelled[:40] = True
    disagreement = np.zeros(n)
    disagreement[[3, 7, 11, 19]] = [0.9, 0.4, 0.6, 0.2]
    ctx = _random_ctx(n=n, labelled=labelled, disagreement=disagreement)
    sel = get_strategy("entropy", adjudication_share=0.3).select(ctx, 10, _rng())
    assert len(sel) == 10 and len(set(sel.indices.tolist())) == 10
    assert sel.indices[:3].tolist() == [3, 11, 7]
    assert sel.adjudication.tolist() == [True] * 3 + [False] * 7
    assert not labelled[sel.indices[3:]].any()
    # fewer disputed spots than the share allows: only those
    sel = get_strategy("entropy", adjudication_share=0.9).select(ctx, 10, _rng())
    assert sel.adjudication.sum() == 4 and len(sel) == 10


def _mean_pairwise(pos: np.ndarray) -> float:
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return float(d.sum() / (len(pos) * (len(pos) - 1)))


@pytest.mark.parametrize("name", ["entropy", "activevisium", "coreset"])
def test_compactness_reduces_the_spread_of_the_query_set(name: str) -> None:
    ctx = _random_ctx(n=1500, seed=11)
    plain = get_strategy(name).select(ctx, 20, _rng())
    spread = _mean_pairwise(ctx.positions[plain.indices])
    for lam, factor in ((0.6, 0.9), (0.9, 0.6)):
        compact = get_strategy(name, compactness=lam).select(ctx, 20, _rng())
        assert len(compact) == 20 and not ctx.labelled[compact.indices].any()
        assert _mean_pairwise(ctx.positions[compact.indices]) < factor * spread


def test_compactness_needs_positions() -> None:
    ctx = QueryContext(
        features=np.zeros((20, 2)),
        labelled=np.zeros(20, bool),
        probabilities=_softmax(np.zeros((20, 3))),
    )
    with pytest.raises(InvalidArgument, match="positions"):
        get_strategy("entropy", compactness=0.5).select(ctx, 3, _rng())


# ---------------------------------------------------------------- registry & contract


def test_unknown_strategy_is_a_typed_invalid_argument_listing_choices() -> None:
    with pytest.raises(UnknownStrategy) as info:
        get_strategy("nope")
    assert isinstance(info.value, InvalidArgument)
    assert "activevisium" in str(info.value) and "typiclust" in str(info.value)
    with pytest.raises(InvalidArgument, match="no parameter"):
        get_strategy("entropy", top_fraction=0.1)
    with pytest.raises(InvalidArgument):
        get_strategy("activevisium", top_fraction=0)
    with pytest.raises(InvalidArgument):
        get_strategy("random", compactness=2)


def test_list_strategies_reports_cold_start_ability() -> None:
    info = {s.name: s for s in list_strategies()}
    assert set(info) == set(STRATEGIES)
    assert {n for n, s in info.items() if not s.needs_model} == {
        "random",
        "coldstart_kmeans",
        "typiclust",
        "probcover",
        "coverage",
    }
    assert info["activevisium"].parameters["top_fraction"] == 0.05
    assert all(s.description for s in info.values())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_deterministic_and_valid(name: str) -> None:
    r = _rng(9)
    n, m = 500, 4
    members = np.stack([_softmax(r.standard_normal((n, 5)) * 2) for _ in range(m)])
    ctx = QueryContext(
        features=r.standard_normal((n, 12)).astype(np.float32),
        labelled=r.random(n) < 0.1,
        probabilities=members.mean(axis=0),
        member_probabilities=members,
        positions=r.uniform(0, 50, (n, 2)),
    )
    a = get_strategy(name).select(ctx, 25, np.random.default_rng(123))
    b = get_strategy(name).select(ctx, 25, np.random.default_rng(123))
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.dtype == np.int64 and len(a) == 25
    assert len(np.unique(a.indices)) == 25 and not ctx.labelled[a.indices].any()
    assert a.strategy == name and a.scores.shape == (25,)


def test_bad_context_and_k_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="labelled"):
        QueryContext(features=np.zeros((5, 2)), labelled=np.zeros(4, bool))
    with pytest.raises(InvalidArgument, match="probabilities"):
        QueryContext(
            features=np.zeros((5, 2)), labelled=np.zeros(5, bool), probabilities=np.ones((4, 3))
        )
    ctx = _random_ctx(n=20)
    for k in (0, -1, 2.5, True):
        with pytest.raises(InvalidArgument, match="k"):
            get_strategy("random").select(ctx, k, _rng())  # type: ignore[arg-type]
