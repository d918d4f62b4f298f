"""Online adaptive resampling during training (AR paper), and offline for comparison."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.errors import InvalidArgument
from histoloop.training import heads
from histoloop.training.heads import torch_nets
from histoloop.training.pipeline import train_model


def _imbalanced(seed: int = 0):
    r = np.random.default_rng(seed)
    y = np.r_[np.zeros(180, int), np.ones(20, int)]
    X = np.c_[
        np.where(y == 0, -2.0, 2.0)[:, None] + r.standard_normal((200, 1)),
        r.standard_normal((200, 7)),
    ]
    return X.astype(np.float32), y


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Records every (latent, weights) the fit computes (the real function runs)."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    real = torch_nets.adaptive_resampling_weights

    def recording(latent: np.ndarray, **kw: object) -> np.ndarray:
        w = real(latent, **kw)
        calls.append((np.array(latent), w))
        return w

    monkeypatch.setattr(torch_nets, "adaptive_resampling_weights", recording)
    return calls


def test_online_reclusters_the_current_hidden_layer_every_k_epochs(spy) -> None:
    X, y = _imbalanced()
    head = heads.make_head(
        "mlp",
        n_classes=2,
        max_epochs=12,
        lr=1e-2,
        resampling="online",
        resampling_every=4,
        resampling_clusters=4,
    )
    head.fit(X, y)
    assert len(spy) == 3  # epochs 1, 5, 9
    latents = [c[0] for c in spy]
    assert all(
        latent.shape == (200, 128) for latent in latents
    )  # the hidden layer, every labelled spot
    assert not np.allclose(latents[0], latents[1])  # the latent moved with training
    for _, w in spy:  # each cluster of the current latent gets the same total weight
        assert w.sum() == pytest.approx(1.0)
        assert len(np.unique(np.round(w, 12))) <= 4


def test_offline_clusters_the_inputs_once(spy) -> None:
    X, y = _imbalanced()
    heads.make_head("mlp", n_classes=2, max_epochs=6, resampling="offline").fit(X, y)
    assert len(spy) == 1 and np.allclose(spy[0][0], X)


def test_off_draws_uniformly(spy) -> None:
    X, y = _imbalanced()
    heads.make_head("mlp", n_classes=2, max_epochs=3).fit(X, y)
    assert spy == []


def test_train_model_passes_the_mode_to_the_torch_heads(spy) -> None:
    X, y = _imbalanced()
    model = train_model(
        X,
        y.astype(str),
        head="mlp",
        resampling="online",
        resampling_every=2,
        hyperparameters={"max_epochs": 4},
        validation_fraction=0.0,
    )
    assert model.resampling == "online" and model.hyperparameters["resampling_every"] == 2
    assert model.hyperparameters["class_weighting"] is False  # the evidence-based pairing
    assert len(spy) == 2
    logreg = train_model(
        X, y.astype(str), head="logreg", resampling="offline", validation_fraction=0.0
    )
    assert logreg.resampling == "offline"  # fixed weights outside the fit, as before


def test_bad_resampling_settings() -> None:
    with pytest.raises(InvalidArgument, match="resampling"):
        heads.make_head("mlp", n_classes=2, resampling="sometimes")
    with pytest.raises(InvalidArgument, match="resampling_every"):
        heads.make_head("mlp", n_classes=2, resampling_every=0)


def test_unweighted_loss_predicts_the_rare_class_less_often() -> None:
    # features carry no signal: the weighted loss balances the classes, the unweighted
    # one follows the 95 % majority
    r = np.random.default_rng(3)
    y = np.r_[np.zeros(190, int), np.ones(10, int)]
    X = r.standard_normal((200, 4)).astype(np.float32)
    fresh = r.standard_normal((400, 4)).astype(np.float32)
    rare = []
    for weighted in (True, False):
        head = heads.make_head("mlp", n_classes=2, max_epochs=10, lr=1e-2, class_weighting=weighted)
        head.fit(X, y)
        rare.append(float(head.predict_proba(fresh).argmax(axis=1).mean()))
    assert rare[0] > 0.05 and rare[1] < 0.01
