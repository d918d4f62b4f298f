"""Classifier heads: architecture, weighting, learning, warm start, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoloop.errors import InvalidArgument
from histoloop.training import (
    HEADS,
    Head,
    UnknownHead,
    inverse_frequency_weights,
    make_head,
    stratified_split,
)
from histoloop.training.heads import EnsembleHead, MLPNet, MultimodalNet


def _toy(n_per: int = 60, d: int = 20, c: int = 3, sep: float = 6.0, seed: int = 0):
    r = np.random.default_rng(seed)
    centres = r.standard_normal((c, d)) * sep / np.sqrt(d) * 3
    y = np.repeat(np.arange(c), n_per)
    X = centres[y] + r.standard_normal((len(y), d))
    perm = r.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


def test_mlp_architecture_matches_activevisium() -> None:
    X, y = _toy(n_per=10, d=24, c=4)
    head = make_head("mlp", n_classes=4, max_epochs=1)
    head.fit(X, y)
    net = head.module
    assert isinstance(net, MLPNet)
    layers = [m for m in net.modules() if not isinstance(m, nn.Sequential | MLPNet)]
    assert [type(m) for m in layers] == [nn.Linear, nn.LeakyReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (24, 128)
    assert layers[1].negative_slope == pytest.approx(0.02)
    assert (layers[2].in_features, layers[2].out_features) == (128, 4)
    cfg = head.hyperparameters
    assert (cfg["lr"], cfg["batch_size"], cfg["max_epochs"]) == (1e-3, 16, 1)
    assert make_head("mlp", n_classes=4).hyperparameters["max_epochs"] == 200
    assert head.hidden(X).shape == (len(X), 128)


def test_multimodal_architecture_and_shapes() -> None:
    r = np.random.default_rng(0)
    X = {
        "image": r.standard_normal((40, 16)).astype(np.float32),
        "genes": r.standard_normal((40, 30)).astype(np.float32),
    }
    y = np.arange(40) % 3
    head = make_head("multimodal", n_classes=3, max_epochs=2)
    head.fit(X, y)
    net = head.module
    assert isinstance(net, MultimodalNet)
    assert net.image[0].in_features == 16 and net.genes[0].in_features == 30
    assert isinstance(net.fusion[0], nn.LayerNorm) and net.fusion[0].normalized_shape == (256,)
    assert (net.fusion[1].in_features, net.fusion[1].out_features) == (256, 128)
    assert net.dropout.p == pytest.approx(0.25)
    assert net.classifier.in_features == 128
    P = head.predict_proba(X)
    assert P.shape == (40, 3) and np.allclose(P.sum(1), 1, atol=1e-5)
    assert head.hidden(X).shape == (40, 128)
    with pytest.raises(InvalidArgument, match="mapping"):
        head.predict_proba(X["image"])
    # views on the image branch
    views = {"image": np.stack([X["image"], X["image"] + 0.1]), "genes": X["genes"]}
    assert make_head("multimodal", n_classes=3, max_epochs=1).fit(views, y).epochs == 1


def test_inverse_frequency_weights_sum_to_one() -> None:
    y = np.array([0] * 10 + [1] * 30 + [3] * 60)
    w = inverse_frequency_weights(y, 4)
    assert w.sum() == pytest.approx(1.0)
    assert w[2] == 0.0
    assert w[0] / w[1] == pytest.approx(3.0) and w[0] / w[3] == pytest.approx(6.0)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    y = np.array([0] * 50 + [1] * 5 + [2] * 2)
    tr, va = stratified_split(y, 0.1, np.random.default_rng(0))
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert set(y[va]) == {0, 1, 2} and set(y[tr]) == {0, 1, 2}
    assert (y[va] == 0).sum() == 5
    tr, va = stratified_split(np.array([0, 0, 1, 1, 2]), 0.1, np.random.default_rng(0))
    assert len(va) == 0 and len(tr) == 5  # a class with one label: no split


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_learns_a_separable_toy_problem(name: str) -> None:
    X, y = _toy(n_per=120)
    X, y, Xt, yt = X[:240], y[:240], X[240:], y[240:]
    tr, va = stratified_split(y, 0.1, np.random.default_rng(0))
    head = make_head(name, n_classes=3, seed=0)
    report = head.fit(X[tr], y[tr], X_val=X[va], y_val=y[va])
    assert report.checkpoint_metric == "val_loss" and report.val_macro_f1 is not None
    acc = (head.predict_proba(Xt).argmax(1) == yt).mean()
    assert acc > 0.95, acc


def test_mlp_is_deterministic_for_a_seed_and_uses_views() -> None:
    X, y = _toy(n_per=20)
    views = np.stack([X, X + 0.3, X - 0.3])
    P = [make_head("mlp", n_classes=3, seed=4, max_epochs=3).fit(views, y) for _ in range(2)]
    assert P[0].train_loss == P[1].train_loss
    a = make_head("mlp", n_classes=3, seed=4, max_epochs=3)
    b = make_head("mlp", n_classes=3, seed=4, max_epochs=3)
    a.fit(views, y)
    b.fit(views, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    c = make_head("mlp", n_classes=3, seed=5, max_epochs=3)
    c.fit(views, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))
    # prediction on views uses the clean view
    np.testing.assert_array_equal(a.predict_proba(views), a.predict_proba(X))


def test_early_stopping_and_last_epoch_without_validation() -> None:
    X, y = _toy(n_per=30)
    head = make_head("mlp", n_classes=3, lr=0.05, patience=2, max_epochs=50)
    report = head.fit(X[:80], y[:80], X_val=X[80:], y_val=y[80:])
    assert report.early_stopped and report.epochs < 50
    assert report.best_epoch == report.epochs - 2
    report = make_head("mlp", n_classes=3, max_epochs=4).fit(X, y)
    assert report.checkpoint_metric == "last_epoch" and report.best_epoch == 4


def test_warm_start_reuses_the_previous_weights() -> None:
    X, y = _toy(n_per=20)
    first = make_head("mlp", n_classes=3, max_epochs=5)
    first.fit(X, y)
    second = make_head("mlp", n_classes=3, lr=1e-12, max_epochs=1)
    report = second.fit(X, y, init_from=first)
    assert report.warm_started
    for (k, a), b in zip(
        first.module.state_dict().items(), second.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    cold = make_head("mlp", n_classes=3, lr=1e-12, max_epochs=1)
    assert not cold.fit(X, y).warm_started
    # different input dimension or class count: no warm start
    other = make_head("mlp", n_classes=3, max_epochs=1)
    assert not other.fit(X[:, :10], y, init_from=first).warm_started
    four = make_head("mlp", n_classes=4, max_epochs=1)
    assert not four.fit(X, y, init_from=first).warm_started


def test_sample_weights_drive_the_sampler() -> None:
    X, y = _toy(n_per=20)
    w = np.where(y == 0, 1.0, 0.0)
    w[np.flatnonzero(y == 1)[0]] = 1.0  # keep two classes drawable
    head = make_head("mlp", n_classes=3, max_epochs=2)
    assert head.fit(X, y, sample_weight=w).epochs == 2
    with pytest.raises(InvalidArgument, match="sample_weight"):
        head.fit(X, y, sample_weight=-np.ones(len(y)))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_to_bytes_round_trip_gives_identical_probabilities(name: str) -> None:
    X, y = _toy(n_per=15, d=8)
    if name == "multimodal":
        X = {"image": X, "genes": X[:, :5] * 2}
    head = (
        make_head(name, n_classes=4, seed=1, max_epochs=2)
        if name != "logreg"
        else make_head("logreg", n_classes=4)
    )
    head.fit(X, y)
    data = head.to_bytes()
    again = Head.from_bytes(data)
    assert type(again) is type(head) and again.hyperparameters == head.hyperparameters
    np.testing.assert_array_equal(again.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(again.hidden(X), head.hidden(X))
    assert head.predict_proba(X)[:, 3].max() == 0 or name != "logreg"  # unseen class


def test_from_bytes_rejects_garbage_and_wrong_kind() -> None:
    with pytest.raises(InvalidArgument, match="artifact"):
        Head.from_bytes(b"not a model")
    X, y = _toy(n_per=10, d=4)
    lr = make_head("logreg", n_classes=3)
    lr.fit(X, y)
    with pytest.raises(InvalidArgument, match="logreg"):
        HEADS["mlp"].from_bytes(lr.to_bytes())


def test_logreg_hidden_is_the_standardised_input_and_it_is_fast() -> None:
    X, y = _toy(n_per=170, d=100)
    head = make_head("logreg", n_classes=3)
    report = head.fit(X, y)
    assert report.seconds < 1.0
    H = head.hidden(X)
    assert H.shape == X.shape
    np.testing.assert_allclose(H.mean(0), 0, atol=1e-4)


def test_ensemble_members_and_mean() -> None:
    X, y = _toy(n_per=15, d=6)
    head = make_head("ensemble", n_classes=3, members=3, max_epochs=2)
    head.fit(X, y)
    assert isinstance(head, EnsembleHead)
    M = head.member_proba(X)
    assert M.shape == (3, len(X), 3)
    np.testing.assert_allclose(head.predict_proba(X), M.mean(0), rtol=1e-6)
    assert not np.allclose(M[0], M[1])  # different seeds
    assert head.hidden(X).shape == (len(X), 128)


def test_registry_and_validation_errors() -> None:
    with pytest.raises(UnknownHead) as info:
        make_head("svm", n_classes=3)
    assert isinstance(info.value, InvalidArgument)
    assert all(name in str(info.value) for name in HEADS)
    with pytest.raises(InvalidArgument, match="no hyper-parameter"):
        make_head("mlp", n_classes=3, learning_rate=0.1)
    with pytest.raises(InvalidArgument, match="lr"):
        make_head("mlp", n_classes=3, lr=-1)
    X, y = _toy(n_per=5)
    head = make_head("mlp", n_classes=3, max_epochs=1)
    with pytest.raises(InvalidArgument, match="two classes"):
        head.fit(X, np.zeros(len(X), int))
    with pytest.raises(InvalidArgument, match=r"\[0, 3\)"):
        head.fit(X, np.full(len(X), 5))
    with pytest.raises(InvalidArgument, match="not trained"):
        make_head("mlp", n_classes=3).predict_proba(X)
    head.fit(X, y)
    with pytest.raises(InvalidArgument, match="dimensions"):
        head.predict_proba(X[:, :3])
