"""Plain WSI grid tiling with a tissue mask; the tissue mask itself."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import InvalidArgument
from histoloop.tiling import (
    MissingMpp,
    NoTissueFound,
    PatchSet,
    SlideReader,
    tile_wsi,
    tissue_mask,
)
from tests.tiling.synthetic import write_pyramid


def test_tissue_mask_on_a_real_slide(cmu_svs: Path) -> None:
    with SlideReader(cmu_svs) as reader:
        thumb, ds = reader.thumbnail(512)
    mask = tissue_mask(thumb, ds)
    assert mask.mask.shape == thumb.shape[:2]
    assert 0.2 < mask.fraction() < 0.8  # the section covers part of the glass
    # the slide's top-left corner is glass, its lower middle is tissue
    assert not mask.contains(np.array([20.0]), np.array([20.0]))[0]
    assert mask.contains(np.array([1100.0]), np.array([2500.0]))[0]
    assert not mask.contains(np.array([-5.0, 1e6]), np.array([10.0, 10.0])).any()
    assert mask.box_fraction(np.array([0.0]), np.array([0.0]), 200)[0] < 0.05


def test_tissue_mask_of_blank_glass_is_empty() -> None:
    white = np.full((100, 80, 3), 250, np.uint8)
    noise = np.random.default_rng(0).integers(-3, 4, white.shape)
    assert tissue_mask((white + noise).astype(np.uint8), 4.0).fraction() == 0.0


def test_tile_wsi_level0(cmu_svs: Path, store: LocalArtifactStore) -> None:
    progress: list[int] = []
    result = tile_wsi(
        cmu_svs,
        store,
        "wsi/cmu",
        mpp=0.5,
        tile_size=224,
        workers=1,
        chunk_size=20,
        on_progress=lambda done, total: progress.append(done),
    )
    assert result.kind == "wsi" and result.level == 0 and result.direct
    assert result.region_size == round(224 * 0.5 / 0.499)
    patches = PatchSet.open(store, "wsi/cmu")
    index = patches.index
    grid = (2220 // 224) * (2967 // 224)  # whole tiles at ~1.002 level-0 px per output px
    assert 5 < patches.n < grid
    assert (index["tissue_fraction"] >= 0.5).all()
    assert index["id"].is_unique and index["id"].str.match(r"r\d+_c\d+").all()
    assert patches.read_all().shape == (patches.n, 224, 224, 3)
    assert progress[-1] == patches.n
    Image.open(io.BytesIO(store.get(result.overlay_key))).verify()
    # more tissue required → fewer tiles
    strict = tile_wsi(cmu_svs, store, "wsi/cmu-strict", mpp=0.5, min_tissue=0.9, workers=1)
    assert strict.n_patches < result.n_patches


def test_tile_wsi_picks_a_lower_level(generic_tiff: Path, store: LocalArtifactStore) -> None:
    result = tile_wsi(generic_tiff, store, "wsi/g", mpp=1.0, tile_size=128, workers=1)
    assert result.level == 1 and not result.direct  # fractional downsample → OpenSlide
    assert result.region_size == round(128 * 1.0 / 0.499 / result.downsample)


def test_tile_wsi_exact_pyramid_upper_level_is_direct(
    exact_pyramid: Path, store: LocalArtifactStore
) -> None:
    fast = tile_wsi(exact_pyramid, store, "fast", mpp=2.0, tile_size=64, min_tissue=0.1, workers=1)
    slow = tile_wsi(
        exact_pyramid,
        store,
        "slow",
        mpp=2.0,
        tile_size=64,
        min_tissue=0.1,
        workers=1,
        backend="openslide",
    )
    assert fast.level == 2 and fast.direct and not slow.direct
    np.testing.assert_array_equal(
        PatchSet.open(store, "fast").read_all(), PatchSet.open(store, "slow").read_all()
    )


def test_slide_without_mpp(tcga_svs: Path, store: LocalArtifactStore) -> None:
    with pytest.raises(MissingMpp) as err:
        tile_wsi(tcga_svs, store, "t", mpp=0.5)
    assert str(tcga_svs) in str(err.value) and "openslide.mpp-x" in str(err.value)
    assert "slide_mpp" in str(err.value)
    # J2K slide, explicit mpp: read through OpenSlide from level 1 (downsample ≈ 2)
    result = tile_wsi(tcga_svs, store, "t", mpp=2.0, slide_mpp=0.5, tile_size=112, workers=1)
    assert result.level == 1 and not result.direct and result.n_patches > 10


def test_no_tissue(tmp_path: Path, store: LocalArtifactStore) -> None:
    blank = write_pyramid(tmp_path / "blank.tiff", np.full((512, 512, 3), 245, np.uint8), levels=1)
    with pytest.raises(NoTissueFound, match="blank.tiff"):
        tile_wsi(blank, store, "b", mpp=0.5, tile_size=128, workers=1)


def test_bad_options(cmu_svs: Path, store: LocalArtifactStore) -> None:
    for kwargs in ({"mpp": 0}, {"tile_size": 0}, {"min_tissue": 1.5}, {"stride": -4}):
        with pytest.raises(InvalidArgument):
            tile_wsi(cmu_svs, store, "x", **kwargs)


def test_native_resolution_needs_no_mpp(
    tmp_path: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as osr:
        base = np.asarray(osr.read_region((400, 1500), 0, (768, 768)).convert("RGB"))
    slide = write_pyramid(tmp_path / "no-mpp.tiff", base, levels=2, mpp=None)
    with pytest.raises(MissingMpp):
        tile_wsi(slide, store, "n", mpp=0.5, workers=1)
    result = tile_wsi(slide, store, "n", mpp=None, tile_size=128, min_tissue=0.2, workers=1)
    assert result.level == 0 and result.region_size == 128 and result.direct
    # the manifest key opens the set as well as the prefix
    assert PatchSet.open(store, result.manifest_key).n == result.n_patches
