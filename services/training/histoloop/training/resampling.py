"""Adaptive resampling (AR): draw training spots inversely to their cluster's density.

Labelled spots pile up in a few dense regions of the latent space (large, common
tissue classes). Adaptive resampling clusters the latent space of the labelled spots
and weights every spot by the inverse of its cluster's size, so that each cluster is
drawn equally often by the :class:`torch.utils.data.WeightedRandomSampler`-style
sampling of the MLP fit (``Head.fit(sample_weight=…)``).

Modes:

* ``"off"`` — uniform sampling (no weights);
* ``"offline"`` — clusters on the foundation-model embeddings (fixed across rounds);
* ``"online"`` — as the AR paper describes it, concurrently with training: the torch
  heads (``mlp``, ``multimodal``, ``ensemble``) re-cluster the *current* hidden layer of
  every labelled spot every ``resampling_every`` epochs and re-weight the sampler
  (``MLPConfig.resampling``; see ``heads.torch_nets._fit_module``). The logistic regression,
  which has no epochs, clusters the previous model's hidden layer once per round
  (:func:`resampling_weights`; falls back to ``"offline"`` without a previous model).
"""

from __future__ import annotations

import logging

import numpy as np

from histoloop.errors import InvalidArgument
from histoloop.formats.vocab import RESAMPLING_MODES, ResamplingMode

__all__ = [
    "RESAMPLING_MODES",
    "ResamplingMode",
    "adaptive_resampling_weights",
    "resampling_weights",
]

log = logging.getLogger(__name__)


def adaptive_resampling_weights(
    embeddings: np.ndarray, *, n_clusters: int = 10, seed: int = 0
) -> np.ndarray:
    """Sampling weights inversely proportional to the size of each spot's cluster.

    Args:
        embeddings: ``(n, d)`` latent features of the labelled spots.
        n_clusters: k-means clusters (clipped to the number of distinct rows).
        seed: k-means seed.

    Returns:
        ``(n,)`` float64 weights summing to 1; every non-empty cluster gets the same
        total weight.

    Raises:
        InvalidArgument: Bad shape or ``n_clusters < 1``.
    """
    from sklearn.cluster import KMeans

    X = np.asarray(embeddings, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise InvalidArgument(f"embeddings must be a non-empty (n, d) array, got {X.shape}")
    if n_clusters < 1:
        raise InvalidArgument(f"n_clusters must be ≥ 1, got {n_clusters}")
    n = X.shape[0]
    k = int(min(n_clusters, len(np.unique(X, axis=0))))
    if k <= 1:
        return np.full(n, 1.0 / n)
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(X)
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    w = 1.0 / sizes[labels]
    return w / w.sum()


def resampling_weights(
    mode: ResamplingMode,
    *,
    embeddings: np.ndarray,
    hidden: np.ndarray | None = None,
    n_clusters: int = 10,
    seed: int = 0,
) -> np.ndarray | None:
    """Weights for one training round according to ``mode``.

    Args:
        mode: ``"off"``, ``"offline"`` or ``"online"``.
        embeddings: ``(n, d)`` foundation-model embeddings of the labelled spots.
        hidden: ``(n, h)`` the previous model's hidden features of the same spots
            (``"online"``); None falls back to ``"offline"``.
        n_clusters: k-means clusters.
        seed: Seed.

    Returns:
        ``(n,)`` weights summing to 1, or None for ``"off"``.

    Raises:
        InvalidArgument: Unknown mode.
    """
    if mode not in RESAMPLING_MODES:
        raise InvalidArgument(f"unknown resampling mode {mode!r}; choose from {RESAMPLING_MODES}")
    if mode == "off":
        return None
    if mode == "online" and hidden is None:
        log.info("online resampling without a previous model: using the embeddings")
    source = hidden if mode == "online" and hidden is not None else embeddings
    return adaptive_resampling_weights(source, n_clusters=n_clusters, seed=seed)
