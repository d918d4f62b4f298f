"""Handcrafted morphology features: deterministic, vectorised, equal to the skimage references."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops

from histoloop.embedding import FEATURE_NAMES, HandcraftedEmbedder, make_embedder
from histoloop.embedding._handcrafted import (
    _LBP_LUT,
    _NEIGHBOURS,
    glcm_features,
    lbp_histogram,
    rgb_to_hed,
)
from histoloop.errors import InvalidArgument
from histoloop.tiling import PatchSet


@pytest.fixture(scope="module")
def tissue(visium_patches) -> np.ndarray:  # type: ignore[no-untyped-def]
    store, result = visium_patches
    return PatchSet.open(store, result.prefix).read_all()[:40]


def test_shape_determinism_and_batch_independence(tissue: np.ndarray) -> None:
    emb = make_embedder("handcrafted", batch_size=16)
    a = emb.embed(tissue)
    assert a.shape == (len(tissue), emb.dim) == (len(tissue), len(FEATURE_NAMES))
    assert a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, HandcraftedEmbedder(batch_size=7).embed(tissue))
    np.testing.assert_array_equal(a[3:4], emb.embed(tissue[3:4]))
    assert emb.embed(tissue[:0]).shape == (0, emb.dim)


def test_features_tell_tissue_from_glass(tissue: np.ndarray) -> None:
    glass = np.full((4, 224, 224, 3), 242, np.uint8)
    f = dict(
        zip(
            FEATURE_NAMES,
            HandcraftedEmbedder().embed(np.concatenate([tissue[:4], glass])).T,
            strict=True,
        )
    )
    assert (f["tissue_frac"][:4] > 0.3).all() and (f["tissue_frac"][4:] == 0).all()
    assert f["hema_mean"][:4].min() > f["hema_mean"][4:].max()
    assert f["blobs_per_kpx"][4:].max() == 0


def test_colour_deconvolution_equals_skimage(tissue: np.ndarray) -> None:
    np.testing.assert_allclose(rgb_to_hed(tissue[:3]), rgb2hed(tissue[:3]), atol=1e-5)


def test_vectorised_glcm_equals_skimage(tissue: np.ndarray) -> None:
    grey = (tissue[:4].mean(axis=-1) // 8).astype(np.uint8)
    ours = glcm_features(grey)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    for k in range(len(grey)):
        p = graycomatrix(grey[k], [1, 3], angles, levels=32, symmetric=True, normed=True)
        ref = np.stack(
            [
                graycoprops(p, prop).mean(axis=1)
                for prop in (
                    "contrast",
                    "dissimilarity",
                    "homogeneity",
                    "energy",
                    "correlation",
                    "ASM",
                )
            ],
            axis=1,
        ).ravel()
        np.testing.assert_allclose(ours[k], ref, rtol=1e-9, atol=1e-12)


def test_lbp_equals_a_plain_reference() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (2, 9, 11), dtype=np.uint8)
    hist = lbp_histogram(grey)
    for k in range(2):
        counts = np.zeros(10)
        for r in range(1, 8):
            for c in range(1, 10):
                code = sum(
                    1 << bit
                    for bit, (dr, dc) in enumerate(_NEIGHBOURS)
                    if grey[k, r + dr, c + dc] >= grey[k, r, c]
                )
                bits = [(code >> b) & 1 for b in range(8)]
                changes = sum(bits[b] != bits[(b + 1) % 8] for b in range(8))
                counts[sum(bits) if changes <= 2 else 9] += 1
        np.testing.assert_allclose(hist[k], counts / counts.sum())
    assert _LBP_LUT[0] == 0 and _LBP_LUT[255] == 8 and _LBP_LUT[0b01010101] == 9


def test_bad_input() -> None:
    emb = HandcraftedEmbedder()
    for bad in (
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((2, 8, 8, 4), np.uint8),
    ):
        with pytest.raises(InvalidArgument):
            emb.embed(bad)
