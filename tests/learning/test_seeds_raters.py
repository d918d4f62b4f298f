"""Per-annotator models: one head, conditioned on the rater, predicts each rater's style."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.errors import NotFound
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict
from histoloop.training.raters import fit_rater_model


def test_the_rater_head_learns_two_raters_styles_the_consensus_cannot() -> None:
    r = np.random.default_rng(0)
    X = r.uniform(-1, 1, (600, 2)).astype(np.float32)
    by_x = (X[:, 0] > 0).astype(int)  # rater "x" splits left/right
    by_y = (X[:, 1] > 0).astype(int)  # rater "y" splits bottom/top
    train, test = np.arange(400), np.arange(400, 600)
    model = fit_rater_model(
        np.r_[X[train], X[train]],
        ["x"] * 400 + ["y"] * 400,
        np.r_[by_x[train], by_y[train]],
        n_classes=2,
        epochs=80,
        lr=3e-3,
    )
    acc_x = (model.predict_proba(X[test], "x").argmax(1) == by_x[test]).mean()
    acc_y = (model.predict_proba(X[test], "y").argmax(1) == by_y[test]).mean()
    assert acc_x > 0.9 and acc_y > 0.9
    # one model on both raters' labels (the consensus view) cannot be right for both
    pooled = train_model(
        np.r_[X[train], X[train]],
        np.r_[by_x[train], by_y[train]].astype(str),
        head="mlp",
        hyperparameters={"lr": 3e-3, "max_epochs": 20, "batch_size": 64},
        validation_fraction=0.0,
    )
    p = predict(pooled, X[test]).predicted
    assert min((p == by_x[test]).mean(), (p == by_y[test]).mean()) < 0.8
    # where the styles differ (the x>0, y<0 and x<0, y>0 quadrants) the raters' models disagree
    d = model.disagreement(X[test])
    assert d[by_x[test] != by_y[test]].mean() > 0.8 > 0.2 > d[by_x[test] == by_y[test]].mean()
    with pytest.raises(NotFound, match="annotator 'z'"):
        model.predict_proba(X[test], "z")


def test_many_labels_train_fewer_epochs_under_the_step_cap() -> None:
    """A round's per-annotator fit is capped in optimiser steps, not only in epochs."""
    r = np.random.default_rng(1)
    X = r.uniform(-1, 1, (1000, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    raters = ["x"] * 1000
    few = fit_rater_model(X[:100], raters[:100], y[:100], n_classes=2, epochs=60, max_steps=200)
    assert few.epochs == 60  # 2 batches of 64 per epoch: 120 steps
    many = fit_rater_model(X, raters, y, n_classes=2, epochs=60, max_steps=200)
    assert many.epochs == 12  # 16 batches per epoch: 200 // 16
    assert (many.predict_proba(X, "x").argmax(1) == y).mean() > 0.9
    assert fit_rater_model(X, raters, y, n_classes=2, epochs=60, max_steps=1).epochs == 1
