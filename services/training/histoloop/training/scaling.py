"""Feature normalisation fitted on a source dataset and reused on any target.

A model is trained on standardised features; the mean and scale (and, for gene counts,
the library-size normalisation) come from the *source* dataset and are stored with the
model, so that predicting on another section or patient applies exactly the same
transform ("normalisation reuse" for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoloop.errors import InvalidArgument

__all__ = ["FeatureScaling", "log1p_normalise"]


def log1p_normalise(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise raw counts to ``target_sum`` per spot, then ``log1p``.

    Args:
        counts: ``(n, g)`` raw counts (dense or scipy sparse).
        target_sum: Total count every spot is scaled to.

    Returns:
        ``(n, g)`` float32.
    """
    if hasattr(counts, "toarray"):
        counts = counts.toarray()
    X = np.asarray(counts, dtype=np.float32)
    if X.ndim != 2:
        raise InvalidArgument(f"counts must be (n, g), got shape {X.shape}")
    totals = X.sum(axis=1, keepdims=True)
    X = X * (np.float32(target_sum) / np.maximum(totals, 1.0))
    return np.log1p(X, out=X)


@dataclass(frozen=True, eq=False)
class FeatureScaling:
    """Per-feature standardisation ``(x − mean) / scale``, optionally after log1p.

    Attributes:
        mean: ``(d,)`` float32 source means (after the optional log1p step).
        scale: ``(d,)`` float32 source standard deviations (1 where constant).
        names: Feature names (e.g. gene ids) in column order, for alignment.
        log1p_target_sum: If set, raw counts are library-size normalised to this sum
            and log1p-transformed before standardising.
    """

    mean: np.ndarray
    scale: np.ndarray
    names: tuple[str, ...] | None = None
    log1p_target_sum: float | None = None

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32).ravel()
        scale = np.asarray(self.scale, dtype=np.float32).ravel()
        if mean.shape != scale.shape:
            raise InvalidArgument("mean and scale must have the same length")
        if self.names is not None and len(self.names) != len(mean):
            raise InvalidArgument("names must have one entry per feature")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(x) for x in self.names))

    @property
    def dim(self) -> int:
        """Number of features."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        *,
        names: Sequence[str] | None = None,
        log1p_target_sum: float | None = None,
    ) -> FeatureScaling:
        """Fit on every spot of the source dataset (not only the labelled ones).

        Args:
            X: ``(n, d)`` source features, or raw counts with ``log1p_target_sum``.
            names: Feature names in column order.
            log1p_target_sum: Normalise counts to this total and log1p first.

        Returns:
            The fitted scaling.
        """
        Z = (
            log1p_normalise(X, log1p_target_sum)
            if log1p_target_sum
            else np.asarray(X, dtype=np.float32)
        )
        if Z.ndim != 2 or Z.shape[0] == 0:
            raise InvalidArgument(f"X must be a non-empty (n, d) array, got {Z.shape}")
        scale = Z.std(axis=0, dtype=np.float64)
        scale[scale < 1e-8] = 1.0
        return cls(
            mean=Z.mean(axis=0, dtype=np.float64),
            scale=scale,
            names=None if names is None else tuple(names),
            log1p_target_sum=log1p_target_sum,
        )

    def transform(self, X: np.ndarray, *, neutral: Sequence[int] = ()) -> np.ndarray:
        """Apply the stored transform.

        Args:
            X: ``(n, d)`` or ``(n_views, n, d)`` features in the source's column order.
            neutral: Columns to set to 0 after standardising (= the source mean), e.g.
                genes the target lacks.

        Returns:
            float32 array of the same shape.
        """
        if hasattr(X, "toarray"):
            X = X.toarray()
        X = np.asarray(X, dtype=np.float32)
        if X.shape[-1] != self.dim:
            raise InvalidArgument(f"expected {self.dim} features, got {X.shape[-1]}")
        if X.ndim == 3:
            return np.stack([self.transform(v, neutral=neutral) for v in X])
        Z = log1p_normalise(X, self.log1p_target_sum) if self.log1p_target_sum else X
        Z = (Z - self.mean) / self.scale
        if len(neutral):
            Z[:, np.asarray(neutral, dtype=np.int64)] = 0.0
        return Z.astype(np.float32, copy=False)
