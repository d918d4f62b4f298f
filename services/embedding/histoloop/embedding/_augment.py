"""Augmentation repetitions (ActiveVisium): several augmented views of every patch.

Each view of each patch draws its own random transform from a generator seeded by
``(seed, view, patch number)``, so the views do not depend on how patches are batched or
chunked. A transform is: a horizontal and a vertical flip (each with probability ½), a
rotation by a multiple of 90° (square patches), a Gaussian blur (probability ½, σ in
[0.1, 1.5] px), additive Gaussian noise (σ in [0, 8] grey levels) and a gamma change
(γ in [0.8, 1.25]). View 0 is always the clean patch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from histoloop.embedding._base import Embedder, check_patches
from histoloop.errors import InvalidArgument

__all__ = ["augment_patches", "embed_views"]


def _augment_one(patch: np.ndarray, rng: np.random.Generator, max_noise: float = 8.0) -> np.ndarray:
    x = patch
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.5:
        x = x[::-1]
    k = int(rng.integers(4)) if x.shape[0] == x.shape[1] else 2 * int(rng.integers(2))
    x = np.rot90(x, k)
    y = x.astype(np.float32)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.1, 1.5))
        y = ndimage.gaussian_filter(y, sigma=(sigma, sigma, 0), mode="reflect")
    noise = float(rng.uniform(0.0, 8.0)) * (max_noise / 8.0)
    y = y + rng.standard_normal(y.shape, dtype=np.float32) * np.float32(noise)
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    y = np.clip(y, 0, 255) / np.float32(255)
    y = np.power(y, np.float32(gamma)) * np.float32(255)
    return (y + 0.5).astype(np.uint8)


def augment_patches(
    patches: np.ndarray, view: int, *, seed: int = 0, start: int = 0, max_noise: float = 8.0
) -> np.ndarray:
    """One augmented view of every patch.

    Args:
        patches: uint8 (n, H, W, 3).
        view: view number ≥ 1 (0 is the clean view and is returned unchanged).
        seed: experiment seed.
        start: global number of the first patch (so chunked calls match one big call).
        max_noise: largest additive-noise σ in grey levels (0 = no pixel noise; the random
            draws are the same, so the other transforms of a view do not change).

    Returns:
        uint8 (n, H, W, 3).
    """
    check_patches(patches)
    if view == 0:
        return patches
    out = np.empty_like(patches)
    for i, patch in enumerate(patches):
        rng = np.random.default_rng([int(seed), int(view), int(start) + i])
        out[i] = _augment_one(patch, rng, max_noise)
    return out


def embed_views(
    embedder: Embedder | Callable[[np.ndarray], np.ndarray],
    patches: np.ndarray,
    n_augment: int,
    *,
    seed: int = 0,
    start: int = 0,
    max_noise: float = 8.0,
) -> np.ndarray:
    """Embed the clean view and ``n_augment`` augmented views of every patch.

    Returns:
        float32 (n_augment + 1, n, d); ``[0]`` is the clean view.
    """
    if n_augment < 0:
        raise InvalidArgument(f"n_augment must be ≥ 0, got {n_augment}")
    embed = embedder.embed if isinstance(embedder, Embedder) else embedder
    views = [embed(patches)]
    for view in range(1, n_augment + 1):
        views.append(
            embed(augment_patches(patches, view, seed=seed, start=start, max_noise=max_noise))
        )
    return np.stack(views).astype(np.float32, copy=False)
