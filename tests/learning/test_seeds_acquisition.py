"""ProbCover, MC-dropout BALD, the k-means pick, the hybrid share, the standardised
diversity space and the stopping thresholds as project settings (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoloop.acquisition import (
    QueryContext,
    cluster,
    get_strategy,
    list_strategies,
    recommend_stop,
)
from histoloop.acquisition.diversity import diversity_space
from histoloop.acquisition.probcover import probcover_select
from histoloop.acquisition.settings import stopping_options, strategy_options
from histoloop.acquisition.stopping import RoundPredictions
from histoloop.errors import InvalidArgument
from histoloop.training.export import export_torchscript
from histoloop.training.heads import make_head
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict
from histoloop.training.round import head_settings
from histoloop.v1 import common_pb2


def _blobs(sizes: list[int], dim: int = 6, gap: float = 30.0, seed: int = 0):
    r = np.random.default_rng(seed)
    centres = np.eye(len(sizes), dim) * gap
    X = np.concatenate(
        [c + r.standard_normal((n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    return X.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- diversity space


def test_diversity_space_standardises_and_clips() -> None:
    r = np.random.default_rng(0)
    X = np.c_[r.standard_normal(1000) * 1e8, r.standard_normal(1000), np.full(1000, 7.0)]
    Z = diversity_space(X)
    assert Z.dtype == np.float32
    assert np.allclose(Z[:, :2].std(axis=0), 1.0, atol=0.05)
    assert np.abs(Z).max() <= 5.0
    assert not Z[:, 2].any()  # a constant column carries no distance
    with pytest.raises(InvalidArgument, match="NaN"):
        diversity_space(np.array([[np.nan, 1.0]]))


def test_coreset_on_logreg_hidden_features_is_not_fooled_by_a_blown_up_column() -> None:
    # three blobs; column 3 is noise that barely varies among the labelled spots, so
    # the logistic-regression head's hidden features (its input standardised on the
    # labelled spots) blow it up to ~1e7 and the raw k-center picks by that noise.
    X, blob = _blobs([100, 100, 100], dim=4, gap=12.0)
    r = np.random.default_rng(1)
    X[:, 3] = r.standard_normal(len(X))
    lab = np.array([0, 1, 100])
    X[lab, 3] = [0.0, 1e-7, 2e-7]
    head = make_head("logreg", n_classes=2)
    head.fit(X[lab], np.array([0, 0, 1]))
    H = head.hidden(X)
    assert np.abs(H).max() > 1e6  # the problem, as it is
    labelled = np.zeros(len(X), bool)
    labelled[lab] = True
    ctx = QueryContext(features=H, labelled=labelled, probabilities=_softmax(np.zeros((len(X), 2))))
    sel = get_strategy("coreset").select(ctx, 1, np.random.default_rng(0))
    assert blob[sel.indices[0]] == 2  # the uncovered blob, not a noise extreme
    raw, _ = cluster.kcenter_greedy(H, 1, np.random.default_rng(0), centres=lab, eligible=~labelled)
    assert raw[0] == int(np.argmax(np.abs(H[:, 3]) * ~labelled))  # what it picked before


# ---------------------------------------------------------------- k-means pick


@pytest.mark.parametrize("name", ["kmeans", "kmeans_far", "coldstart_kmeans"])
def test_kmeans_pick_closest_or_far_from_centre(name: str) -> None:
    X, blob = _blobs([60, 60, 60, 60])
    ctx = QueryContext(features=X, labelled=np.zeros(len(X), bool))
    sel = get_strategy(name).select(ctx, 4, np.random.default_rng(3))
    assert sorted(blob[sel.indices].tolist()) == [0, 1, 2, 3]
    Z = diversity_space(X)
    means = np.stack([Z[blob == b].mean(axis=0) for b in range(4)])
    dist = np.linalg.norm(Z - means[blob], axis=1)
    rank = [(dist[blob == blob[i]] < dist[i]).mean() for i in sel.indices]  # 0 = closest
    if name == "kmeans_far":
        assert min(rank) >= 0.9
    else:
        assert max(rank) <= 0.1
    far = get_strategy(name, pick="far_from_centre").select(ctx, 4, np.random.default_rng(3))
    assert min((dist[blob == blob[i]] < dist[i]).mean() for i in far.indices) >= 0.9
    with pytest.raises(InvalidArgument, match="pick"):
        get_strategy(name, pick="middle")


# ---------------------------------------------------------------- ProbCover


def test_probcover_covers_every_cluster_largest_first() -> None:
    X, blob = _blobs([90, 40, 15], dim=3)
    ctx = QueryContext(features=X, labelled=np.zeros(len(X), bool))
    sel = get_strategy("probcover").select(ctx, 3, np.random.default_rng(0))
    assert blob[sel.indices].tolist() == [0, 1, 2]
    assert sel.scores[0] >= sel.scores[1] >= sel.scores[2] > 0
    plan = probcover_select(X, np.zeros(len(X), bool), 3, np.random.default_rng(0), n_clusters=3)
    assert plan.coverage > 0.9 and plan.delta > 0


def test_probcover_treats_labelled_spots_as_covered_and_tops_up() -> None:
    X, blob = _blobs([50, 50, 50], dim=3)
    labelled = blob == 0
    ctx = QueryContext(features=X, labelled=labelled)
    sel = get_strategy("probcover", n_clusters=3).select(ctx, 2, np.random.default_rng(0))
    assert sorted(blob[sel.indices].tolist()) == [1, 2]
    # asked for more than coverage needs: the rest is filled, never with labelled spots
    many = get_strategy("probcover", n_clusters=3).select(ctx, 30, np.random.default_rng(0))
    assert len(many) == 30 and not labelled[many.indices].any()
    # a pool larger than max_points is covered on a subsample: same answer here
    sub = get_strategy("probcover", n_clusters=3, max_points=80).select(
        ctx, 2, np.random.default_rng(0)
    )
    assert sorted(blob[sub.indices].tolist()) == [1, 2]
    with pytest.raises(InvalidArgument, match="purity"):
        get_strategy("probcover", purity=1.0)


# ---------------------------------------------------------------- MC-dropout BALD


def _two_class(seed: int = 0):
    r = np.random.default_rng(seed)
    y = np.repeat([0, 1], 60)
    X = np.c_[np.where(y == 0, -3.0, 3.0), np.zeros(len(y))] + r.standard_normal((len(y), 2))
    return np.c_[X, r.standard_normal((len(y), 6))].astype(np.float32), y


def test_mc_dropout_members_and_bald_favour_the_boundary() -> None:
    X, y = _two_class()
    model = train_model(
        X,
        y.astype(str),
        head="mlp",
        seed=0,
        hyperparameters=dict(dropout=0.25, mc_samples=16, lr=1e-2, max_epochs=40),
        validation_fraction=0.0,
    )
    grid = np.zeros((41, 8), np.float32)
    grid[:, 0] = np.linspace(-6, 6, 41)
    p = predict(model, grid)
    assert p.member_probabilities is not None and p.member_probabilities.shape == (16, 41, 2)
    assert not np.allclose(p.member_probabilities[0], p.member_probabilities[1])
    # the exported module (what the prediction service runs) gives the same passes
    with torch.no_grad():
        out = export_torchscript(model)(torch.from_numpy(grid))
    assert np.allclose(out[2].numpy(), p.member_probabilities, atol=1e-5)
    ctx = QueryContext(
        features=p.hidden,
        labelled=np.zeros(41, bool),
        probabilities=p.probabilities,
        member_probabilities=p.member_probabilities,
    )
    sel = get_strategy("bald").select(ctx, 5, np.random.default_rng(0))
    assert np.abs(grid[sel.indices, 0]).max() <= 2.5  # near the boundary at 0, not the ends


def test_mc_dropout_settings() -> None:
    with pytest.raises(InvalidArgument, match="dropout"):
        make_head("mlp", n_classes=2, mc_samples=4)
    cfg = common_pb2.LoopConfig(mc_dropout_samples=8)
    assert head_settings(cfg, "mlp") == {"mc_samples": 8, "dropout": 0.25}
    assert head_settings(cfg, "multimodal") == {"mc_samples": 8}
    assert head_settings(cfg, "logreg") == {}
    assert head_settings(common_pb2.LoopConfig(), "mlp") == {}


# ---------------------------------------------------------------- settings


def test_project_settings_reach_the_strategies() -> None:
    cfg = common_pb2.LoopConfig(hybrid_share=0.25, kmeans_pick="far_from_centre")
    assert strategy_options("hybrid", cfg) == {"share": 0.25}
    assert strategy_options("activevisium", cfg) == {"pick": "far_from_centre"}
    assert strategy_options("kmeans", cfg) == {"pick": "far_from_centre"}
    assert strategy_options("entropy", cfg) == {}
    assert strategy_options("hybrid", common_pb2.LoopConfig()) == {}  # default share 0.7
    # share 1: every pick is among the most uncertain; share 0.25: a quarter of them
    r = np.random.default_rng(0)
    n = 300
    P = _softmax(r.standard_normal((n, 3)) * 3)
    ctx = QueryContext(
        features=r.standard_normal((n, 4)).astype(np.float32),
        labelled=np.zeros(n, bool),
        probabilities=P,
    )
    u = -(P * np.log(P)).sum(axis=1)
    top = set(np.argsort(-u)[:8].tolist())
    full = get_strategy("hybrid", share=1.0).select(ctx, 8, np.random.default_rng(0))
    assert set(full.indices.tolist()) == top
    quarter = get_strategy("hybrid", **strategy_options("hybrid", cfg)).select(
        ctx, 8, np.random.default_rng(0)
    )
    assert set(quarter.indices[:2].tolist()) <= top


def test_stopping_thresholds_are_project_settings() -> None:
    r = np.random.default_rng(0)
    base = r.integers(0, 4, 1000)
    rounds = []
    for i in range(4):  # 4 % of the spots change between rounds (the default tolerates 2 %)
        cur = base.copy()
        cur[i * 20 : i * 20 + 20] = (cur[i * 20 : i * 20 + 20] + 1) % 4
        rounds.append(RoundPredictions(predicted=cur))
    assert stopping_options(None) == {
        "max_change": 0.02,
        "min_kappa": 0.95,
        "patience": 2,
        "max_uncertainty": None,
    }
    assert not recommend_stop(rounds, **stopping_options(common_pb2.LoopConfig())).stop
    loose = common_pb2.LoopConfig(stop_max_change=0.05, stop_min_kappa=0.9, stop_patience=3)
    assert stopping_options(loose)["patience"] == 3
    assert recommend_stop(rounds, **stopping_options(loose)).stop


def test_list_strategies_has_the_new_ones() -> None:
    info = {s.name: s for s in list_strategies()}
    assert not info["probcover"].needs_model
    assert info["probcover"].parameters["purity"] == 0.95
    assert info["kmeans_far"].parameters["pick"] == "far_from_centre"
    assert info["activevisium"].parameters["pick"] == "closest_to_centroid"
    assert "MC-dropout" in info["bald"].description


def test_rater_disagreement_ranks_by_the_raters_models_then_entropy() -> None:
    n = 40
    probs = np.tile(np.float32([0.9, 0.1]), (n, 1))
    probs[:, 0] -= np.linspace(0.0, 0.35, n, dtype=np.float32)  # later rows are more uncertain
    probs[:, 1] = 1.0 - probs[:, 0]
    dis = np.zeros(n)
    dis[[3, 5, 7]] = 1.0  # every pair of raters differs
    dis[[10, 20]] = 0.5
    labelled = np.zeros(n, bool)
    labelled[5] = True
    ctx = QueryContext(
        features=np.zeros((n, 2), np.float32),
        labelled=labelled,
        probabilities=probs,
        rater_disagreement=dis,
    )
    sel = get_strategy("rater_disagreement").select(ctx, 5, np.random.default_rng(0))
    assert (
        sel.indices.tolist() == [7, 3, 20, 10, 39] and sel.note == ""
    )  # ties: the more uncertain first
    without = QueryContext(features=ctx.features, labelled=labelled, probabilities=probs)
    fallback = get_strategy("rater_disagreement").select(without, 5, np.random.default_rng(0))
    entropy = get_strategy("entropy").select(without, 5, np.random.default_rng(0))
    assert fallback.indices.tolist() == entropy.indices.tolist() == [39, 38, 37, 36, 35]
    assert "fewer than two annotators" in fallback.note
    compact = QueryContext(
        features=ctx.features,
        labelled=labelled,
        probabilities=probs,
        positions=np.c_[np.arange(n), np.zeros(n)],
    )
    assert (
        "entropy instead"
        in get_strategy("rater_disagreement", compactness=0.5)
        .select(compact, 3, np.random.default_rng(0))
        .note
    )
    with pytest.raises(InvalidArgument, match="rater_disagreement"):
        QueryContext(features=ctx.features, labelled=labelled, rater_disagreement=np.zeros(3))


def test_rater_disagreement_finds_where_two_raters_styles_differ() -> None:
    from histoloop.training.raters import fit_rater_model

    r = np.random.default_rng(4)
    X = r.uniform(-1, 1, (600, 2)).astype(np.float32)
    by_x, by_y = (X[:, 0] > 0).astype(int), (X[:, 1] > 0).astype(int)  # two raters, two borders
    train = np.arange(300)
    model = fit_rater_model(
        np.r_[X[train], X[train]],
        ["x"] * 300 + ["y"] * 300,
        np.r_[by_x[train], by_y[train]],
        n_classes=2,
        seed=0,
    )
    labelled = np.zeros(len(X), bool)
    labelled[train] = True
    ctx = QueryContext(
        features=X,
        labelled=labelled,
        probabilities=np.full((len(X), 2), 0.5, np.float32),
        rater_disagreement=model.disagreement(X),
    )
    sel = get_strategy("rater_disagreement").select(ctx, 40, np.random.default_rng(0))
    # the raters differ in the quadrants where exactly one coordinate is positive
    assert (by_x[sel.indices] != by_y[sel.indices]).mean() >= 0.95
