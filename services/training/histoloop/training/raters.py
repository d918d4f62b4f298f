"""Per-annotator models (AESPA's idea for spots and tiles): predict what *this* rater would say.

Instead of one gold label per spot, every rater's labels are kept and a single head is
trained on all of them, conditioned on who gave the label: a learnt embedding of the
rater is joined to the spot's features before the ActiveVisium MLP
(``[x, e_rater] → Linear → LeakyReLU → Linear``). Raters share everything but their
embedding, so a rater with few labels still borrows the others' view of the tissue,
while a rater who folds two layers together or hesitates at borders keeps that style.

:meth:`RaterModel.predict_proba` answers "as annotator X would label"; the spread of
the raters' predictions (:meth:`RaterModel.disagreement`) is a query signal for spots
where the raters' styles matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from histoloop.datasets import rater_disagreement
from histoloop.errors import InvalidArgument, NotFound

from .export import scaled_inputs
from .heads import _torch_threads, inverse_frequency_weights
from .pipeline import TrainedModel

__all__ = [
    "MAX_STEPS",
    "RaterModel",
    "RaterNet",
    "RaterVote",
    "fit_rater_model",
    "fit_round_raters",
    "vote_rows",
]

RaterVote = tuple[int, str, str]
"""``(spot row, annotator, class name)``: one annotator's label of one spot."""

MAX_STEPS = 3000
"""Optimiser steps a per-annotator model trains for at most. 60 epochs of 64-label batches stay
under it up to 3,200 labels (1,000 spots × 3 raters: 2,820 steps); at 9,000 labels it allows 21
epochs, and the sweep of ``bench_raters.py`` (benchmarks/README.md) found fewer epochs there as
good as 60 at a fraction of the time."""


class RaterNet(nn.Module):
    """The MLP head with a rater embedding joined to its input.

    Args:
        in_dim: Feature dimension.
        n_raters: Number of raters.
        n_classes: Number of classes.
        hidden: Hidden width.
        embed: Rater-embedding width.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        in_dim: int,
        n_raters: int,
        n_classes: int,
        hidden: int = 128,
        embed: int = 8,
        negative_slope: float = 0.02,
    ) -> None:
        super().__init__()
        self.raters = nn.Embedding(n_raters, embed)
        self.encoder = nn.Sequential(
            nn.Linear(in_dim + embed, hidden), nn.LeakyReLU(negative_slope)
        )
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, C)`` of rater ``rater[i]`` for spot ``x[i]``."""
        return self.classifier(self.encoder(torch.cat([x, self.raters(rater)], dim=1)))


@dataclass
class RaterModel:
    """A trained per-annotator model.

    Attributes:
        net: The network.
        raters: Rater ids by embedding index.
        n_classes: Number of classes.
        mean: Feature means (standardisation fitted on the training spots).
        scale: Feature scales.
        epochs: Passes over the labels it was trained for (see :data:`MAX_STEPS`).
    """

    net: RaterNet
    raters: tuple[str, ...]
    n_classes: int
    mean: np.ndarray
    scale: np.ndarray
    epochs: int = 0

    def _index(self, rater: str) -> int:
        try:
            return self.raters.index(rater)
        except ValueError:
            raise NotFound(
                f"annotator {rater!r} gave no labels this model was trained on; "
                f"it knows {list(self.raters)}"
            ) from None

    def predict_proba(self, X: np.ndarray, rater: str) -> np.ndarray:
        """``(n, C)`` float32 class probabilities as ``rater`` would label the spots.

        Raises:
            NotFound: The model has not seen this rater.
        """
        idx = self._index(rater)
        Z = torch.from_numpy(
            ((np.asarray(X, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)
        )
        self.net.eval()
        with _torch_threads(1), torch.no_grad():
            logits = self.net(Z, torch.full((len(Z),), idx, dtype=torch.int64))
        return torch.softmax(logits, dim=1).numpy()

    def disagreement(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` share of rater pairs whose predicted classes differ, per spot (0 = all agree)."""
        return rater_disagreement(
            np.stack([self.predict_proba(X, r).argmax(axis=1) for r in self.raters])
        )


def fit_rater_model(
    X: np.ndarray,
    raters: Sequence[str],
    y: np.ndarray,
    *,
    n_classes: int,
    seed: int = 0,
    epochs: int = 60,
    max_steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 128,
    embed: int = 8,
) -> RaterModel:
    """Train one head on every (spot, rater, label) triple.

    Args:
        X: ``(m, d)`` features, one row per label (a spot labelled by three raters
            appears three times).
        raters: ``(m,)`` who gave each label.
        y: ``(m,)`` class indices.
        n_classes: Number of classes.
        seed: Seed (initialisation and batches).
        epochs: Passes over the labels at most.
        max_steps: Optimiser steps at most (default :data:`MAX_STEPS`): fewer epochs
            when the labels are many, so a round's cost stops growing with them.
        lr: Adam learning rate.
        batch_size: Mini-batch size.
        hidden: Hidden width.
        embed: Rater-embedding width.

    Returns:
        The :class:`RaterModel`.

    Raises:
        InvalidArgument: Mismatched lengths, labels out of range, or no labels.
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    names = [str(r) for r in raters]
    if X.ndim != 2 or len(X) == 0 or len(names) != len(X) or y.shape != (len(X),):
        raise InvalidArgument(
            f"X {X.shape}, raters ({len(names)}) and y {y.shape} must describe the same labels"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise InvalidArgument(f"labels must be in [0, {n_classes})")
    order = tuple(sorted(set(names)))
    r = np.array([order.index(n) for n in names], dtype=np.int64)
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0
    Z = torch.from_numpy((X - mean) / scale)
    batches = -(-len(y) // batch_size)
    epochs = max(1, min(epochs, (MAX_STEPS if max_steps is None else max_steps) // batches))
    with _torch_threads(1):
        net = _train(
            X.shape[1],
            Z,
            r,
            y,
            len(order),
            n_classes,
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            hidden=hidden,
            embed=embed,
        )
    return RaterModel(
        net=net, raters=order, n_classes=n_classes, mean=mean, scale=scale, epochs=epochs
    )


def _train(
    in_dim: int,
    Z: torch.Tensor,
    r: np.ndarray,
    y: np.ndarray,
    n_raters: int,
    n_classes: int,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    hidden: int,
    embed: int,
) -> RaterNet:
    torch.manual_seed(seed)
    net = RaterNet(in_dim, n_raters, n_classes, hidden=hidden, embed=embed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(inverse_frequency_weights(y, n_classes)))
    gen = torch.Generator().manual_seed(seed)
    yt, rt = torch.from_numpy(y), torch.from_numpy(r)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(net(Z[idx], rt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def vote_rows(
    barcodes: Iterable[str], votes: Mapping[str, Mapping[str, str]], offset: int = 0
) -> list[RaterVote]:
    """Every annotator's vote on the spots of one dataset, as rows of the stacked feature matrix.

    Args:
        barcodes: The dataset's spots in row order.
        votes: barcode → annotator → class (a label snapshot's ``votes`` of the dataset).
        offset: Row of the dataset's first spot in the stacked matrix.
    """
    return [
        (offset + row, annotator, label)
        for row, barcode in enumerate(barcodes)
        for annotator, label in sorted(votes.get(str(barcode), {}).items())
    ]


def fit_round_raters(
    features: Mapping[str, np.ndarray],
    model: TrainedModel,
    votes: Sequence[RaterVote],
    *,
    seed: int,
) -> RaterModel:
    """The per-annotator model of one round, beside the round's consensus ``model``.

    It sees the spots as ``model`` does (its feature layout and source scaling, see
    :func:`~.export.scaled_inputs`), so its TorchScript export takes the same input.

    Args:
        features: Feature blocks of every spot (raw), one row per spot, as given to
            :func:`~.round.fit_round`.
        model: The round's consensus model.
        votes: Every annotator's label of the labelled spots (:func:`vote_rows`).
        seed: The project's seed.

    Raises:
        InvalidArgument: no votes, or a vote in a class the model does not have.
    """
    if not votes:
        raise InvalidArgument("votes: a per-annotator model needs labels")
    unknown = sorted({label for _, _, label in votes} - set(model.classes))
    if unknown:
        raise InvalidArgument(f"votes use classes the model does not have: {unknown}")
    rows = np.array([row for row, _, _ in votes], dtype=np.int64)
    x = np.hstack([np.asarray(features[k], dtype=np.float32) for k in features])[rows]
    y = np.array([model.classes.index(label) for _, _, label in votes], dtype=np.int64)
    return fit_rater_model(
        scaled_inputs(model, x),
        [a for _, a, _ in votes],
        y,
        n_classes=len(model.classes),
        seed=seed,
    )
