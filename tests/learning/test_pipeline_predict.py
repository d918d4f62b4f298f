"""train_model → TrainedModel artifact → predict, transfer, resampling, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.errors import InvalidArgument
from histoloop.training import (
    FeatureScaling,
    TrainedModel,
    adaptive_resampling_weights,
    classification_metrics,
    resampling_weights,
    train_model,
)
from histoloop.training.predict import align_genes, predict

NAMES = np.array(["Layer1", "Layer2", "WM"])


def _data(n_per: int = 40, d: int = 12, seed: int = 0):
    r = np.random.default_rng(seed)
    centres = r.standard_normal((3, d)) * 3
    y = np.repeat(np.arange(3), n_per)
    X = (centres[y] + r.standard_normal((len(y), d)) + 5.0).astype(np.float32)
    return X, NAMES[y]


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_train_model_round_trip_and_predict(head: str) -> None:
    X, labels = _data()
    model = train_model(
        X, labels, head=head, seed=3, hyperparameters={"max_epochs": 5} if head == "mlp" else None
    )
    assert model.classes == ("Layer1", "Layer2", "WM")
    assert model.n_validation == 12 and model.n_train == 108
    assert set(model.validation) >= {
        "macro_f1",
        "balanced_accuracy",
        "kappa",
        "accuracy",
        "per_class_f1",
    }
    assert model.feature_dims == {"features": 12} and model.training_seconds > 0
    again = TrainedModel.from_bytes(model.to_bytes())
    assert again.classes == model.classes and again.validation == model.validation
    assert again.hyperparameters == model.hyperparameters and again.head == head
    a, b = predict(model, X), predict(again, X)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.probabilities.shape == (120, 3) and a.predicted.dtype == np.int64
    assert a.hidden.shape[0] == 120 and a.labels[0] in NAMES
    assert a.member_probabilities is None


def test_train_model_with_schema_previous_resampling_and_ensemble() -> None:
    X, labels = _data()
    classes = ["Layer1", "Layer2", "Layer3", "WM"]  # Layer3 has no labels yet
    first = train_model(X, labels, classes=classes, hyperparameters={"max_epochs": 3})
    assert first.classes == tuple(classes)
    assert predict(first, X).probabilities.shape == (120, 4)
    second = train_model(
        X,
        labels,
        classes=classes,
        previous=first,
        resampling="online",
        hyperparameters={"max_epochs": 2},
    )
    assert second.fit_report["warm_started"] and second.resampling == "online"
    ens = train_model(X, labels, head="ensemble", hyperparameters={"members": 2, "max_epochs": 2})
    p = predict(ens, X)
    assert p.member_probabilities.shape == (2, 120, 3)
    with pytest.raises(InvalidArgument, match="not among the classes"):
        train_model(X, labels, classes=["Layer1", "WM"])
    with pytest.raises(InvalidArgument, match="missing"):
        train_model(X, [*labels[:-2], None, float("nan")])
    with pytest.raises(InvalidArgument, match="labels"):
        train_model(X, labels[:10])
    with pytest.raises(InvalidArgument, match="do not match"):
        predict(first, X[:, :5])


def test_tiny_label_sets_train_without_a_validation_split() -> None:
    X, labels = _data(n_per=3)
    labels = labels.copy()
    labels[0] = "Layer3"  # a class with one label: no split possible
    model = train_model(X, labels, hyperparameters={"max_epochs": 2})
    assert model.n_validation == 0 and model.validation == {}
    assert model.fit_report["checkpoint_metric"] == "last_epoch"


def test_multimodal_transfer_reuses_source_scaling_and_reports_missing_genes() -> None:
    r = np.random.default_rng(0)
    n, genes = 90, [f"G{i}" for i in range(10)]
    X, labels = _data(n_per=30, d=16)
    counts = r.poisson(5, (n, 10)).astype(np.float32)
    scaling = {
        "genes": FeatureScaling.fit(counts, names=genes, log1p_target_sum=1e4),
        "image": FeatureScaling.fit(X),
    }
    model = train_model(
        {"image": X, "genes": counts},
        labels,
        head="multimodal",
        scaling=scaling,
        hyperparameters={"max_epochs": 2},
    )
    restored = TrainedModel.from_bytes(model.to_bytes())
    assert restored.scaling["genes"].names == tuple(genes)
    np.testing.assert_array_equal(restored.scaling["image"].mean, scaling["image"].mean)
    # a target with genes in another order, one missing and one extra
    target_names = ["EXTRA"] + genes[::-1][:-1]  # G0 missing
    target = counts[:, ::-1][:, :-1]
    target = np.hstack([np.ones((n, 1), np.float32), target])
    aligned, missing = align_genes(genes, target, target_names)
    assert missing == ["G0"]
    np.testing.assert_array_equal(aligned[:, 1:], counts[:, 1:])
    assert (aligned[:, 0] == 0).all()
    p = predict(restored, {"image": X, "genes": aligned}, missing_genes=missing)
    assert p.probabilities.shape == (n, 3) and np.isfinite(p.probabilities).all()
    with pytest.raises(InvalidArgument, match="duplicates"):
        align_genes(genes, target, ["G1"] * len(target_names))


def test_adaptive_resampling_weights_balance_clusters() -> None:
    r = np.random.default_rng(0)
    X = np.concatenate([r.standard_normal((90, 4)), r.standard_normal((10, 4)) + 30])
    w = adaptive_resampling_weights(X, n_clusters=2, seed=0)
    assert w.sum() == pytest.approx(1.0)
    assert w[:90].sum() == pytest.approx(0.5) and w[90:].sum() == pytest.approx(0.5)
    assert w[95] / w[0] == pytest.approx(9.0)
    assert resampling_weights("off", embeddings=X) is None
    hidden = X[:, :2] * 0 + np.r_[np.zeros(50), np.ones(50)][:, None] * 10
    w_online = resampling_weights("online", embeddings=X, hidden=hidden, n_clusters=2)
    assert w_online[:50].sum() == pytest.approx(0.5)
    with pytest.raises(InvalidArgument, match="mode"):
        resampling_weights("sometimes", embeddings=X)  # type: ignore[arg-type]


def test_classification_metrics_known_values() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p, classes=["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    assert m["per_class_f1"]["b"] == pytest.approx(0.8)
    assert m["per_class_f1"]["d"] is None
    assert m["macro_f1"] == pytest.approx(np.mean([0.75, 0.8, 2 / 3]))
    assert -1 <= m["kappa"] <= 1
