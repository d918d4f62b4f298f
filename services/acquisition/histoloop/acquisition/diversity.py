"""The space every diversity strategy measures distances in.

Hidden features differ in scale from head to head: the MLP's LeakyReLU activations are
of order one, while the logistic-regression head hands over its input standardised on
the *labelled* spots only, so a feature that barely varies among a handful of labels
reaches 1e8 on the pool and a core-set picks nothing but those outliers. Every
diversity strategy (k-means, core-set, hybrid, ActiveVisium's k-means stage, TypiClust,
ProbCover) therefore works in :func:`diversity_space`: each column standardised over
*all* spots of the pool and clipped to ``±clip`` standard deviations.
"""

from __future__ import annotations

import numpy as np

from histoloop.errors import InvalidArgument

__all__ = ["DEFAULT_CLIP", "diversity_space"]

DEFAULT_CLIP = 5.0
"""Standard deviations at which standardised features are clipped."""

_BLOCK = 16384


def diversity_space(features: np.ndarray, *, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Columns standardised over every row and clipped, as C-contiguous float32.

    Args:
        features: ``(n, h)`` features (hidden layer or embeddings).
        clip: Clip to ``[-clip, clip]`` after standardising; must be > 0.

    Returns:
        ``(n, h)`` float32: zero mean, unit variance (before clipping) per column;
        constant columns become 0.

    Raises:
        InvalidArgument: Not 2-D, non-finite values, or ``clip <= 0``.
    """
    X = np.asarray(features)
    if X.ndim != 2:
        raise InvalidArgument(f"features must be (n, h), got shape {X.shape}")
    if not clip > 0:
        raise InvalidArgument(f"clip must be > 0, got {clip}")
    n = X.shape[0]
    if n == 0:
        return np.zeros(X.shape, dtype=np.float32)
    mean = np.zeros(X.shape[1], dtype=np.float64)
    for start in range(0, n, _BLOCK):
        mean += X[start : start + _BLOCK].sum(axis=0, dtype=np.float64)
    mean /= n
    var = np.zeros(X.shape[1], dtype=np.float64)
    for start in range(0, n, _BLOCK):
        block = X[start : start + _BLOCK].astype(np.float64) - mean
        var += (block * block).sum(axis=0)
    scale = np.sqrt(var / n)
    if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
        raise InvalidArgument("features contain NaN or infinite values")
    constant = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale[constant] = 1.0
    out = np.empty(X.shape, dtype=np.float32)
    for start in range(0, n, _BLOCK):
        block = (X[start : start + _BLOCK].astype(np.float64) - mean) / scale
        block[:, constant] = 0.0
        out[start : start + len(block)] = np.clip(block, -clip, clip)
    return out
