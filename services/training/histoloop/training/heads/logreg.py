"""The logistic-regression head: a fast, standardised scikit-learn baseline."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histoloop.errors import InvalidArgument
from histoloop.training.heads.base import (
    FitReport,
    Head,
    HeadInput,
    _check_labels,
    _check_sample_weight,
    _macro_f1,
    _weighted_ce,
    inverse_frequency_weights,
    register_head,
)

__all__ = ["LogRegConfig", "LogRegHead"]


@dataclass(frozen=True)
class LogRegConfig:
    """Hyper-parameters of the logistic-regression baseline.

    Attributes:
        C: Inverse L2 regularisation strength.
        max_iter: L-BFGS iterations.
        tol: L-BFGS tolerance.
    """

    C: float = 1.0
    max_iter: int = 300
    tol: float = 1e-4

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on an out-of-range value."""
        if self.C <= 0 or self.max_iter < 1 or self.tol <= 0:
            raise InvalidArgument("C and tol must be > 0 and max_iter ≥ 1")


@register_head
class LogRegHead(Head):
    """Standardised multinomial logistic regression (``class_weight="balanced"``).

    Trained with scikit-learn's L-BFGS; predicts with its own softmax so the artifact is
    plain arrays. ``hidden(X)`` returns the standardised input ``(n, d)``. Augmented
    views are ignored (the clean view is used); ``sample_weight`` multiplies the
    balanced class weights.
    """

    name = "logreg"
    config_class = LogRegConfig

    def __init__(self, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(n_classes=n_classes, seed=seed, **hyperparameters)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.coef: np.ndarray | None = None
        self.intercept: np.ndarray | None = None
        self.seen: np.ndarray | None = None

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.scale is not None
        return ((X - self.mean) / self.scale).astype(np.float32, copy=False)

    def fit(
        self,
        X: HeadInput,
        y: np.ndarray,
        *,
        sample_weight: np.ndarray | None = None,
        X_val: HeadInput | None = None,
        y_val: np.ndarray | None = None,
        init_from: Head | None = None,
    ) -> FitReport:
        """See :meth:`Head.fit`."""
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        self.input_dims = None
        (Xc,) = self._clean(X)
        y = _check_labels(y, Xc.shape[0], self.n_classes)
        sw = _check_sample_weight(sample_weight, len(y))
        mean = Xc.mean(axis=0)
        scale = Xc.std(axis=0)
        scale[scale < 1e-8] = 1.0
        self.mean, self.scale = mean, scale
        Z = self._standardise(Xc)
        seen = np.unique(y)
        c = self.config
        clf = LogisticRegression(
            C=c.C, max_iter=c.max_iter, tol=c.tol, class_weight="balanced", random_state=self.seed
        )
        warm = (
            isinstance(init_from, LogRegHead)
            and init_from.fitted
            and init_from.input_dims == {"features": Xc.shape[1]}
            and init_from.seen is not None
            and np.array_equal(init_from.seen, seen)
        )
        if warm:
            assert isinstance(init_from, LogRegHead)
            clf.set_params(warm_start=True)
            clf.coef_ = init_from.coef.astype(np.float64).copy()  # type: ignore[union-attr]
            clf.intercept_ = init_from.intercept.astype(np.float64).copy()  # type: ignore[union-attr]
        if sw is not None:
            sw = sw * (len(sw) / sw.sum())
        clf.fit(Z, y, sample_weight=sw)
        self.coef = clf.coef_.astype(np.float32)
        self.intercept = clf.intercept_.astype(np.float32)
        self.seen = clf.classes_.astype(np.int64)
        self.input_dims = {"features": int(Xc.shape[1])}
        vl = vf1 = None
        if X_val is not None and y_val is not None and len(y_val):
            yv = np.asarray(y_val, dtype=np.int64)
            P = self.predict_proba(X_val)
            vl = _weighted_ce(P, yv, inverse_frequency_weights(y, self.n_classes))
            vf1 = _macro_f1(yv, P.argmax(axis=1))
        return FitReport(
            epochs=1,
            best_epoch=1,
            train_loss=_weighted_ce(
                self.predict_proba(Xc), y, inverse_frequency_weights(y, self.n_classes)
            ),
            val_loss=vl,
            val_macro_f1=vf1,
            seconds=time.perf_counter() - t0,
            warm_started=bool(warm),
            early_stopped=False,
            checkpoint_metric="val_loss" if vl is not None else "last_epoch",
        )

    def predict_proba(self, X: HeadInput) -> np.ndarray:
        """Class probabilities ``(n, C)`` float32; unseen classes get 0."""
        self._require_fitted()
        Z = self._standardise(self._clean(X)[0])
        assert self.coef is not None and self.intercept is not None and self.seen is not None
        logits = Z @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: sklearn keeps one row for the second class
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            seen_p = np.stack([1.0 - p1, p1], axis=1)
        else:
            logits -= logits.max(axis=1, keepdims=True)
            seen_p = np.exp(logits)
            seen_p /= seen_p.sum(axis=1, keepdims=True)
        P = np.zeros((Z.shape[0], self.n_classes), dtype=np.float32)
        P[:, self.seen] = seen_p
        return P

    def hidden(self, X: HeadInput) -> np.ndarray:
        """The standardised input ``(n, d)`` float32."""
        self._require_fitted()
        return self._standardise(self._clean(X)[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.from_numpy(np.asarray(self.mean, dtype=np.float32)),
            "scale": torch.from_numpy(np.asarray(self.scale, dtype=np.float32)),
            "coef": torch.from_numpy(np.asarray(self.coef, dtype=np.float32)),
            "intercept": torch.from_numpy(np.asarray(self.intercept, dtype=np.float32)),
            "seen": torch.from_numpy(np.asarray(self.seen, dtype=np.int64)),
        }

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].numpy()
        self.scale = tensors["scale"].numpy()
        self.coef = tensors["coef"].numpy()
        self.intercept = tensors["intercept"].numpy()
        self.seen = tensors["seen"].numpy()
